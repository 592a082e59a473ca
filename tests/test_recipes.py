"""The recipes in configs/: each loads and validates, its target (built on the meta device from
the config.json stored under benchmarks/model_configs/, no weights) has the published sizes,
and the draft configs the exports would write carry the target's shapes, RoPE, vocabulary
and aux layers in each engine's numbering. The memory each recipe states is what
draftforge plan computes for its layout."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from draftforge.config import load_config
from draftforge.drafts import (
    Dims,
    DraftState,
    draft_aux_layers,
    parse_sglang_config,
    parse_speculators_config,
    tensor_shapes,
)
from draftforge.export import sglang_files, vllm_files
from draftforge.models import build_draft
from draftforge.models.eagle3 import eagle3_config_for_target
from draftforge.plan import GIB, count_target_params, layout_plan, load_text_config
from draftforge.target import TargetInfo, aux_problem, decoder_layers, default_aux_layers

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
MODEL_CONFIGS = ROOT / "benchmarks" / "model_configs"

# From the targets' published config.json: layers, hidden, heads, kv heads, the draft's
# head_dim (hidden / heads for DeepSeek's latent attention), intermediate size, vocabulary,
# max positions, RoPE theta and type, and the parameter count in billions.
PUBLISHED = {
    "llama-3.1-8b": (32, 4096, 32, 8, 128, 14336, 128256, 131072, 500000.0, "llama3", 8.03),
    "qwen3-8b": (36, 4096, 32, 8, 128, 12288, 151936, 40960, 1e6, "default", 8.19),
    "qwen3-30b-a3b": (48, 2048, 32, 4, 128, 6144, 151936, 40960, 1e6, "default", 30.53),
    "gpt-oss-20b": (24, 2880, 64, 8, 64, 2880, 201088, 131072, 150000.0, "yarn", 20.91),
    "llama-4-scout-17b-16e": (
        *(48, 5120, 40, 8, 128, 8192, 202048, 10485760, 500000.0, "llama3", 107.77),
    ),
    "deepseek-v3": (61, 7168, 128, 128, 56, 18432, 129280, 163840, 10000.0, "yarn", 671.03),
}
GPUS = {"8x H100 80GB": 80e9 / GIB, "8x H200 141GB": 141e9 / GIB}


def _comments(recipe: Path) -> str:
    """The recipe's leading comments as one line of text."""
    lines = recipe.read_text().splitlines()
    return " ".join(line.lstrip("#").strip() for line in lines if line.startswith("#"))


