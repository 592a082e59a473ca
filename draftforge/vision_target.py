"""Features of a vision-language target (Qwen2.5-VL): aux states of the language model's
decoder layers, its final hidden state, and the positions it used.

A VL target holds two stacks of blocks, the vision tower's and the language model's, and
the two can be equally deep, so the aux hooks are placed on the language model's layers
(``get_decoder()``, the text model), never found by depth in the whole model. The draft
learns the language model's states, which depend on where each token sits: Qwen-VL's
language model rotates with 3-D M-RoPE position ids (temporal, height, width rows) that the
model computes from the image grids, and which are not ``arange`` once an image comes
before a token. Those ids are computed once here, with the model's own ``get_rope_index``,
passed to its forward (so the forward keeps no ``rope_deltas`` state from the call) and
returned with the states, so training and decoding can give the draft the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from draftforge.data.vision import VisionSample
from draftforge.target import TargetError, capture_layers


@dataclass
class VisionFeatures:
    """What the draft learns from for one batch of VL samples."""

    aux: Tensor  # [B, T, 3H]: the aux layers' outputs, concatenated in aux-layer order
    final: Tensor  # [B, T, H]: the language model's final-norm hidden state
    position_ids: Tensor  # [3, B, T]: the M-RoPE position ids the language model used


def language_model(model: nn.Module) -> nn.Module:
    """The language model of a VL target: embeddings, decoder layers and final norm."""
    decoder = model.get_decoder()
    depth = model.config.get_text_config().num_hidden_layers
    if (
        decoder is model
        or getattr(getattr(decoder, "config", None), "num_hidden_layers", 0) != depth
    ):
        raise TargetError(f"cannot find the language model of {type(model).__name__}")
    return decoder


def rope_position_ids(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The language model's M-RoPE position ids ``[3, B, T]`` for a batch, from the model's
    own ``get_rope_index`` (text positions advance by one per token, an image's tokens take
    its grid's height and width positions, and the text after it continues from there)."""
    ids, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=batch.get("attention_mask"),
    )
    return ids


def vision_batch(samples: list[VisionSample]) -> dict[str, Tensor]:
    """The model inputs of equally long samples stacked into one batch (images concatenated
    in sample order, as the model reads them)."""
    if len({s.input_ids.numel() for s in samples}) != 1:
        raise ValueError("vision_batch stacks samples of one length; forward others one by one")
    batch = {
        "input_ids": torch.stack([s.input_ids for s in samples]),
        "mm_token_type_ids": torch.stack([s.mm_token_type_ids for s in samples]),
    }
    with_images = [s for s in samples if s.image_grid_thw.numel()]
    if with_images:
        batch["pixel_values"] = torch.cat([s.pixel_values for s in with_images])
        batch["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images])
    return batch


@torch.no_grad()
def vision_features(
    model: nn.Module, aux_layers: list[int], batch: dict[str, Tensor]
) -> VisionFeatures:
    """Aux and final states of the language model and its position ids, from one forward of
    the model without the output head (the vision tower runs inside it)."""
    position_ids = rope_position_ids(model, batch)
    with capture_layers(language_model(model), aux_layers) as captured:
        out = model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=position_ids,
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            mm_token_type_ids=batch["mm_token_type_ids"],
            use_cache=False,
        )
    return VisionFeatures(torch.cat(captured, dim=-1), out.last_hidden_state, position_ids)
