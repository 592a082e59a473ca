"""Tiny random targets, an offline tokenizer and hand-built drafts, for tests and benchmarks.

Every family is a real transformers model class with a few small layers, so tests exercise
the same code paths as a full-size target in milliseconds.

A random untrained draft is almost always rejected, which leaves long accepted paths and
cache compaction untested. :func:`bigram_like_target` makes the target nearly a bigram model
(a scaled-up embedding dominates the residual stream, a scaled-up head makes it confident;
its attention still matters near ties), and :func:`oracle_draft` computes, by construction,
what such a target predicts from the current token alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from draftforge import checkpoint
from draftforge.config import Config, dump_config
from draftforge.data.vision import VisionProcessor
from draftforge.models.eagle3 import Eagle3Draft, eagle3_config_for_target
from draftforge.target import Target, decoder_module

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 320  # 256 byte tokens + the specials, rounded up

_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
_MOE: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

# family -> (config class name, model class name, config overrides)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_MOE, "num_experts": 4}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    # Multi-head latent attention: the rotary part of a head is qk_rope_head_dim wide.
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            **_MOE,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "head_dim": 8,
        },
    ),
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 128},
    ),
    # YaRN RoPE and sliding-window layers.
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 64,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            },
        },
    ),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": 64}),
}


def tiny_config(family: str = "llama", **overrides: Any):  # noqa: ANN201 (a PretrainedConfig)
    """A small random-weights config of a real HF family; ``overrides`` win."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(FAMILIES)}")
    config_cls, _, extra = FAMILIES[family]
    kwargs = {**_COMMON, **extra, **overrides}
    return getattr(transformers, config_cls)(**kwargs)


def tiny_target(family: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random causal LM in fp32 eval mode, deterministic for a given seed."""
    import transformers

    _, model_cls, _ = FAMILIES[family]
    config = tiny_config(family, **overrides)
    return _seeded(getattr(transformers, model_cls), config, seed)


def tiny_tokenizer():  # noqa: ANN201 (a PreTrainedTokenizerFast)
    """A byte-level tokenizer (one token per byte, no merges) with ChatML specials, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def save_tiny_target(
    directory: str | Path, family: str = "llama", seed: int = 0, **overrides: Any
) -> Path:
    """Write a tiny target and the tiny tokenizer as a normal HF model directory."""
    directory = Path(directory)
    tiny_target(family, seed, **overrides).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def save_vl_checkpoint(model: nn.Module, processor: VisionProcessor, directory: Path) -> Path:
    """Write a VL target as a checkpoint folder draftforge reads: weights, the processor's
    tokenizer and its image-processor settings."""
    model.save_pretrained(directory)
    processor.tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    return directory


# Qwen2.5-VL's placeholder tokens, in the tiny tokenizer after the ChatML specials.
VL_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# ChatML whose message content may be a list of parts: an image part is written the way
# Qwen2.5-VL's template writes it (start, one placeholder, end), a text part as its text.
VL_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Patches of 14 pixels merged 2 x 2, as in Qwen2.5-VL, on images of at most 112 x 112 pixels
# after resizing: at most 16 image tokens per image.
TINY_VL_MAX_PIXELS = 112 * 112


def tiny_vl_tokenizer():  # noqa: ANN201 (a PreTrainedTokenizerFast)
    """The tiny byte tokenizer plus Qwen2.5-VL's vision tokens and a ChatML template that
    writes image parts."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS + VL_SPECIAL_TOKENS})
    tokenizer.chat_template = VL_CHATML_TEMPLATE
    return tokenizer


def tiny_vl_processor() -> VisionProcessor:
    """The tiny VL tokenizer with Qwen2-VL's image processor (its Pillow backend: torchvision
    is not needed), resizing images to at most :data:`TINY_VL_MAX_PIXELS`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=TINY_VL_MAX_PIXELS, patch_size=14, merge_size=2
    )
    return VisionProcessor(tiny_vl_tokenizer(), image_processor, VL_CHATML_TEMPLATE)