def test_there_is_a_recipe_per_target_with_its_config_json():
    assert {r.stem for r in RECIPES} == set(PUBLISHED)
    for recipe in RECIPES:
        assert (MODEL_CONFIGS / f"{recipe.stem}.json").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_loads_validates_and_documents_its_run(recipe: Path):
    cfg = load_config(recipe)
    cfg.validate()
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.target.path)  # a hub id
    text = _comments(recipe)
    for step in ("draftforge regenerate", "--backend http", "--url", "--model", "torchrun"):
        assert step in text, f"{recipe.name} does not show {step!r}"
    assert "sglang.launch_server" in text or "vllm serve" in text
    assert "estimate, not a measurement" in text
    if "qwen3" in recipe.stem:
        assert cfg.data.chat_template_kwargs == {"enable_thinking": True}
    # The torchrun line's world size fits parallel.tp and the global batch.
    nodes = re.search(r"--nnodes (\d+)", text)
    world = int(re.search(r"--nproc-per-node (\d+)", text)[1]) * (int(nodes[1]) if nodes else 1)
    assert world % cfg.parallel.tp == 0
    assert cfg.training.micro_batches_per_step % (world // cfg.parallel.tp) == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_stated_memory_is_the_plan_for_the_recipe_layout(recipe: Path):
    cfg = load_config(recipe)
    text = _comments(recipe)
    nodes = re.search(r"--nnodes (\d+)", text)
    world = int(re.search(r"--nproc-per-node (\d+)", text)[1]) * (int(nodes[1]) if nodes else 1)
    config = load_text_config(MODEL_CONFIGS / f"{recipe.stem}.json")
    plan = layout_plan(
        config,
        count_target_params(config),
        tp=cfg.parallel.tp,
        dp=world // cfg.parallel.tp,
        fsdp=cfg.parallel.fsdp,
        tokens=cfg.training.tokens_per_batch,
        steps=cfg.training.ttt_steps,
        draft_vocab=cfg.draft.draft_vocab_size,
    )
    stated = re.search(r"(\d+\.\d) GiB per GPU \(target (\d+\.\d)", text)
    assert stated, f"{recipe.name} states no memory per GPU"
    assert (float(stated[1]), float(stated[2])) == (
        round(plan.total / GIB, 1),
        round(plan.target / GIB, 1),
    )
    gpu = next(memory for name, memory in GPUS.items() if name in text)
    assert plan.total / GIB < gpu


def _target_on_meta(name: str) -> tuple[object, torch.nn.Module]:
    config = load_text_config(MODEL_CONFIGS / f"{name}.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, model


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_exported_draft_configs_match_the_target(recipe: Path):
    cfg = load_config(recipe)
    config, model = _target_on_meta(recipe.stem)
    text = config.get_text_config()
    layers, hidden, heads, kv, head_dim, inter, vocab, positions, theta, rope, billions = PUBLISHED[
        recipe.stem
    ]
    # The target as built: the published sizes, and the decoder layers aux hooks attach to.
    assert len(decoder_layers(model)) == text.num_hidden_layers == layers
    assert tuple(model.get_input_embeddings().weight.shape) == (vocab, hidden)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions

    aux = cfg.target.aux_layers or default_aux_layers(layers)
    assert aux == [1, layers // 2 - 1, layers - 4]
    assert aux_problem(aux, layers) is None
    draft_vocab = cfg.draft.draft_vocab_size
    draft = eagle3_config_for_target(text, aux, draft_vocab, cfg.draft.intermediate_size)
    with torch.device("meta"):
        module = build_draft("eagle3", text, aux, draft_vocab, cfg.draft.intermediate_size)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == tensor_shapes(Dims.of(draft))

    sglang, _ = sglang_files(DraftState(draft, {}))
    info = TargetInfo(cfg.target.path, layers, vocab, hidden, list(config.architectures))
    speculators, _ = vllm_files(DraftState(draft, {}), info)
    for written in (sglang, speculators["transformer_layer_config"]):
        assert (
            written["hidden_size"],
            written["num_attention_heads"],
            written["num_key_value_heads"],
            written["head_dim"],
            written["intermediate_size"],
            written["vocab_size"],
            written["max_position_embeddings"],
            written["rope_theta"],
            written["rope_parameters"]["rope_type"],
            written["num_hidden_layers"],
        ) == (hidden, heads, kv, head_dim, inter, vocab, positions, theta, rope, 1)
        assert written["rms_norm_eps"] == text.rms_norm_eps
        scaling = written.get("rope_scaling")
        assert (scaling is None) == (rope == "default")
        if scaling:  # the target's own scaling, every field of it
            target_rope = dict(text.rope_parameters)
            assert {k: target_rope[k] for k in scaling} == scaling
    for written in (sglang, speculators):
        assert (written["draft_vocab_size"], written["target_hidden_size"]) == (
            min(draft_vocab, vocab),
            hidden,
        )
    # SGLang: "output of layer i"; vLLM/speculators: hidden_states indices, one more.
    assert sglang["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == aux
    assert speculators["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in aux]
    assert speculators["speculators_config"]["verifier"]["name_or_path"] == cfg.target.path
    # Reading either back gives the same draft, aux layers in draftforge's numbering.
    for parsed in (
        parse_sglang_config(sglang, "sglang"),
        parse_speculators_config(speculators, "vllm"),
    ):
        assert Dims.of(parsed) == Dims.of(draft)
        assert draft_aux_layers(parsed) == aux
