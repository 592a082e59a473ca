"""Tiny random targets and an offline tokenizer, for tests and benchmarks.

Every family is a real transformers model class with a few small layers, so tests exercise
the same code paths as a full-size target in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config)
    return model.float().eval()


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
