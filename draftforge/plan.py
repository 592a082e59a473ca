"""Per-GPU memory plan for online EAGLE-3 training, from a target's config.json alone.

Parameter counts are exact: the target is built on the meta device (no weights, no memory).
The rest is arithmetic with the assumptions stated next to each term; the estimate is meant
for choosing a layout (how many GPUs, TP or FSDP), not for the last gigabyte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
BF16, FP32 = 2, 4


@dataclass
class Plan:
    """Bytes per GPU for one layout."""

    layout: str
    size: int
    target: float
    draft: float
    activations: float

    @property
    def total(self) -> float:
        return self.target + self.draft + self.activations


def load_text_config(path: str | Path):  # noqa: ANN201 (a transformers PretrainedConfig)
    from transformers import AutoConfig

    raw = json.loads(Path(path).read_text())
    return AutoConfig.for_model(**raw)


def count_target_params(config: object) -> int:
    """Exact parameter count of the target, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def draft_params(text: object, draft_vocab: int) -> tuple[int, int]:
    """(trainable, frozen) parameters of the EAGLE-3 draft for this target."""
    h = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    hd = getattr(text, "head_dim", None) or h // heads
    inter = getattr(text, "intermediate_size", None) or 4 * h
    attention = 2 * h * (heads + 2 * kv) * hd + heads * hd * h
    trainable = 3 * h * h + attention + 3 * h * inter + 4 * h + h * draft_vocab
    return trainable, text.vocab_size * h


def ttt_activation_bytes(text: object, tokens: int, steps: int, draft_vocab: int) -> float:
    """Saved tensors of the K-step unroll at bf16 autocast, plus the fp32 teacher.

    Per step: the attention input cat[embed, hidden] (2H), q/k/v/attention output, the
    residual stream and norms (~4H), the MLP's gate/up/activation (3I), and the fp32 draft
    logits and log-probabilities (2 x Vd x 4 bytes). No T x T tensor is kept (fused attention).
    """
    h = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    hd = getattr(text, "head_dim", None) or h // heads
    inter = getattr(text, "intermediate_size", None) or 4 * h
    per_step = BF16 * tokens * (2 * h + 2 * heads * hd + 2 * kv * hd + 4 * h + 3 * inter)
    per_step += 2 * FP32 * tokens * draft_vocab
    teacher = FP32 * tokens * draft_vocab + BF16 * tokens * 3 * h
    return steps * per_step + teacher


def target_forward_bytes(text: object, tokens: int, logit_chunk_mb: int = 64) -> float:
    """Transient memory of the frozen target's forward (no grad): a few layer-sized buffers,
    the three captured aux states, and one chunk of full-vocabulary logits."""
    h = text.hidden_size
    inter = getattr(text, "moe_intermediate_size", None) or getattr(
        text, "intermediate_size", 4 * h
    )
    return BF16 * tokens * (4 * h + 2 * inter + 3 * h) + logit_chunk_mb * 2**20


def layout_plan(
    config: object,
    params: int,
    *,
    tp: int = 1,
    dp: int = 1,
    fsdp: str = "none",
    tokens: int = 4096,
    steps: int = 7,
    draft_vocab: int = 32000,
    weight_bytes: int = BF16,
    label: str = "",
) -> Plan:
    """Bytes per GPU of one layout of online training: ``tp`` ranks split each target layer,
    ``dp`` groups read their own batches, and ``fsdp`` (``parallel.fsdp``) says what FSDP2
    shards over the ``dp`` ranks. ``params`` is the target's parameter count
    (:func:`count_target_params`); ``weight_bytes`` its bytes per weight."""
    text = config.get_text_config()
    target_bytes = weight_bytes * params / tp
    trainable, frozen = draft_params(text, min(draft_vocab, text.vocab_size))
    # Draft state: fp32 master weights, fp32 grads and two fp32 Adam moments (16 B/param),
    # plus bf16 compute copies; the frozen embedding is bf16.
    draft_state = 16 * trainable
    draft_compute = BF16 * (trainable + frozen)
    acts = ttt_activation_bytes(text, tokens, steps, draft_vocab) + target_forward_bytes(
        text, tokens
    )
    if fsdp in ("target", "both") and dp > 1:
        # Sharded over the dp ranks; one target layer is gathered at a time.
        target_bytes = target_bytes / dp + target_bytes / text.num_hidden_layers
    if fsdp in ("draft", "both"):
        draft_state /= dp
    return Plan(label or f"tp{tp}dp{dp}", tp * dp, target_bytes, draft_state + draft_compute, acts)


def plan_layouts(
    config: object, sizes: list[int], tokens: int = 4096, steps: int = 7, draft_vocab: int = 32000
) -> list[Plan]:
    """Per-GPU bytes for TP and FSDP layouts of each size: the target split ``size`` ways by
    tensor parallelism (the draft replicated), or target and draft FSDP-sharded."""
    params = count_target_params(config)
    shape = {"tokens": tokens, "steps": steps, "draft_vocab": draft_vocab}
    plans = []
    for size in sizes:
        plans.append(layout_plan(config, params, tp=size, label="tp", **shape))
        plans.append(layout_plan(config, params, dp=size, fsdp="both", label="fsdp", **shape))
    return plans


def format_plan(name: str, config: object, plans: list[Plan], tokens: int) -> str:
    text = config.get_text_config()
    lines = [
        f"{name}: {count_target_params(config) / 1e9:.1f}B params, {text.num_hidden_layers} layers, "
        f"hidden {text.hidden_size}, vocab {text.vocab_size}; {tokens} tokens per micro-batch",
        f"{'layout':>8} {'GPUs':>5} {'target':>9} {'draft+opt':>10} {'activ.':>8} {'total GiB':>10}",
    ]
    for p in plans:
        lines.append(
            f"{p.layout:>8} {p.size:>5} {p.target / GIB:>9.1f} {p.draft / GIB:>10.1f} "
            f"{p.activations / GIB:>8.1f} {p.total / GIB:>10.1f}"
        )
    return "\n".join(lines)
