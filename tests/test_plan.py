import json
from pathlib import Path

import pytest
import torch

from draftforge.plan import STAGES, Split, Workload, draft_params, predict
from draftforge.plan_shapes import TargetShape, count_target_params, load_text_config, meta_target
from draftforge.plan_table import Node, config_table, smallest, splits
from draftforge.testing import tiny_config, tiny_target

CONFIGS = Path(__file__).parents[1] / "benchmarks" / "model_configs"
H100, H200 = Node(8, 80e9), Node(8, 141e9)

# Published totals, to the digits they are published with: model cards (Llama 3.1 8B/70B,
# Qwen3, gpt-oss: OpenAI's card gives 20.91B and 116.83B, DeepSeek-V3: 671B without its MTP
# module), else the Hugging Face model page's size (Llama-3.1-405B 406B, Kimi-K2-Instruct
# 1.03T, Llama-4 Maverick 402B and Scout 109B: whole multimodal checkpoints).
PUBLISHED = {  # total, and the unit of its last published digit
    "llama-3.1-8b": (8.03e9, 1e7),
    "llama-3.3-70b": (70.55e9, 1e7),
    "llama-3.1-405b": (406e9, 1e9),
    "qwen3-8b": (8.19e9, 1e7),
    "qwen3-30b-a3b": (30.53e9, 1e7),
    "qwen3-235b-a22b": (235.09e9, 1e7),
    "gpt-oss-20b": (20.91e9, 1e7),
    "gpt-oss-120b": (116.83e9, 1e7),
    "deepseek-v3": (671e9, 1e9),
    "kimi-k2": (1.03e12, 1e10),
    "llama-4-scout-17b-16e": (109e9, 1e9),
    "llama-4-maverick-17b-128e": (402e9, 1e9),
}


def _whole_checkpoint_params(name: str) -> int:
    """Parameters of the whole published checkpoint: Llama-4's multimodal class (text model,
    vision tower and projector), else the causal LM."""
    config = load_text_config(CONFIGS / f"{name}.json")
    if config.model_type != "llama4":
        return count_target_params(config)
    from transformers import Llama4ForConditionalGeneration

    with torch.device("meta"):
        model = Llama4ForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_configs_have_their_published_sizes(name):
    published, unit = PUBLISHED[name]
    # Within 1e-3, or within the rounding of a figure published with fewer digits.
    assert abs(_whole_checkpoint_params(name) - published) <= max(1e-3 * published, unit / 2)


def _hand_count(raw: dict) -> int:
    """A published config's text-model parameter count by hand, from its family's structure:
    the naive reference for the meta-device count."""
    c = raw.get("text_config", raw)
    h, vocab, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kv, hd = c.get("num_key_value_heads", heads), c.get("head_dim", h // heads)
    total = 2 * vocab * h + h + layers * 2 * h  # embedding, head, final and per-layer norms
    if raw["architectures"] == ["DeepseekV3ForCausalLM"]:  # MLA, dense then MoE layers
        qk, ranks = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["q_lora_rank"]
        q = h * ranks + ranks + ranks * heads * qk
        kv_ = h * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) + c["kv_lora_rank"]
        kv_ += c["kv_lora_rank"] * heads * (c["qk_nope_head_dim"] + c["v_head_dim"])
        attention = q + kv_ + heads * c["v_head_dim"] * h
        experts, inter = c["n_routed_experts"], c["moe_intermediate_size"]
        # The router's e_score_correction_bias is a buffer in transformers, not a parameter.
        moe = (experts + c["n_shared_experts"]) * 3 * h * inter + experts * h
        dense = c["first_k_dense_replace"]
        return (
            total
            + layers * attention
            + dense * 3 * h * c["intermediate_size"]
            + (layers - dense) * moe
        )
    attention = 2 * h * heads * hd + 2 * h * kv * hd
    if raw["architectures"] == ["GptOssForCausalLM"]:  # biases, sinks, experts with biases
        experts, inter = c["num_local_experts"], c["intermediate_size"]
        attention += heads * hd + 2 * kv * hd + h + heads
        moe = experts * (3 * h * inter + 2 * inter + h) + experts * h + experts
        return total + layers * (attention + moe)
    if c.get("model_type") == "llama4_text":  # every step-th layer MoE, the others dense
        moe_layers = len(
            range(c["interleave_moe_layer_step"] - 1, layers, c["interleave_moe_layer_step"])
        )
        experts, inter = c["num_local_experts"], c["intermediate_size"]
        moe = (experts + 1) * 3 * h * inter + experts * h
        dense = 3 * h * c["intermediate_size_mlp"]
        return total + layers * attention + moe_layers * moe + (layers - moe_layers) * dense
    return total + layers * (attention + 3 * h * c["intermediate_size"])  # Llama


@pytest.mark.parametrize(
    "name", ["kimi-k2", "llama-4-maverick-17b-128e", "gpt-oss-120b", "llama-3.1-405b"]
)
def test_new_configs_count_exactly_what_their_architecture_holds(name):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    assert count_target_params(load_text_config(CONFIGS / f"{name}.json")) == _hand_count(raw)


