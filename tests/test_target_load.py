"""Sharded loading (draftforge/target_load.py): each rank's pieces, gathered, are the whole
target's weights bit for bit; a rank holds about 1/world of them; a layout that cannot split
the target is refused before any weight is read."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from draftforge.check import check_config
from draftforge.config import ConfigError, TargetConfig, load_config
from draftforge.parallel import Layout, tp_problem
from draftforge.target_load import load_sharded_target
from draftforge.testing import save_tiny_target, tiny_run_overrides, write_tiny_run

# Tied head; MoE with one checkpoint tensor per expert (merged on load); MLA with shared and
# dense-first layers; Llama-4's fused experts; gpt-oss's sinks, biases and YaRN; Gemma-3's
# embedding scale and two rotary embeddings (non-persistent buffers).
FAMILIES = ["llama_tied", "qwen3_moe", "deepseek_v3", "llama4", "gpt_oss", "gemma3"]
# Those whose tensor-parallel plan in transformers splits attention and MLPs alike (gpt-oss's
# splits only the embedding, DeepSeek-V3's only the MLPs).
TP_SPLITS_ALL = {"llama_tied", "qwen3_moe", "llama4", "gemma3"}

# Runs under torchrun: for each layout (tp, fsdp) and family, loads the target sharded and
# whole, and writes per rank what differs and how many bytes this rank holds.
SCRIPT = """
import json, sys
import torch
from torch.distributed.tensor import DTensor
from draftforge import parallel
from draftforge.config import ParallelConfig, TargetConfig
from draftforge.target import decoder_module, load_target
from draftforge.target_load import load_sharded_target

root, out, layouts, families = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
found = []
for tp, fsdp in layouts:
    layout = parallel.setup(ParallelConfig(tp=tp, device="cpu"))
    for family in families:
        cfg = TargetConfig(path=f"{root}/{family}", aux_layers=[0, 1, 2])
        whole, sharded = load_target(cfg), load_sharded_target(cfg, layout, fsdp=fsdp)
        ref = dict(whole.model.named_parameters()) | dict(whole.model.named_buffers())
        differ, held, total = [], 0, 0
        named = [*sharded.model.named_parameters(), *sharded.model.named_buffers()]
        for name, t in named:
            full = t.full_tensor() if isinstance(t, DTensor) else t
            if full.dtype != ref[name].dtype or not torch.equal(full, ref[name]):
                differ.append(name)
        for t in decoder_module(sharded.model).parameters():
            local = t.to_local() if isinstance(t, DTensor) else t
            held += local.numel() * local.element_size()
            total += t.numel() * t.element_size()
        model = sharded.model
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
        aux, hidden = sharded.features(ids)
        aux0, hidden0 = whole.features(ids)
        err = max((aux - aux0).abs().max().item(), (hidden - hidden0).abs().max().item())
        found.append(dict(tp=tp, fsdp=fsdp, family=family, differ=differ, held=held,
                          total=total, tied=tied, tied_config=whole.config.tie_word_embeddings,
                          err=err))
with open(f"{out}/rank{layout.rank}.json", "w") as f:
    json.dump(found, f)
parallel.barrier(layout)
parallel.teardown(layout)
"""


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("targets")
    for family in FAMILIES:
        save_tiny_target(root / family, family)
    return root


@pytest.mark.dist
@pytest.mark.parametrize(
    ("world", "layouts"),
    [(2, [(1, False), (1, True), (2, False)]), (4, [(1, True), (2, False), (2, True)])],
    ids=["world2", "world4"],
)
def test_each_rank_reads_its_piece_of_the_weights(targets, tmp_path, world, layouts):
    """Gathered, every rank's pieces are the whole target's parameters and buffers bit for
    bit (tied heads tied); each rank holds its share of the decoder's bytes: all of it
    unsharded, 1/world under FSDP, 1/tp under tensor parallelism (by a plan that splits
    everything), 1/world under both; and the features match the whole target's."""
    script = tmp_path / "load.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += [str(world), str(script), str(targets), str(tmp_path), json.dumps(layouts), *FAMILIES]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(world):
        rows = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(rows) == len(layouts) * len(FAMILIES)
        for row in rows:
            where = f"rank {rank}: {row}"
            assert row["differ"] == [], where
            assert row["tied"] == row["tied_config"], where
            if row["tp"] == 1 or row["family"] in TP_SPLITS_ALL:
                shards = world if row["fsdp"] else row["tp"]
                # FSDP pads each parameter to a multiple of world rows; TP replicates norms.
                assert row["held"] <= 1.1 * row["total"] / shards, where
                assert row["held"] >= 0.9 * row["total"] / shards, where
            # Tensor parallelism sums partial products in another order: last bits differ.
            assert row["err"] <= (0 if row["tp"] == 1 else 2e-5), where


def _layout(world: int, tp: int) -> Layout:
    """A layout of ``world`` processes as rank 0 sees it, without a process group: a check
    that runs before any collective or weight needs no more."""
    return Layout(0, world, world // tp, 0, tp, torch.device("cpu"), None)


def test_a_layout_that_cannot_split_the_target_is_refused_before_reading_weights(tmp_path):
    target = save_tiny_target(tmp_path / "target")  # 4 heads, 2 KV heads
    # Any read of the weights now fails: the refusal must come before.
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = TargetConfig(path=str(target), aux_layers=[0, 1, 2])
    with pytest.raises(ConfigError) as err:
        load_sharded_target(cfg, _layout(4, 4), fsdp=True)
    assert str(err.value) == (
        "parallel.tp=4 does not divide the target's num_key_value_heads (2): valid values "
        "with 4 processes: 1, 2"
    )
    with pytest.raises(ConfigError, match=r"parallel.tp=2 does not divide the 3 processes: .* 1$"):
        load_sharded_target(cfg, _layout(3, 2), fsdp=False)


def test_tp_problem_names_each_width_that_does_not_split():
    config = SimpleNamespace(
        base_model_tp_plan={"layers.*.mlp.up_proj": "colwise"},
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=1536,
        moe_intermediate_size=96,
    )
    assert tp_problem(config, 4, 8) is None
    assert tp_problem(config, 1, 3) is None
    assert tp_problem(config, 8, 8) == (
        "parallel.tp=8 does not divide the target's num_attention_heads (12), "
        "num_key_value_heads (4): valid values with 8 processes: 1, 2, 4"
    )
    config.base_model_tp_plan = None
    assert "no tensor-parallel plan" in tp_problem(config, 2, 2)


def test_check_reports_the_layout(tmp_path):
    root = write_tiny_run(tmp_path, conversations=8)
    cfg = load_config(None, tiny_run_overrides(root, tmp_path / "out", **{"parallel.tp": 4}))
    found = [f for f in check_config(cfg, world=4) if f.error]
    assert [f.message for f in found] == [
        "parallel.tp=4 does not divide the target's num_key_value_heads (2): valid values "
        "with 4 processes: 1, 2"
    ]
