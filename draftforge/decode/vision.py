"""Speculative decoding of a vision-language target (Qwen2.5-VL): the prompt's images and
the positions its language model rotates by.

The prompt is prefilled through the whole model, vision tower included, with its pixel
values and the 3-row M-RoPE position ids (temporal, height, width) that the model's own
``get_rope_index`` computes (:func:`draftforge.vision_target.rope_position_ids`). Every token
after the prompt is text, and Qwen2.5-VL places it as its ``generate`` does: the same
position on all three rows, ``index + delta`` with ``delta = max(prompt positions) + 1 -
len(prompt)`` (transformers 5.24, ``Qwen2_5_VLModel.compute_3d_position_ids`` and
``get_rope_index``'s ``mrope_position_deltas``). :class:`PromptPositions` maps the engine's
sequence indices to those rows, for the target's forward (:class:`VisionTargetPath`) and for
the draft's rotary (:class:`~draftforge.decode.drafter.Drafter`), so the draft rotates by the
same positions it was trained on (``vision_target`` gives training the same ids).

The target runs on transformers' forward: the lean static-cache forward serves text-only
decoders (:mod:`draftforge.decode.lean`), and passing the position ids explicitly keeps the
model's ``rope_deltas`` state out of every call.

Llama-4 places every token at its sequence index, so its images only matter at the prefill,
where the projected vision states replace the image tokens' embeddings; every forward after
it is the language model's. Its chunked attention layers need a cache the engine can compact
and masks that follow the chunks: :class:`PlainVisionTargetPath`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from draftforge.decode.errors import DecodeError
from draftforge.decode.paths import HFTargetPath
from draftforge.target import capture_layers, decoder_layers
from draftforge.vision_target import plain_input_embeds, rope_position_ids, uses_mrope


@dataclass
class ImageInputs:
    """A prompt's images as the model reads them: the image processor's pixel values and
    patch grids, and the modality of each prompt token (``mm_token_type_ids`` [P])."""

    pixel_values: Tensor
    image_grid_thw: Tensor
    mm_token_type_ids: Tensor

    def generate_kwargs(self) -> dict[str, Tensor]:
        """These inputs as transformers' ``generate`` takes them (batch of one)."""
        return {
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "mm_token_type_ids": self.mm_token_type_ids[None],
        }


@dataclass
class PromptPositions:
    """Where each sequence index sits: the prompt's M-RoPE rows ``[3, P]``, then ``index +
    delta`` on all three rows for every later (text) token."""

    rows: Tensor
    delta: int

    @classmethod
    def text(cls, device: torch.device | str = "cpu") -> PromptPositions:
        """A prompt without images: every row is the sequence index."""
        return cls(torch.zeros(3, 0, dtype=torch.long, device=device), 0)

    def at(self, positions: Tensor) -> Tensor:
        """3-row positions ``[3, T]`` of sequence indices ``positions`` [T]."""
        later = (positions + self.delta).expand(3, -1)
        known = self.rows.shape[1]
        if known == 0 or int(positions.min()) >= known:
            return later
        inside = positions < known
        prompt = self.rows[:, positions.clamp(max=known - 1)]
        return torch.where(inside, prompt, later)


def prompt_positions(model: nn.Module, ids: Tensor, images: ImageInputs | None) -> PromptPositions:
    """The positions the model gives a prompt (``ids`` [P]) with ``images``: the sequence
    indices for a target with 1-D positions (Llama-4)."""
    if images is None or images.image_grid_thw.numel() == 0 or not uses_mrope(model):
        return PromptPositions.text(ids.device)
    batch = {
        "input_ids": ids[None],
        "mm_token_type_ids": images.mm_token_type_ids[None].to(ids.device),
        "image_grid_thw": images.image_grid_thw.to(ids.device),
    }
    rows = rope_position_ids(model, batch)[:, 0]
    return PromptPositions(rows, int(rows.max()) + 1 - ids.numel())