def test_a_model_type_transformers_lacks_is_read_by_its_architecture():
    config = load_text_config(CONFIGS / "kimi-k2.json")
    assert config.model_type == "deepseek_v3" and config.n_routed_experts == 384


def test_parameter_counts_are_exact(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(tiny_config("qwen3_moe").to_json_string())
    config = load_text_config(path)
    assert count_target_params(config) == sum(
        p.numel() for p in tiny_target("qwen3_moe").parameters()
    )


def test_draft_parameter_count_matches_the_module():
    from draftforge.models import build_draft

    config = tiny_config("llama")
    draft = build_draft("eagle3", config, [0, 1, 2], 100)
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in draft.parameters() if not p.requires_grad)
    assert draft_params(config, 100) == (trainable, frozen)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3", "llama4", "gpt_oss"])
@pytest.mark.parametrize("dp,tp", [(2, 2), (4, 1), (1, 4)])
def test_shard_sizes_are_what_the_loader_builds(family, dp, tp):
    """Rank 0's elements after the model's own tensor-parallel plan and draftforge's FSDP2
    sharding (as the sharded loader lays a target out), on a fake 4-rank process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    from draftforge.parallel import Layout, shard_target
    from draftforge.target import decoder_layers, decoder_module

    config = tiny_config(family)
    model = meta_target(config)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dp * tp)
    try:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        if tp > 1:
            plan, _, _ = model._resolve_parallel_plans(
                DistributedConfig(tp_size=tp, tp_plan="auto")
            )
            apply_tensor_parallelism(model, mesh["tp"], plan)
        layout = Layout(0, dp * tp, dp, 0, tp, torch.device("cpu"), mesh)
        shard_target(model, layout, decoder_module(model), decoder_layers(model))
        held = sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters()
        )
    finally:
        dist.destroy_process_group()
    shape = TargetShape.of(config)
    assert held == sum(w.local(tp, dp, True) for w in shape.weights)
    assert held < shape.params


def test_tensor_parallelism_splits_only_what_the_plan_splits():
    """DeepSeek-V3's plan leaves MLA attention whole on every tp rank; gpt-oss's splits only
    the embedding and the head, so its experts stay whole."""
    w = Workload()
    for name, whole_share in (("deepseek-v3", 0.01), ("gpt-oss-120b", 0.98)):
        shape = TargetShape.of(load_text_config(CONFIGS / f"{name}.json"))
        tp8 = predict(shape, "load", Split(tp=8), w).parts["target"]
        assert tp8 > whole_share * w.weight_bytes * shape.params
        assert tp8 > w.weight_bytes * shape.params / 8


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-30b-a3b", "deepseek-v3"])
def test_peaks_shrink_as_the_world_grows(name):
    """More ranks never raise a peak: dp under FSDP of the target (from one rank) or of both
    (from two: FSDP of the draft gathers it whole, so one rank can hold less than two), tp."""
    shape = TargetShape.of(load_text_config(CONFIGS / f"{name}.json"))
    for w in (Workload(), Workload.cpu(tokens=512)):
        for stage in STAGES:
            for fsdp, sizes in (("target", (1, 2, 4, 8, 16)), ("both", (2, 4, 8, 16))):
                peaks = [predict(shape, stage, Split(1, dp, fsdp), w).total for dp in sizes]
                assert peaks == sorted(peaks, reverse=True), (stage, fsdp, peaks)
            if stage != "offline":
                peaks = [predict(shape, stage, Split(tp), w).total for tp in (1, 2, 4, 8)]
                assert peaks == sorted(peaks, reverse=True), (stage, peaks)
    offline = {predict(shape, "offline", Split(1, dp), Workload()).total for dp in (1, 8)}
    assert len(offline) == 1  # offline training never holds the target: no layout changes it


def test_fsdp_holds_a_share_of_the_decoder_and_the_whole_head():
    """Under FSDP a rank holds 1/dp of the decoder and the whole head (outside the decoder)."""
    shape = TargetShape.of(load_text_config(CONFIGS / "qwen3-235b-a22b.json"))
    w = Workload()
    whole, head = w.weight_bytes * shape.params, w.weight_bytes * shape.head_numel
    for dp in (2, 8, 32):
        parts = predict(shape, "load", Split(1, dp, "target"), w).parts
        assert (whole - head) / dp + head <= parts["target"] <= 1.001 * ((whole - head) / dp + head)


def test_the_table_names_the_smallest_fitting_layout():
    w = Workload()
    shape = TargetShape.of(load_text_config(CONFIGS / "llama-3.1-8b.json"))
    assert smallest(shape, "online", w, H100, 64).split.world == 1
    big = TargetShape.of(load_text_config(CONFIGS / "llama-3.3-70b.json"))
    found = smallest(big, "online", w, H100, 64)
    assert found.split.world > 1 and found.total <= 0.9 * H100.memory
    for split in splits(big, "online", found.split.world // 2, H100):
        assert predict(big, "online", split, w).total > 0.9 * H100.memory
    text = config_table(CONFIGS / "llama-3.1-405b.json", w, [H100, H200], 256)
    assert "online" in text and "nodes" in text
