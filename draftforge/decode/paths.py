"""How the engine runs its target: transformers' own forward, or the lean one of
:mod:`draftforge.decode.lean`, behind one interface (:class:`TargetPath`).

Both keep a KV cache of the committed sequence and take new tokens at explicit RoPE positions
with a ``tree`` mask among them ([T, T] bool, True where a query sees a key; None: causal), so
a draft tree is verified in one forward; ``compact`` then keeps the accepted entries.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from draftforge.decode.errors import DecodeError
from draftforge.decode.lean import build_lean_target
from draftforge.vision_target import aux_capture


class TargetPath(Protocol):
    """A target with its KV cache, one sequence at a time."""

    name: str

    @property
    def length(self) -> int:
        """Cache entries held."""

    def reserve(self, entries: int) -> None:
        """Room for ``entries`` cache entries (a hint; paths may grow on demand)."""

    def reset(self) -> None:
        """Forget the cached sequence."""

    def forward(
        self, ids: Tensor, positions: Tensor, tree: Tensor | None, last_only: bool, aux: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Append ``ids`` [T] at ``positions``; logits [T or 1, V] and aux states [T, 3H]."""

    def compact(self, start: int, keep: Tensor) -> None:
        """Keep entries [0, start) and then ``start + keep``, in that order."""


def compact_cache(cache: DynamicCache, start: int, keep: Tensor) -> None:
    """Keep the first ``start`` entries and then entries ``start + keep``, in that order.

    The kept rows are gathered (a copy) before being written over the region they come from,
    and the layer then holds a view of the shortened tensor: no reallocation of the prefix.
    """
    end = start + keep.numel()
    for layer in cache.layers:
        for name in ("keys", "values"):
            states = getattr(layer, name)
            states[..., start:end, :] = states[..., start + keep, :]
            setattr(layer, name, states[..., :end, :])


class HFTargetPath:
    """transformers' forward with a ``DynamicCache``; aux layers captured by forward hooks."""

    name = "hf"

    def __init__(self, model: nn.Module, aux_layers: list[int]) -> None:
        layers = DynamicCache(config=model.config).layers
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise DecodeError(
                f"{type(model).__name__} has sliding-window or linear-attention layers; "
                "the speculative engine supports full-attention targets (Llama, Qwen, Mistral "
                "without sliding window, ...)"
            )
        self.model = model
        self.aux_layers = aux_layers
        self.cache = DynamicCache(config=model.config)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def reserve(self, entries: int) -> None:
        """Nothing to do: the cache grows per forward."""

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)

    def compact(self, start: int, keep: Tensor) -> None:
        compact_cache(self.cache, start, keep)

    @torch.no_grad()
    def forward(
        self, ids: Tensor, positions: Tensor, tree: Tensor | None, last_only: bool, aux: bool
    ) -> tuple[Tensor, Tensor | None]:
        mask = None
        if tree is not None:
            visible = torch.cat([tree.new_ones(len(ids), self.length), tree], 1).to(ids.device)
            dtype = self.model.dtype
            mask = torch.zeros(visible.shape, dtype=dtype, device=ids.device)
            mask = mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]
        kwargs = self._kwargs(ids, positions, mask, last_only)
        if not aux:
            return self._call(kwargs), None
        with aux_capture(self.model)(self.model, self.aux_layers) as captured:
            logits = self._call(kwargs)
        return logits, torch.cat(captured, dim=-1)[0]

    def _kwargs(
        self, ids: Tensor, positions: Tensor, mask: Tensor | None, last_only: bool
    ) -> dict[str, Any]:
        """The model's arguments for ``ids`` at ``positions`` under an additive ``mask``."""
        return {
            "input_ids": ids[None],
            "position_ids": positions[None],
            "attention_mask": mask,
            "past_key_values": self.cache,
            "use_cache": True,
            "logits_to_keep": 1 if last_only else 0,
        }

    def _call(self, kwargs: dict) -> Tensor:
        # transformers 5.2x warns on every forward that passes `past_key_values`, naming `cache`
        # as its successor, yet a cache passed as `cache` is not used by that version's models:
        # keep the working argument without a warning per decoded token.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="`past_key_values` is deprecated", category=FutureWarning
            )
            return self.model(**kwargs).logits[0]


def choose_target_path(
    model: nn.Module, aux_layers: list[int], lean: bool | None, compile: bool = False
) -> tuple[TargetPath, str | None]:
    """The path ``lean`` asks for (None: lean when the model allows it) and, when the lean
    forward was wanted but cannot serve the model, why not. ``compile`` compiles the lean
    forward's layers (:class:`~draftforge.decode.lean.LeanTarget`)."""
    if lean is False:
        if compile:
            raise DecodeError("compile applies to the lean target path: drop lean=False")
        return HFTargetPath(model, aux_layers), None
    built = build_lean_target(model, aux_layers, compile)
    if isinstance(built, str):
        if lean:
            raise DecodeError(f"the lean target forward cannot run this model: {built}")
        return HFTargetPath(model, aux_layers), built
    return built, None
