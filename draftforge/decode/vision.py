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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from draftforge.decode.errors import DecodeError
from draftforge.decode.paths import HFTargetPath
from draftforge.vision_target import rope_position_ids, uses_mrope


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
    """The positions the model gives a prompt (``ids`` [P]) with ``images``."""
    if images is None or images.image_grid_thw.numel() == 0:
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


def vision_target_path(
    model: nn.Module, aux_layers: list[int], lean: bool | None, compile: bool
) -> tuple[VisionTargetPath, str]:
    """The path of a VL target, and why it is not the lean one; ``lean=True`` or ``compile``
    (the lean forward's options) are refused with the reason."""
    why = (
        "a vision-language target: its prompt's images and M-RoPE positions go through "
        "transformers' forward (the lean forward serves text-only decoders)"
    )
    if lean or compile:
        raise DecodeError(f"{why}; drop --engine lean and --compile")
    if not uses_mrope(model):
        raise DecodeError(
            f"{type(model).__name__}: speculative decoding of a vision-language target with "
            "1-D positions (Llama-4) is not supported yet; Qwen2.5-VL and Qwen3-VL are"
        )
    return VisionTargetPath(model, aux_layers), why
