"""What a target's memory depends on, read from its config.json alone.

Parameter counts and shapes are exact: the target is built on the meta device (no weights, no
memory). Which weights tensor parallelism splits, and along which dimension, comes from the
model's own tensor-parallel plan, as the sharded loader applies it
(:mod:`draftforge.target_load`): for DeepSeek-V3 and Kimi-K2 the plan splits the MLPs and
experts but leaves the MLA attention whole on every tp rank; for gpt-oss it splits only the
embedding and the head. FSDP2 splits dim 0 of every decoder weight (the embedding and final
norm included, :func:`draftforge.parallel.shard_target`) over the dp ranks, after tensor
parallelism; the head stays whole. The EAGLE-3 draft is built on the meta device too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT, OUTSIDE = -1, -2  # Weight.layer of the decoder's own weights / of the head and the rest


def load_text_config(path: str | Path):  # noqa: ANN201 (a transformers PretrainedConfig)
    """A config.json as transformers' config class. A ``model_type`` transformers does not
    know (Kimi-K2's ``kimi_k2``, served by remote code) is read as the model type of the class
    its ``architectures`` names (``DeepseekV3ForCausalLM``)."""
    from transformers import AutoConfig

    raw = json.loads(Path(path).read_text())
    try:
        return AutoConfig.for_model(**raw)
    except ValueError:
        kind = _model_type_of(raw.get("architectures", []))
        if kind is None:
            raise ValueError(
                f"{path}: transformers knows neither model_type {raw.get('model_type')!r} nor "
                f"the architectures {raw.get('architectures')}; give a config.json of a "
                "transformers model family"
            ) from None
        return AutoConfig.for_model(**{**raw, "model_type": kind})


def _model_type_of(architectures: list[str]) -> str | None:
    """The model type whose causal-LM class is one of ``architectures``, preferring the one
    the class is named after (DeepseekV3ForCausalLM: deepseek_v3, whose config class is
    DeepseekV3Config, though other model types reuse the class)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for arch in architectures:
        kinds = [k for k, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls == arch]
        named = arch.removesuffix("ForCausalLM") + "Config"
        kinds.sort(key=lambda k: CONFIG_MAPPING_NAMES.get(k) != named)
        if kinds:
            return kinds[0]
    return None


def meta_target(config: object) -> torch.nn.Module:
    """The target's causal-LM class on the meta device (for Llama-4, its text model)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_target_params(config: object) -> int:
    """Exact parameter count of the target, built on the meta device."""
    return sum(p.numel() for p in meta_target(config).parameters())


@dataclass(frozen=True)
class Weight:
    """One parameter: its size, what tensor parallelism splits of it, and where it lives."""

    numel: int
    dim0: int  # the size of dim 0, which FSDP2 splits
    tp_dim: int | None  # the dimension tensor parallelism splits (None: whole on each tp rank)
    tp_size: int  # that dimension's size
    layer: int  # decoder layer index, ROOT (embedding, final norm) or OUTSIDE (head)

    def local(self, tp: int, dp: int, fsdp_target: bool) -> int:
        """Elements this rank holds: the tp rank's piece (the largest, ceil), then FSDP2's
        share of its dim 0 (padded to a multiple of dp)."""
        n, d0 = self.numel, self.dim0
        if tp > 1 and self.tp_dim is not None:
            n = n // self.tp_size * math.ceil(self.tp_size / tp)
            d0 = math.ceil(d0 / tp) if self.tp_dim == 0 else d0
        if fsdp_target and dp > 1 and self.layer != OUTSIDE:
            n = n // d0 * math.ceil(d0 / dp)
        return n


def _tp_dim(style: object, name: str, ndim: int) -> int | None:
    """The dimension a transformers tensor-parallel style shards (its ``shard_param``)."""
    from transformers.distributed.tensor_parallel import (
        ColwiseParallel,
        EmbeddingParallel,
        PackedColwiseParallel,
        PackedRowwiseParallel,
        RowwiseParallel,
    )

    if isinstance(style, ColwiseParallel | PackedColwiseParallel):
        return max(ndim - 2, 0)
    if isinstance(style, RowwiseParallel):
        return None if name.endswith("bias") else ndim - 1
    if isinstance(style, PackedRowwiseParallel):
        return None if ndim == 1 else ndim - 1
    if isinstance(style, EmbeddingParallel):
        return style.shard_dim
    return None  # replicated styles (norms, MoE routing wrappers) keep the whole tensor


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings off (published configs trip its validators; plan rules for other
    variants of a family match nothing): only shapes are read here."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _tp_styles(model: torch.nn.Module) -> dict[str, object] | None:
    """Parameter name -> tensor-parallel style of the model's own plan (None: it has none)."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    try:
        with quiet_transformers():
            plan, _, _ = model._resolve_parallel_plans(DistributedConfig(tp_size=2, tp_plan="auto"))
    except ValueError:
        return None
    return {name: ALL_PARALLEL_STYLES[style] for name, style in plan.items()}


@dataclass
class TargetShape:
    """What the memory of a target depends on, read from its model class on the meta device."""

    text: Any  # the text config
    weights: list[Weight]
    layers: int
    tp_plan: bool  # whether transformers has a tensor-parallel plan for it
    head_numel: int  # the output head (+ bias)
    embed_numel: int
    tied: bool  # head and embedding are one tensor
    draft: tuple[int, int]  # the draft's (trainable parameters besides its head, frozen ones)

    @classmethod
    def of(cls, config: object) -> TargetShape:
        from draftforge.target import decoder_layers, decoder_module

        model = meta_target(config)
        styles = _tp_styles(model)
        layers, decoder = decoder_layers(model), decoder_module(model)
        where = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
        where.update({id(p): ROOT for p in decoder.parameters() if id(p) not in where})
        weights = []
        for name, p in model.named_parameters():
            style = (styles or {}).get(name)
            dim = None if style is None else _tp_dim(style, name, p.ndim)
            size = p.shape[dim] if dim is not None else 1
            weights.append(Weight(p.numel(), p.shape[0], dim, size, where.get(id(p), OUTSIDE)))
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        head_numel = head.weight.numel() + (head.bias.numel() if head.bias is not None else 0)
        return cls(
            text=config.get_text_config(),
            weights=weights,
            layers=len(layers),
            tp_plan=styles is not None,
            head_numel=head_numel,
            embed_numel=embed.weight.numel(),
            tied=head.weight is embed.weight,
            draft=_draft_params(config),
        )

    @property
    def params(self) -> int:
        return sum(w.numel for w in self.weights)


def _draft_params(config: Any) -> tuple[int, int]:
    """The EAGLE-3 draft built on the meta device for this target, with a one-token draft
    vocabulary: (trainable parameters besides that head row, frozen ones)."""
    from draftforge.models import build_draft

    with torch.device("meta"):
        draft = build_draft("eagle3", config.get_text_config(), [0, 1, 2], 1)
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in draft.parameters() if not p.requires_grad)
    return trainable - config.get_text_config().hidden_size, frozen