class VisionTargetPath(HFTargetPath):
    """transformers' forward of a VL model: the prefill carries the prompt's images, and
    every forward its tokens' 3-row positions (:class:`PromptPositions`)."""

    name = "hf"

    def __init__(self, model: nn.Module, aux_layers: list[int]) -> None:
        super().__init__(model, aux_layers)
        self.positions = PromptPositions.text()
        self.images: ImageInputs | None = None

    def begin(self, positions: PromptPositions, images: ImageInputs | None) -> None:
        """The prompt about to be prefilled: its positions and images."""
        self.positions = positions
        self.images = images

    def reset(self) -> None:
        super().reset()
        self.positions = PromptPositions.text()
        self.images = None

    def _kwargs(
        self, ids: Tensor, positions: Tensor, mask: Tensor | None, last_only: bool
    ) -> dict[str, Any]:
        kwargs = super()._kwargs(ids, positions, mask, last_only)
        kwargs["position_ids"] = self.positions.at(positions)[:, None]
        if self.length == 0 and self.images is not None:
            kwargs["pixel_values"] = self.images.pixel_values.to(ids.device, self.model.dtype)
            kwargs["image_grid_thw"] = self.images.image_grid_thw.to(ids.device)
        return kwargs


class PlainVisionTargetPath(VisionTargetPath):
    """A VL target with 1-D positions and chunked attention (Llama-4), on its own modules.

    The prefill's embeddings carry the prompt's images
    (:func:`~draftforge.vision_target.plain_input_embeds`, the steps of the model's forward
    before its language model); every forward then runs the
    language model with its head over the cache, each token at its sequence index. The
    whole model's forward is not called: transformers 5.24's
    ``Llama4ForConditionalGeneration.forward`` fails building its output (see
    :func:`generate_inputs`).

    A chunked layer's query at position p sees the keys at positions ``[C * (p // C), p]``
    (C = ``attention_chunk_size``; transformers' ``chunked_overlay`` in masking_utils.py).
    transformers keeps only the last C - 1 entries of such a layer
    (``DynamicSlidingWindowLayer``), which a verify's compaction cannot address; here every
    layer keeps every committed entry (a plain ``DynamicCache``, entry i at position i). A
    prefill or a chain then gets transformers' own masks, which place keys and queries by
    their index in that cache, here their position; a tree gets one mask per layer type
    (:meth:`masks`). That is exact at any context length.
    """

    def __init__(self, model: nn.Module, aux_layers: list[int]) -> None:
        # Not HFTargetPath's constructor: it builds the config's cache, chunked layers
        # included, and refuses them.
        text = model.config.get_text_config()
        unknown = set(text.layer_types) - {"full_attention", "chunked_attention"}
        if unknown:
            raise DecodeError(
                f"{type(model).__name__} has {sorted(unknown)} layers; the engine serves "
                "full and chunked attention in a target with 1-D positions"
            )
        self.vision_model = model
        self.model = model.language_model  # the text model with its head
        self.aux_layers = aux_layers
        self.layer_types = set(text.layer_types)
        self.chunk: int | None = getattr(text, "attention_chunk_size", None)
        self.cache = DynamicCache()
        self.positions = PromptPositions.text()
        self.images = None
        # layers without RoPE whose queries scale with their position (see tuned_queries)
        self.tuned = [
            layer.self_attn
            for layer in decoder_layers(self.model)
            if getattr(layer.self_attn, "attn_temperature_tuning", False)
            and not getattr(layer.self_attn, "use_rope", True)
        ]

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.images = None

    def masks(self, positions: Tensor, tree: Tensor | None) -> dict[str, Tensor]:
        """Additive masks [1, 1, T, L + T] of a tree's nodes at ``positions`` over the cache's
        L entries and themselves, by layer type: each node sees the cache and its ancestors
        (``tree``; None: causal), and in a chunked layer only those in its own chunk."""
        count, length = positions.numel(), self.length
        device = positions.device
        inner = torch.ones(count, count, dtype=torch.bool, device=device).tril()
        new = inner if tree is None else tree.to(device)
        visible = torch.cat([new.new_ones(count, length), new], dim=1)
        keys = torch.cat([torch.arange(length, device=device), positions])
        dtype = self.model.dtype
        masks = {}
        for kind in self.layer_types:
            seen = visible
            if kind == "chunked_attention":
                seen = visible & (keys[None] // self.chunk == positions[:, None] // self.chunk)
            mask = torch.zeros(seen.shape, dtype=dtype, device=device)
            masks[kind] = mask.masked_fill(~seen, torch.finfo(dtype).min)[None, None]
        return masks

    @torch.no_grad()
    def forward(
        self, ids: Tensor, positions: Tensor, tree: Tensor | None, last_only: bool, aux: bool
    ) -> tuple[Tensor, Tensor | None]:
        pixels = None
        if self.length == 0 and self.images is not None:
            pixels = self.images.pixel_values.to(ids.device, self.model.dtype)
        kwargs = {
            "inputs_embeds": plain_input_embeds(self.vision_model, ids[None], pixels),
            "position_ids": positions[None],
            "attention_mask": None if tree is None else self.masks(positions, tree),
            "past_key_values": self.cache,
            "use_cache": True,
            "logits_to_keep": 1 if last_only else 0,
        }
        with self.tuned_queries(positions):
            if not aux:
                return self._call(kwargs), None
            with capture_layers(self.model, self.aux_layers) as captured:
                logits = self._call(kwargs)
        return logits, torch.cat(captured, dim=-1)[0]

    @contextmanager
    def tuned_queries(self, positions: Tensor) -> Iterator[None]:
        """Llama-4's layers without RoPE scale each query by its position (attention
        temperature tuning, ``Llama4TextAttention.forward``), a position they take as the
        cache's length plus the token's index among the new ones: right for a prefill or a
        chain, not for a tree's nodes, which sit at their depth. While the block runs those
        layers leave the scaling to a hook on their query projection that applies the
        model's formula at ``positions``, with the same operations (so chains and prefills
        are unchanged to the bit)."""
        handles = []
        try:
            for attn in self.tuned:
                steps = torch.floor((positions.float() + 1.0) / attn.floor_scale)
                scales = torch.log1p(steps) * attn.attn_scale + 1.0
                scales = scales[None, :, None]
                handles.append(attn.q_proj.register_forward_hook(_scaled(scales)))
                attn.attn_temperature_tuning = False
            yield
        finally:
            for attn in self.tuned:
                attn.attn_temperature_tuning = True
            for handle in handles:
                handle.remove()


def _scaled(scales: Tensor) -> Callable[[nn.Module, object, Tensor], Tensor]:
    """A forward hook multiplying a projection's output [1, T, D] by ``scales`` [1, T, 1]."""

    def hook(_module: nn.Module, _args: object, output: Tensor) -> Tensor:
        return (output * scales).to(output.dtype)

    return hook


def vision_target_path(
    model: nn.Module, aux_layers: list[int], lean: bool | None, compile: bool
) -> tuple[VisionTargetPath, str]:
    """The path of a VL target, and why it is not the lean one; ``lean=True`` or ``compile``
    (the lean forward's options) are refused with the reason."""
    mrope = uses_mrope(model)
    how = "M-RoPE positions go through transformers' forward" if mrope else "go through its modules"
    why = (
        f"a vision-language target: its prompt's images and {how} (the lean forward serves "
        "text-only decoders)"
    )
    if lean or compile:
        raise DecodeError(f"{why}; drop --engine lean and --compile")
    if not mrope:
        return PlainVisionTargetPath(model, aux_layers), why
    return VisionTargetPath(model, aux_layers), why


@contextmanager
def generate_inputs(model: nn.Module, images: ImageInputs | None) -> Iterator[dict[str, Tensor]]:
    """The image arguments of ``model.generate`` for ``images`` (none without), and, for a
    target with 1-D positions, its forward made callable while the block runs.

    Why: transformers 5.24's ``Llama4ForConditionalGeneration.forward`` builds its output
    from ``outputs.image_outputs`` of its language model, whose output
    (``MoeCausalLMOutputWithPast``) has no such field, so every call fails after the logits
    are computed; a hook on the language model gives its output that field (None, as the
    model reads it when no image encoder output is kept)."""
    if uses_mrope(model) or not hasattr(model, "language_model"):
        yield {} if images is None else images.generate_kwargs()
        return

    def add_field(_module: nn.Module, _args: object, output: Any) -> None:
        if not hasattr(output, "image_outputs"):
            output.image_outputs = None

    handle = model.language_model.register_forward_hook(add_field)
    try:
        yield (
            {}
            if images is None
            else {"pixel_values": images.pixel_values.to(model.device, model.dtype)}
        )
    finally:
        handle.remove()