def _qwen_vl_config(
    config_class: type, patch_size: int, mrope: dict[str, Any], **fields: Any
) -> Any:
    """A Qwen-VL config (2.5 or 3) over the tiny VL tokenizer's ids: M-RoPE splitting the 8
    rotary frequency pairs of a 16-wide head over t, h, w (``mrope`` adds the family's
    fields), a vision tower as deep as the language model (hooks found by depth alone would
    land on the wrong stack); ``fields``: ``text`` and ``vision`` entries of the family."""
    tokenizer = tiny_vl_tokenizer()
    start, end, image, video = tokenizer.convert_tokens_to_ids(VL_SPECIAL_TOKENS)
    text = {
        **_COMMON,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            **mrope,
        },
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **fields.get("text", {}),
    }
    vision = {
        "depth": text["num_hidden_layers"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text["hidden_size"],
        **fields.get("vision", {}),
    }
    return config_class(
        text_config=text,
        vision_config=vision,
        vision_start_token_id=start,
        vision_end_token_id=end,
        image_token_id=image,
        video_token_id=video,
    )


def _seeded(model_class: type, config: Any, seed: int) -> nn.Module:
    """``model_class(config)`` in fp32 eval mode, its random weights fixed by ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
    return model.float().eval()


def tiny_vl_config(**text_overrides: Any):  # noqa: ANN201 (a Qwen2_5_VLConfig)
    """A small Qwen2.5-VL config (:func:`_qwen_vl_config`); ``text_overrides`` change the
    language model's config."""
    from transformers import Qwen2_5_VLConfig

    # windows of 2 x 2 merged patches; blocks 1 and 3 attend fully
    vision = {"window_size": 56, "fullatt_block_indexes": [1, 3]}
    text = {"bos_token_id": None, **text_overrides}
    return _qwen_vl_config(Qwen2_5_VLConfig, 14, {}, text=text, vision=vision)


def tiny_vl_target(seed: int = 0, **text_overrides: Any) -> nn.Module:
    """A tiny random Qwen2_5_VLForConditionalGeneration in fp32 eval mode, deterministic for
    a given seed."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _seeded(Qwen2_5_VLForConditionalGeneration, tiny_vl_config(**text_overrides), seed)


def tiny_qwen3_vl_processor() -> VisionProcessor:
    """The tiny VL tokenizer with Qwen3-VL's image settings: 16-pixel patches merged 2 x 2
    (Qwen2-VL's Pillow image processor, which Qwen3-VL's checkpoints name too)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=32 * 32,
        max_pixels=128 * 128,
        patch_size=16,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return VisionProcessor(tiny_vl_tokenizer(), image_processor, VL_CHATML_TEMPLATE)


def tiny_qwen3_vl_target(seed: int = 0) -> nn.Module:
    """A tiny random Qwen3VLForConditionalGeneration in fp32 eval mode: interleaved M-RoPE
    (frequency pairs take the t, h, w rows in turn) and deepstack, where the vision tower's
    blocks 0 and 2 add their merged states into the language model's first two layers at the
    image tokens. The vision tower is as deep as the language model."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = {
        "num_position_embeddings": 64,  # an 8 x 8 grid of learned positions, interpolated
        "deepstack_visual_indexes": [0, 2],
    }
    config = _qwen_vl_config(Qwen3VLConfig, 16, {"mrope_interleaved": True}, vision=vision)
    return _seeded(Qwen3VLForConditionalGeneration, config, seed)


# Llama-4's image and chat tokens, in the tiny tokenizer after the ChatML specials.
LLAMA4_SPECIAL_TOKENS = [
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
]
# Llama-4's turn layout; an image part is written as ``<|image|>``, as its template does.
LLAMA4_TEMPLATE = (
    "{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|image|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)
# Tiles of 28 pixels cut into 14-pixel patches (2 x 2), pixel-shuffled by 0.5: one token per
# tile; at most 4 tiles, so an image is at most 5 tiles (with the whole image's) and tokens.
TINY_LLAMA4_TILE = 28


def tiny_llama4_processor() -> VisionProcessor:
    """The tiny byte tokenizer with Llama-4's image and chat tokens and template, and
    Llama-4's tiling (:class:`~draftforge.data.llama4_images.Llama4Tiles`) at tiny sizes."""
    from draftforge.data.llama4_images import Llama4Tiles
    from draftforge.data.vision import Llama4VisionProcessor

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": SPECIAL_TOKENS + LLAMA4_SPECIAL_TOKENS}
    )
    tokenizer.chat_template = LLAMA4_TEMPLATE
    tokenizer.eos_token = "<|eot|>"
    tiles = Llama4Tiles(tile=TINY_LLAMA4_TILE, max_patches=4)
    return Llama4VisionProcessor(tokenizer, tiles, LLAMA4_TEMPLATE, patches_per_tile=1)


