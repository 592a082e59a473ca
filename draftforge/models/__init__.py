"""Draft architectures. A new one is a module plus one entry in :data:`DRAFTS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from draftforge.models.eagle3 import Eagle3Draft, eagle3_config_for_target


@dataclass(frozen=True)
class DraftArch:
    """How to derive a draft's config from the target's, and the module that implements it."""

    config: Callable[
        ..., PretrainedConfig
    ]  # (target_config, aux_layers, draft_vocab_size, intermediate_size)
    model: Callable[[PretrainedConfig], nn.Module]


DRAFTS: dict[str, DraftArch] = {
    "eagle3": DraftArch(config=eagle3_config_for_target, model=Eagle3Draft),
}


def build_draft(
    arch: str,
    target_config: PretrainedConfig,
    aux_layers: list[int],
    draft_vocab_size: int,
    intermediate_size: int | None = None,
) -> nn.Module:
    """A freshly initialised draft for this target."""
    if arch not in DRAFTS:
        raise ValueError(f"unknown draft.arch {arch!r}; choose from {sorted(DRAFTS)}")
    entry = DRAFTS[arch]
    return entry.model(entry.config(target_config, aux_layers, draft_vocab_size, intermediate_size))
