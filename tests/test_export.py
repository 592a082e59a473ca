import copy
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from draftforge import checkpoint
from draftforge.cli import main
from draftforge.config import ConfigError, TargetConfig, dump_config, load_config
from draftforge.drafts import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DraftError,
    DraftState,
    build_draft_module,
    load_draft,
    read_checkpoint,
)
from draftforge.export import (
    PROVENANCE_FILE,
    check_export,
    export_checkpoint,
    sglang_files,
    vllm_files,
)
from draftforge.models import build_draft
from draftforge.target import load_target, read_target_info
from draftforge.testing import (
    TINY_VOCAB,
    save_tiny_target,
    save_vl_checkpoint,
    tiny_vl_processor,
    tiny_vl_target,
)

AUX = [0, 2, 5]  # a user override (the default for 8 layers is [1, 3, 4])
DRAFT_VOCAB = 100
STEP = 5
# A non-default RoPE, so a reader that falls back to theta 10000 is caught.
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
NORM_FLAGS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")


def randomize(draft: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms included, so a dropped or swapped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name == "embed_tokens.weight":
                continue
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if p.dim() == 1 else 0.3 * noise)


def save_run(root: Path, target_dir: Path, edit=lambda text: text, aux=AUX) -> Path:
    """A run directory with one checkpoint, laid out exactly as train() writes it (the draft
    built from the target's language-model config); ``edit`` changes the run config's YAML text."""
    cfg = load_config(
        None,
        [
            f"target.path={target_dir}",
            f"target.aux_layers={aux}",
            f"target.cache_dir={root / 'cache'}",
            f"draft.draft_vocab_size={DRAFT_VOCAB}",
            f"output.dir={root}",
        ],
    )
    target = load_target(cfg.target)
    torch.manual_seed(0)
    draft = build_draft("eagle3", target.config, target.aux_layers, DRAFT_VOCAB)
    randomize(draft, seed=1)
    draft.set_vocab(torch.tensor(sorted(random.Random(2).sample(range(TINY_VOCAB), DRAFT_VOCAB))))
    weights = {k: v for k, v in draft.state_dict().items() if not k.startswith("embed_tokens.")}
    extra = {
        "config.yaml": edit(dump_config(cfg)),
        "draft_config.json": draft.config.to_json_string(),
    }
    checkpoint.save_checkpoint(root / "checkpoints", STEP, weights, {"step": STEP}, extra)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    target_dir = save_tiny_target(root / "target", num_hidden_layers=8, rope_parameters=ROPE)
    run = save_run(root / "run", target_dir)
    target = load_target(TargetConfig(path=str(target_dir), aux_layers=AUX))
    out = {
        fmt: export_checkpoint(run, fmt, root / f"out_{fmt}").out
        for fmt in ("sglang", "vllm", "draftforge")
    }
    out["vllm_noembed"] = export_checkpoint(
        run, "vllm", root / "out_vllm_noembed", include_embedding=False
    ).out
    step_dir = run / "checkpoints" / f"step_{STEP:08d}"
    return {
        "root": root,
        "target_dir": target_dir,
        "run": run,
        "step": step_dir,
        "target": target,
        "out": out,
    }