def tiny_llama4_target(seed: int = 0) -> nn.Module:
    """A tiny random Llama4ForConditionalGeneration in fp32 eval mode: a mixture-of-experts
    language model with chunked attention in chunks of 16 tokens (its layer 3 attends fully,
    without RoPE), and a vision tower as deep, one token per 28-pixel tile."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    tokenizer = tiny_llama4_processor().tokenizer
    start, end, _, patch = tokenizer.convert_tokens_to_ids(LLAMA4_SPECIAL_TOKENS[:4])
    text = {
        **_COMMON,
        **FAMILIES["llama4"][2],
        "attention_chunk_size": 16,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": text["num_hidden_layers"],
        "num_attention_heads": 2,
        "intermediate_size": 128,  # the pixel-shuffled width: 32 / 0.5**2
        "image_size": TINY_LLAMA4_TILE,
        "patch_size": 14,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 32,
        "projector_output_dim": 32,
        "vision_output_dim": 32,
    }
    config = Llama4Config(
        text_config=text,
        vision_config=vision,
        boi_token_index=start,
        eoi_token_index=end,
        image_token_index=patch,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return _seeded(Llama4ForConditionalGeneration, config, seed)


WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def write_tiny_run(root: str | Path, conversations: int = 120, family: str = "llama") -> Path:
    """A tiny target with confident predictions plus a small conversation set, for training
    tests: ``root/target`` and ``root/data.jsonl``.

    Random layers barely move the residual stream, so the next-token argmax is mostly a
    function of the current token; a scaled-up head makes the teacher confident. A draft
    learns that in a few dozen steps, which is what training tests need to see.
    """
    import json
    import random

    root = Path(root)
    model = tiny_target(family)
    model.lm_head.weight.data *= 30
    model.save_pretrained(root / "target")
    tiny_tokenizer().save_pretrained(root / "target")
    rng = random.Random(0)
    with (root / "data.jsonl").open("w") as f:
        for _ in range(conversations):
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            answer = (
                " ".join(sorted(question.split())) + ". " + " ".join(WORDS[: rng.randint(2, 10)])
            )
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return root


def tiny_run_overrides(root: str | Path, out: str | Path, **extra: Any) -> list[str]:
    """``section.key=value`` overrides that train on :func:`write_tiny_run`'s files."""
    root = Path(root)
    settings: dict[str, Any] = {
        "target.path": root / "target",
        "target.aux_layers": "[0,1,2]",
        "target.cache_dir": root / "cache",
        "data.path": root / "data.jsonl",
        "data.max_length": 256,
        "data.num_workers": 1,
        "training.tokens_per_batch": 256,
        "draft.draft_vocab_size": 320,
        "training.lr": 3e-3,
        "training.warmup_steps": 2,
        "training.log_every": 5,
        "training.eval_every": 0,
        "training.save_every": 0,
        "output.dir": out,
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


def bigram_like_target(
    family: str = "llama",
    seed: int = 0,
    *,
    embed_scale: float = 3.0,
    head_scale: float = 30.0,
    dtype: torch.dtype = torch.float64,
    **overrides: object,
) -> nn.Module:
    """A tiny random target whose next token mostly depends on the current token only.

    float64 by default: greedy comparisons then never hinge on rounding between a one-token
    and a many-token forward.
    """
    model = tiny_target(family, seed, **overrides).to(dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(embed_scale)
        model.get_output_embeddings().weight.mul_(head_scale)
    model.generation_config.eos_token_id = None  # tests decode a fixed number of tokens
    return model


def chi_square_p(counts: Tensor, probs: Tensor) -> float:
    """p-value of observed counts against expected probabilities. Cells expected to hold
    fewer than 5 counts are pooled so the chi-square approximation holds; a count in a cell
    of probability zero returns 0."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return 0.0
    small = probs * n < 5
    counts = torch.cat([counts[~small], counts[small].sum()[None]])
    probs = torch.cat([probs[~small], probs[small].sum()[None]])
    expected = probs * n
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def save_draft(draft: nn.Module, target_dir: Path, run_dir: Path) -> Path:
    """A training-checkpoint run directory holding ``draft`` for the target at ``target_dir``."""
    cfg = Config()
    cfg.target.path = str(target_dir)
    weights = {k: v for k, v in draft.state_dict().items() if not k.startswith("embed_tokens.")}
    extra = {"config.yaml": dump_config(cfg), "draft_config.json": draft.config.to_json_string()}
    checkpoint.save_checkpoint(run_dir / "checkpoints", 10, weights, {}, extra)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


def as_target(model: nn.Module, aux_layers: list[int] | None = None) -> Target:
    """Wrap a tiny model with the tiny byte tokenizer; aux layers default to 0, 1, 2."""
    return Target(
        model=model, tokenizer=tiny_tokenizer(), aux_layers=aux_layers or [0, 1, 2], path="tiny"
    )


def oracle_draft(
    target: Target, draft_ids: Tensor | None = None, sharpness: float = 10.0
) -> Eagle3Draft:
    """A draft whose output at every step is the normalised embedding of its input token,
    read out by the target's own head (restricted to ``draft_ids``, default: all).

    How: query, key and value read the embedding half of the attention input; the query is
    scaled by ``sharpness`` so each index attends (almost) only to itself; the value also
    subtracts the normalised incoming hidden state, which cancels the residual of the
    previous step exactly (its RMS is the o_proj gain, 1). MLP and fc are zero.
    """
    config = eagle3_config_for_target(
        target.config,
        target.aux_layers,
        target.vocab_size if draft_ids is None else draft_ids.numel(),
    )
    hidden = config.hidden_size
    if config.num_attention_heads * config.head_dim != hidden:
        raise ValueError("oracle_draft needs num_attention_heads * head_dim == hidden_size")
    config.num_key_value_heads = config.num_attention_heads  # one value head per query head
    ids = torch.arange(target.vocab_size) if draft_ids is None else draft_ids
    dtype = target.model.dtype
    draft = Eagle3Draft(config).to(dtype)
    eye = torch.eye(hidden, dtype=dtype)
    head_weight, _ = target.lm_head()
    norm_weight = decoder_module(target.model).norm.weight
    with torch.no_grad():
        for param in draft.parameters():
            param.zero_()
        for norm in (draft.midlayer.input_layernorm, draft.midlayer.hidden_norm, draft.norm):
            norm.weight.fill_(1.0)
        draft.midlayer.post_attention_layernorm.weight.fill_(1.0)
        attn = draft.midlayer.self_attn
        attn.q_proj.weight[:, :hidden] = sharpness * eye
        attn.k_proj.weight[:, :hidden] = eye
        attn.v_proj.weight[:, :hidden] = eye
        attn.v_proj.weight[:, hidden:] = -eye
        attn.o_proj.weight.copy_(eye)
        draft.lm_head.weight.copy_(head_weight[ids] * norm_weight)
        draft.load_target_embedding(target.embed_weight())
    draft.set_vocab(ids)
    return draft.eval().requires_grad_(False)