def logits(draft, seed: int = 3, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Draft logits on fixed inputs: one step with causal attention over 12 positions (``[1, 12]``
    or M-RoPE's ``[3, 1, 12]``; 0..11 when not given)."""
    gen = torch.Generator().manual_seed(seed)
    aux = torch.randn(1, 12, 3 * draft.config.target_hidden_size, generator=gen)
    ids = torch.randint(0, TINY_VOCAB, (1, 12), generator=gen)

    def attend(q, k, v):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.no_grad():
        where = torch.arange(12)[None] if positions is None else positions
        hidden = draft.step(draft.fc(aux), ids, where, attend)
        return draft.logits(hidden)


def reference(env, round_embedding: bool):
    """The checkpoint's draft with its float weights rounded to bf16, as a bf16 export holds them."""
    draft = load_draft(env["step"], env["target"])
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name != "embed_tokens.weight" or round_embedding:
                p.copy_(p.bfloat16().float())
    return draft


def config_of(directory: Path) -> dict:
    return json.loads((directory / CONFIG_FILE).read_text())


def all_keys(tree) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | {k for v in tree.values() for k in all_keys(v)}
    return set()


# ----------------------------------------------------------------------------- round trips


def test_checkpoint_and_run_dir_load_the_same_draft(env):
    a = load_draft(env["step"], env["target"])
    b = load_draft(env["run"], env["target"])
    assert torch.equal(logits(a), logits(b))
    assert a.config.eagle_config["eagle_aux_hidden_state_layer_ids"] == AUX


def test_hf_round_trip_is_exact_and_self_contained(env):
    original = logits(load_draft(env["step"], env["target"]))
    reloaded = load_draft(env["out"]["draftforge"])  # no target: everything is in the directory
    assert torch.equal(logits(reloaded), original)
    assert torch.equal(reloaded.embed_tokens.weight, env["target"].embed_weight())


def test_sglang_round_trip_matches_in_bf16(env):
    draft = load_draft(env["out"]["sglang"], env["target"])
    assert torch.equal(logits(draft), logits(reference(env, round_embedding=False)))
    original = logits(load_draft(env["step"], env["target"]))
    assert torch.allclose(logits(draft), original, atol=0.05 * original.abs().max())


@pytest.mark.parametrize("name", ["vllm", "vllm_noembed"])
def test_vllm_round_trip_matches_in_bf16(env, name):
    with_embedding = name == "vllm"
    # With the embedding the export is self-contained; without it the target supplies it.
    draft = load_draft(env["out"][name], None if with_embedding else env["target"])
    assert torch.equal(logits(draft), logits(reference(env, round_embedding=with_embedding)))


def test_formats_without_embedding_need_the_target(env):
    for directory in (env["out"]["sglang"], env["out"]["vllm_noembed"], env["step"]):
        with pytest.raises(DraftError, match="pass the target"):
            load_draft(directory)


# ----------------------------------------------------------------------------- conventions


def test_aux_layer_conventions(env):
    sglang, vllm = config_of(env["out"]["sglang"]), config_of(env["out"]["vllm"])
    # SGLang counts "output of layer i", as draftforge does.
    assert sglang["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == AUX
    # vLLM reads a top-level list as HF hidden-state indices: it must not appear in SGLang's.
    assert "eagle_aux_hidden_state_layer_ids" not in sglang
    # vLLM/speculators count HF hidden_states: output of layer i is hidden_states[i + 1].
    assert vllm["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in AUX]
    assert (
        config_of(env["out"]["draftforge"])["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
        == AUX
    )
    provenance = json.loads((env["out"]["vllm"] / PROVENANCE_FILE).read_text())
    assert provenance["aux_layers_output_of_layer"] == AUX
    assert provenance["aux_layers_hf_hidden_states"] == [i + 1 for i in AUX]


def test_d2t_is_an_offset_and_t2d_a_mask(env):
    draft_ids = sorted(random.Random(2).sample(range(TINY_VOCAB), DRAFT_VOCAB))
    for name in ("sglang", "vllm", "draftforge"):
        tensors = load_file(env["out"][name] / WEIGHTS_FILE)
        d2t, t2d = tensors["d2t"], tensors["t2d"]
        assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool, name
        assert (torch.arange(DRAFT_VOCAB) + d2t).tolist() == draft_ids, name  # target = i + d2t[i]
        assert t2d.nonzero().flatten().tolist() == draft_ids, name


def test_embedding_rule(env):
    real = env["target"].embed_weight()
    assert not any("embed" in k for k in load_file(env["out"]["sglang"] / WEIGHTS_FILE))
    assert not any("embed" in k for k in load_file(env["out"]["vllm_noembed"] / WEIGHTS_FILE))
    # vLLM uses a draft's embedding when present: it must be the target's, never a random one.
    vllm = load_file(env["out"]["vllm"] / WEIGHTS_FILE)["embed_tokens.weight"]
    assert torch.equal(vllm, real.bfloat16())
    assert torch.equal(
        load_file(env["out"]["draftforge"] / WEIGHTS_FILE)["embed_tokens.weight"], real
    )


def test_key_names_and_dtypes(env):
    sglang = load_file(env["out"]["sglang"] / WEIGHTS_FILE)
    layer = {
        "input_layernorm.weight",
        "hidden_norm.weight",
        "post_attention_layernorm.weight",
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    }
    head = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}
    assert set(sglang) == head | {f"midlayer.{k}" for k in layer}
    vllm = load_file(env["out"]["vllm"] / WEIGHTS_FILE)
    assert set(vllm) == head | {f"layers.0.{k}" for k in layer} | {"embed_tokens.weight"}
    for tensors, dtype in ((sglang, torch.bfloat16), (vllm, torch.bfloat16)):
        assert {t.dtype for k, t in tensors.items() if k not in ("d2t", "t2d")} == {dtype}
    own = load_file(env["out"]["draftforge"] / WEIGHTS_FILE)
    assert {t.dtype for k, t in own.items() if k not in ("d2t", "t2d")} == {torch.float32}


def test_sglang_config_fields(env):
    c = config_of(env["out"]["sglang"])
    assert c["architectures"] == ["LlamaForCausalLMEagle3"]
    assert (c["model_type"], c["num_hidden_layers"], c["tie_word_embeddings"]) == (
        "llama",
        1,
        False,
    )
    assert (c["vocab_size"], c["draft_vocab_size"], c["target_hidden_size"]) == (
        TINY_VOCAB,
        DRAFT_VOCAB,
        64,
    )
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
    ):
        assert key in c, key


def test_vllm_config_is_speculators_eagle3(env):
    c = config_of(env["out"]["vllm"])
    assert c["speculators_model_type"] == "eagle3" and c["architectures"] == ["Eagle3Speculator"]
    assert (c["draft_vocab_size"], c["target_hidden_size"]) == (DRAFT_VOCAB, 64)
    layer = c["transformer_layer_config"]
    assert (layer["model_type"], layer["num_hidden_layers"], layer["vocab_size"]) == (
        "llama",
        1,
        TINY_VOCAB,
    )
    speculators = c["speculators_config"]
    assert speculators["algorithm"] == "eagle3"
    assert speculators["default_proposal_method"] == "greedy"
    assert speculators["proposal_methods"][0]["speculative_tokens"] == 3
    assert speculators["verifier"] == {
        "name_or_path": str(env["target_dir"]),
        "architectures": ["LlamaForCausalLM"],
    }


# ----------------------------------------------------------------------------- known traps


def test_rope_theta_is_written_beside_rope_parameters(env):
    # transformers 5 writes only rope_parameters; readers of rope_theta then use 10000 silently.
    for layer in (
        config_of(env["out"]["sglang"]),
        config_of(env["out"]["vllm"])["transformer_layer_config"],
    ):
        assert layer["rope_theta"] == ROPE["rope_theta"]
        assert layer["rope_parameters"] == ROPE
        assert layer["rope_scaling"] == {k: v for k, v in ROPE.items() if k != "rope_theta"}


def test_text_only_exports_write_no_mrope_field(env):
    # The M-RoPE fields are a VL draft's alone: a text-only export keeps exactly these keys.
    layer_keys = {
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "attention_bias",
        "mlp_bias",
        "tie_word_embeddings",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "torch_dtype",
        "dtype",
    }
    sglang = config_of(env["out"]["sglang"])
    assert set(sglang) == layer_keys | {
        "architectures",
        "draft_vocab_size",
        "target_hidden_size",
        "eagle_config",
    }
    assert set(config_of(env["out"]["vllm"])["transformer_layer_config"]) == layer_keys
    for fmt in ("sglang", "vllm", "draftforge"):
        assert not {k for k in all_keys(config_of(env["out"][fmt])) if "mrope" in k}


def test_torch_dtype_is_written(env):
    assert config_of(env["out"]["sglang"])["torch_dtype"] == "bfloat16"
    assert config_of(env["out"]["vllm"])["transformer_layer_config"]["torch_dtype"] == "bfloat16"
    assert config_of(env["out"]["draftforge"])["torch_dtype"] == "float32"


def test_no_ambiguous_norm_flags(env):
    assert not all_keys(config_of(env["out"]["sglang"])) & set(NORM_FLAGS)
    vllm = config_of(env["out"]["vllm"])
    # vLLM reads a missing norm_before_residual as True: ours is the un-normalised residual.
    assert vllm["norm_before_residual"] is False
    assert not all_keys(vllm) & set(NORM_FLAGS[1:])


def test_vllm_aux_ids_are_sglang_plus_one(env):
    sglang = config_of(env["out"]["sglang"])["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    vllm = config_of(env["out"]["vllm"])["eagle_aux_hidden_state_layer_ids"]
    assert vllm == [i + 1 for i in sglang]


def _mutations() -> list[tuple[str, str, object]]:
    def drop(key):
        return lambda c, t: c.get("transformer_layer_config", c).pop(key)

    def rename(old, new):
        return lambda c, t: t.__setitem__(new, t.pop(old))

    return [
        ("sglang", "rope_theta", drop("rope_theta")),
        ("vllm", "torch_dtype", drop("torch_dtype")),
        ("sglang", "norm_output", lambda c, t: c.update(norm_output=False)),
        ("vllm", "norm_before_residual", lambda c, t: c.pop("norm_before_residual")),
        ("sglang", "one layer off", lambda c, t: c.update(eagle_aux_hidden_state_layer_ids=AUX)),
        ("sglang", "unexpected ['model.fc.weight']", rename("fc.weight", "model.fc.weight")),
        (
            "vllm",
            "missing ['layers.0.hidden_norm.weight']",
            rename("layers.0.hidden_norm.weight", "midlayer.hidden_norm.weight"),
        ),
        (
            "sglang",
            "unexpected ['embed_tokens.weight']",
            lambda c, t: t.__setitem__(
                "embed_tokens.weight", torch.zeros(TINY_VOCAB, 64, dtype=torch.bfloat16)
            ),
        ),
        (
            "sglang",
            "wrong shapes: lm_head.weight",
            lambda c, t: t.__setitem__("lm_head.weight", t["lm_head.weight"][:-1]),
        ),
        ("vllm", "d2t is torch.int32", lambda c, t: t.__setitem__("d2t", t["d2t"].int())),
        ("sglang", "d2t and t2d disagree", lambda c, t: t["t2d"].__setitem__(0, ~t["t2d"][0])),
        (
            "sglang",
            "outside the target's 8 layers",
            lambda c, t: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[0, 2, 8]),
        ),
        (
            "vllm",
            "outside the target's 8 layers",
            lambda c, t: c.update(eagle_aux_hidden_state_layer_ids=[0, 3, 6]),
        ),
    ]


@pytest.mark.parametrize(("fmt", "needle", "mutate"), _mutations())
def test_check_refuses_bad_output(env, fmt, needle, mutate):
    state, _ = read_checkpoint(env["step"])
    info = read_target_info(str(env["target_dir"]))
    state.embedding = env["target"].embed_weight().detach()
    config, tensors = sglang_files(state) if fmt == "sglang" else vllm_files(state, info)
    check_export(fmt, config, tensors, info)  # as written, it passes
    mutate(config, tensors)
    with pytest.raises(DraftError, match=re.escape(needle)):
        check_export(fmt, config, tensors, info)


# ----------------------------------------------------------------------------- CLI and bad input


def test_cli_prints_serving_commands(env, tmp_path, capsys):
    out = tmp_path / "sg"
    assert main(["export", str(env["run"]), "--format", "sglang", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"--model-path {env['target_dir']}" in text
    assert f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {out}" in text
    assert (
        "--speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4"
        in text
    )
    assert '"eagle_aux_hidden_state_layer_ids": [1, 3, 6]' in text  # the speculators convert hint
    out = tmp_path / "vl"
    assert main(["export", str(env["step"]), "--format", "vllm", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"vllm serve {out}\n" in text
    assert f"vllm serve {env['target_dir']} --speculative-config" in text
    assert f'"method": "eagle3", "model": "{out}", "num_speculative_tokens": 3' in text


def test_cli_prints_a_tree_setting_for_sglang(env, tmp_path, capsys):
    out = tmp_path / "tree"
    args = ["export", str(env["run"]), "--format", "sglang", "--out", str(out)]
    assert main([*args, "--tree", "4", "8"]) == 0
    text = capsys.readouterr().out
    assert (
        "--speculative-num-steps 3 --speculative-eagle-topk 4 --speculative-num-draft-tokens 8"
        in text
    )
    # 3 levels of topk 2 hold at most 2 * 3 draft nodes under the root.
    bad = ["export", str(env["run"]), "--format", "sglang", "--out", str(tmp_path / "bad")]
    _fails_in_one_line(capsys, [*bad, "--tree", "2", "8"], "verifies 2 to 7 draft tokens")
    assert not (tmp_path / "bad").exists()


def _fails_in_one_line(capsys, args: list[str], needle: str) -> None:
    capsys.readouterr()  # drop what the setup printed (progress bars)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err


def test_unsupported_draft_type_fails_cleanly(env, tmp_path, capsys):
    medusa = lambda text: text.replace("arch: eagle3", "arch: medusa")  # noqa: E731
    run = save_run(tmp_path / "medusa_run", env["target_dir"], medusa)
    out = tmp_path / "out"
    args = ["export", str(run), "--format", "sglang", "--out", str(out)]
    _fails_in_one_line(capsys, args, "draft.arch 'medusa' cannot be exported")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["medusa_run"]


def test_failed_check_writes_nothing(env, tmp_path, capsys):
    # The same target with 4 layers: aux layer 5 is outside it.
    shallow = save_tiny_target(tmp_path / "shallow", num_hidden_layers=4, rope_parameters=ROPE)
    out = tmp_path / "out"
    args = [
        "export",
        str(env["run"]),
        "--format",
        "vllm",
        "--out",
        str(out),
        "--target",
        str(shallow),
    ]
    _fails_in_one_line(capsys, args, "outside the target's 4 layers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shallow"]


def test_older_run_config_still_exports(env, tmp_path):
    # Options outside target.* may change after a checkpoint is written; export reads only target.*.
    retired = lambda text: text.replace("training:\n", "training:\n  retired_option: 1\n")  # noqa: E731
    run = save_run(tmp_path / "old_run", env["target_dir"], retired)
    with pytest.raises(ConfigError, match="retired_option"):
        load_config(next((run / "checkpoints").iterdir()) / "config.yaml")
    out = export_checkpoint(run, "sglang", tmp_path / "out").out
    assert torch.equal(
        logits(load_draft(out, env["target"])),
        logits(load_draft(env["out"]["sglang"], env["target"])),
    )


def test_no_embedding_is_vllm_only(env, tmp_path):
    with pytest.raises(DraftError, match="vllm format only"):
        export_checkpoint(env["run"], "sglang", tmp_path / "o", include_embedding=False)


def test_damaged_checkpoint_is_refused(env, tmp_path):
    step = shutil.copytree(env["step"], tmp_path / f"step_{STEP:08d}")
    (step / checkpoint.WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        export_checkpoint(step, "sglang", tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- other trainers


def _full_vocab_draft(target) -> torch.nn.Module:
    draft = build_draft("eagle3", target.config, AUX, TINY_VOCAB)
    randomize(draft, seed=4)
    draft.load_target_embedding(target.embed_weight())
    return draft


def test_published_sglang_variants_load(env, tmp_path):
    """Drafts from other trainers: no d2t/t2d over the full vocabulary, a ``model.`` prefix,
    a pickled state dict, no eagle_config (the target's default layers)."""
    target = env["target"]
    draft = _full_vocab_draft(target)
    state = DraftState(
        config=draft.config,
        weights={k: v for k, v in draft.state_dict().items() if k != "embed_tokens.weight"},
    )
    config, tensors = sglang_files(state)
    del config["eagle_config"]
    tensors = {f"model.{k}": v for k, v in tensors.items() if k not in ("d2t", "t2d")}
    directory = tmp_path / "published"
    directory.mkdir()
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    torch.save(tensors, directory / "pytorch_model.bin")
    loaded = load_draft(directory, target)
    assert loaded.config.eagle_config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert torch.equal(loaded.d2t, torch.zeros(TINY_VOCAB, dtype=torch.long))
    assert bool(loaded.t2d.all())
    expected = build_draft_module(
        DraftState(
            config=loaded.config,
            weights={k: v.bfloat16().float() for k, v in state.weights.items()},
        ),
        target,
    )
    assert torch.equal(logits(loaded), logits(expected))


def test_head_shared_with_the_target_loads(env, tmp_path):
    """SGLang takes lm_head from the target when draft_vocab_size is unset."""
    target = env["target"]
    draft = _full_vocab_draft(target)
    weights = {
        k: v
        for k, v in draft.state_dict().items()
        if k not in ("embed_tokens.weight", "lm_head.weight", "d2t", "t2d")
    }
    config, _ = sglang_files(DraftState(config=draft.config, weights={}))
    config["draft_vocab_size"] = None
    directory = tmp_path / "shared_head"
    directory.mkdir()
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, directory / WEIGHTS_FILE)
    loaded = load_draft(directory, target)
    assert torch.equal(loaded.lm_head.weight, target.lm_head()[0])
    with pytest.raises(DraftError, match="no lm_head"):
        load_draft(directory)


def test_unknown_variants_are_refused(env, tmp_path):
    # Drafts from other trainers: no provenance file, so the variant check itself must speak.
    base = env["out"]["sglang"]
    biased = shutil.copytree(base, tmp_path / "biased")
    (biased / PROVENANCE_FILE).unlink()
    tensors = load_file(biased / WEIGHTS_FILE)
    tensors["fc.bias"] = torch.zeros(64, dtype=torch.bfloat16)
    save_file(tensors, biased / WEIGHTS_FILE)
    with pytest.raises(DraftError, match=r"unexpected \['fc.bias'\]"):
        load_draft(biased, env["target"])
    post_norm = shutil.copytree(env["out"]["vllm"], tmp_path / "post_norm")
    (post_norm / PROVENANCE_FILE).unlink()
    config = config_of(post_norm)
    config["norm_before_residual"] = True
    (post_norm / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DraftError, match="norm_before_residual"):
        load_draft(post_norm)


# ----------------------------------------------------------------------------- a trained run


def test_export_after_real_training(tmp_path):
    target_dir = save_tiny_target(tmp_path / "target", num_hidden_layers=8)
    data = tmp_path / "data.jsonl"
    rng = random.Random(0)
    with data.open("w") as f:
        for _ in range(8):
            words = " ".join(rng.choice(["red", "green", "blue", "cyan"]) for _ in range(12))
            messages = [
                {"role": "user", "content": words},
                {"role": "assistant", "content": words[::-1]},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    run = tmp_path / "run"
    overrides = [
        f"target.path={target_dir}",
        f"target.cache_dir={tmp_path / 'cache'}",
        f"data.path={data}",
        "data.max_length=128",
        "data.num_workers=1",
        "data.eval_fraction=0",
        "draft.draft_vocab_size=64",
        "training.max_steps=2",
        "training.tokens_per_batch=128",
        "training.ttt_steps=2",
        f"output.dir={run}",
    ]
    assert main(["train", *overrides]) == 0
    out = tmp_path / "sglang"
    assert main(["export", str(run), "--format", "sglang", "--out", str(out)]) == 0
    target = load_target(TargetConfig(path=str(target_dir)))
    assert "rope_scaling" not in config_of(out)  # default RoPE, no M-RoPE: nothing to scale
    exported = load_draft(out, target)
    trained = load_draft(run, target)
    assert exported.config.eagle_config == trained.config.eagle_config
    assert torch.equal(exported.draft_ids(), trained.draft_ids())
    assert torch.allclose(
        logits(exported), logits(trained), atol=0.05 * logits(trained).abs().max()
    )


# ----------------------------------------------------------------------------- vision-language targets

VL_AUX = [0, 1, 2]  # the tiny Qwen2.5-VL's language model has 4 layers
VL_SECTION = [2, 3, 3]  # its M-RoPE: the 8 frequency pairs of a 16-wide head over t, h, w
VL_THETA = 10000.0
# What every reader must end up with for a Qwen2.5-VL draft (contiguous sections, not
# interleaved as Qwen3-VL's are).
VL_ROPE = {
    "rope_type": "default",
    "rope_theta": VL_THETA,
    "mrope_section": VL_SECTION,
    "mrope_interleaved": False,
}
# 3-row positions of text, a 2 x 3 image grid and text again, as Qwen2.5-VL places them.
VL_POSITIONS = torch.tensor(
    [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8],
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8],
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8],
    ]
)[:, None]


@pytest.fixture(scope="module")
def vl_env(tmp_path_factory):
    """A draft for the tiny Qwen2.5-VL target, built as train() builds it (from the language
    model's config, so it rotates by M-RoPE), checkpointed and exported in every format."""
    root = tmp_path_factory.mktemp("export_vl")
    target_dir = root / "target"
    processor = tiny_vl_processor()
    save_vl_checkpoint(tiny_vl_target(), processor, target_dir)
    run = save_run(root / "run", target_dir, aux=VL_AUX)
    target = load_target(TargetConfig(path=str(target_dir), aux_layers=VL_AUX))
    out = {
        fmt: export_checkpoint(run, fmt, root / f"out_{fmt}").out
        for fmt in ("sglang", "vllm", "draftforge")
    }
    step_dir = run / "checkpoints" / f"step_{STEP:08d}"
    return {"target_dir": target_dir, "step": step_dir, "target": target, "out": out}


def _engine_rope_views(layer: dict) -> dict[str, dict]:
    """The RoPE each reader builds the draft's rotary from, read the way its source reads
    the Llama part of the config (docs/architecture.md, "Exports for vision-language targets")."""
    scaling = layer.get("rope_scaling") or {}
    return {
        # llama_eagle3.py: M-RoPE iff rope_scaling holds mrope_section, rope_type forced to
        # default; llama.py: theta from the top-level rope_theta (10000 when missing).
        "sglang": {
            **scaling,
            "rope_type": "default" if "mrope_section" in scaling else scaling.get("rope_type"),
            "rope_theta": layer.get("rope_theta", 10000.0),
        },
        # vLLM's patch_rope_parameters under transformers 4: a rope_scaling replaces
        # rope_parameters, then rope_theta is patched in.
        "vllm_transformers4": {
            **(scaling or layer.get("rope_parameters") or {"rope_type": "default"}),
            "rope_theta": layer.get("rope_theta"),
        },
        # Under transformers 5: the config's standardised rope_parameters.
        "vllm_transformers5": dict(LlamaConfig.from_dict(copy.deepcopy(layer)).rope_parameters),
    }


def test_vl_draft_rotates_by_the_targets_mrope(vl_env):
    draft = load_draft(vl_env["step"], vl_env["target"])
    assert draft.mrope_section == VL_SECTION
    # The draft's own rope fields before export: mrope_section in rope_parameters only.
    assert draft.config.rope_parameters["mrope_section"] == VL_SECTION


def test_vl_sglang_config_fields(vl_env):
    c = config_of(vl_env["out"]["sglang"])
    assert c["architectures"] == ["LlamaForCausalLMEagle3"]
    assert c["rope_scaling"] == {k: v for k, v in VL_ROPE.items() if k != "rope_theta"}
    assert (c["rope_theta"], c["rope_parameters"]) == (VL_THETA, VL_ROPE)
    assert (c["vocab_size"], c["draft_vocab_size"], c["target_hidden_size"]) == (
        TINY_VOCAB,
        DRAFT_VOCAB,
        64,
    )
    assert c["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": VL_AUX}
    # Nothing image-specific: the engines take image tokens and positions from the target.
    assert not {k for k in all_keys(c) if "image" in k or "vision" in k}
    assert "embed_tokens.weight" not in load_file(vl_env["out"]["sglang"] / WEIGHTS_FILE)


def test_vl_vllm_config_fields(vl_env):
    c = config_of(vl_env["out"]["vllm"])
    layer = c["transformer_layer_config"]
    assert layer["rope_scaling"] == {k: v for k, v in VL_ROPE.items() if k != "rope_theta"}
    assert (layer["rope_theta"], layer["rope_parameters"]) == (VL_THETA, VL_ROPE)
    assert c["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in VL_AUX]
    assert (c["draft_vocab_size"], c["target_hidden_size"], c["norm_before_residual"]) == (
        DRAFT_VOCAB,
        64,
        False,
    )
    assert c["speculators_config"]["verifier"] == {
        "name_or_path": str(vl_env["target_dir"]),
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    }
    assert not {k for k in all_keys(c) if "image" in k or "vision" in k}
    # vLLM uses a draft's own embed_tokens when present: it is the language model's.
    embedding = load_file(vl_env["out"]["vllm"] / WEIGHTS_FILE)["embed_tokens.weight"]
    language_model = vl_env["target"].model.model.language_model
    assert torch.equal(embedding, language_model.embed_tokens.weight.detach().bfloat16())


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
def test_vl_engines_read_the_drafts_mrope(vl_env, fmt):
    c = config_of(vl_env["out"][fmt])
    layer = c.get("transformer_layer_config", c)
    for reader, rope in _engine_rope_views(layer).items():
        assert rope == VL_ROPE, reader


@pytest.mark.parametrize("fmt", ["sglang", "vllm", "draftforge"])
def test_vl_exports_load_back_with_the_same_rotary(vl_env, fmt):
    target = vl_env["target"]
    original = load_draft(vl_env["step"], target)
    exported = load_draft(vl_env["out"][fmt], None if fmt == "draftforge" else target)
    assert exported.mrope_section == VL_SECTION
    hidden = torch.zeros(1, 12, 64)
    for mine, theirs in zip(
        exported.rotary(hidden, VL_POSITIONS), original.rotary(hidden, VL_POSITIONS), strict=True
    ):
        assert torch.equal(mine, theirs)
    text_rope = target.model.model.language_model.rotary_emb(hidden, VL_POSITIONS)
    for mine, theirs in zip(exported.rotary(hidden, VL_POSITIONS), text_rope, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)
    # Logits at 3-row positions: exactly the checkpoint's draft at the export's precision,
    # and not what the draft gives at 1-D positions (the rows matter).
    expected = (
        logits(original, positions=VL_POSITIONS)
        if fmt == "draftforge"
        else logits(reference(vl_env, round_embedding=fmt == "vllm"), positions=VL_POSITIONS)
    )
    assert torch.equal(logits(exported, positions=VL_POSITIONS), expected)
    assert not torch.allclose(logits(exported, positions=VL_POSITIONS), logits(exported))


def _vl_mutations() -> list[tuple[str, str, object]]:
    def layer(c):
        return c.get("transformer_layer_config", c)

    return [
        ("sglang", "would rotate by 1-D positions", lambda c: c.pop("rope_scaling")),
        (
            "vllm",
            "would rotate by 1-D positions",
            lambda c: layer(c)["rope_scaling"].pop("mrope_section"),
        ),
        (
            "sglang",
            "would rotate by 1-D positions",
            lambda c: c["rope_scaling"].update(mrope_interleaved=True),
        ),
        (
            "vllm",
            "SGLang rotates M-RoPE drafts with rope_type default",
            lambda c: layer(c)["rope_parameters"].update(rope_type="linear", factor=2.0),
        ),
        (
            "sglang",
            "the draft rotates by mrope_section None, the target's language model by [2, 3, 3]",
            lambda c: [c.pop("rope_scaling"), c["rope_parameters"].pop("mrope_section")],
        ),
    ]


@pytest.mark.parametrize(("fmt", "needle", "mutate"), _vl_mutations())
def test_check_refuses_a_vl_export_that_would_rotate_otherwise(vl_env, fmt, needle, mutate):
    state, _ = read_checkpoint(vl_env["step"])
    info = read_target_info(str(vl_env["target_dir"]))
    state.embedding = vl_env["target"].embed_weight().detach()
    config, tensors = sglang_files(state) if fmt == "sglang" else vllm_files(state, info)
    check_export(fmt, config, tensors, info)  # as written, it passes
    mutate(config)
    with pytest.raises(DraftError, match=re.escape(needle)):
        check_export(fmt, config, tensors, info)


def test_a_vl_draft_is_refused_for_a_text_target(vl_env, env, tmp_path, capsys):
    args = ["export", str(vl_env["step"]), "--format", "sglang", "--out", str(tmp_path / "o")]
    _fails_in_one_line(
        capsys,
        [*args, "--target", str(env["target_dir"])],
        "the draft rotates by mrope_section [2, 3, 3], the target's language model by None",
    )
    assert not (tmp_path / "o").exists()
