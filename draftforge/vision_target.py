"""Features of a vision-language target (Qwen2.5-VL, Qwen3-VL, Llama-4): aux states of the
language model's decoder layers, its final hidden state, and the positions it used.

A VL target holds two stacks of blocks, the vision tower's and the language model's, and
the two can be equally deep, so the aux hooks are placed on the language model's layers
(``get_decoder()``, the text model), never found by depth in the whole model. The draft
learns the language model's states, which depend on where each token sits: Qwen-VL's
language model rotates with 3-D M-RoPE position ids (temporal, height, width rows) that the
model computes from the image grids, and which are not ``arange`` once an image comes
before a token. Those ids are computed once here, with the model's own ``get_rope_index``,
passed to its forward (so the forward keeps no ``rope_deltas`` state from the call) and
returned with the states, so training and decoding can give the draft the same positions.

Qwen3-VL adds deepstack states of its vision tower into the first decoder layers' outputs at
the image tokens, after each layer; the hooks, like ``output_hidden_states``, see each
layer's own output. Llama-4 rotates by plain 1-D positions (``arange``); its forward runs
step by step up to its language model's output (:func:`_plain_features`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from draftforge.data.vision import VisionSample
from draftforge.target import TargetError, capture_layers, decoder_module


@dataclass
class VisionFeatures:
    """What the draft learns from for one batch of VL samples."""

    aux: Tensor  # [B, T, 3H]: the aux layers' outputs, concatenated in aux-layer order
    final: Tensor  # [B, T, H]: the language model's final-norm hidden state
    position_ids: Tensor  # [3, B, T] M-RoPE ids or [B, T]: the positions the model used


def language_model(model: nn.Module) -> nn.Module:
    """The language model of a VL target: embeddings, decoder layers and final norm (inside
    ``get_decoder()``, which for Llama-4 is its text model with a head)."""
    decoder = model.get_decoder()
    depth = model.config.get_text_config().num_hidden_layers
    if (
        decoder is model
        or getattr(getattr(decoder, "config", None), "num_hidden_layers", 0) != depth
    ):
        raise TargetError(f"cannot find the language model of {type(model).__name__}")
    return decoder_module(decoder)


def uses_mrope(model: nn.Module) -> bool:
    """Whether the target places tokens with M-RoPE ids (Qwen-VL) rather than 1-D ones."""
    return hasattr(getattr(model, "model", None), "get_rope_index")


def rope_position_ids(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The language model's position ids for a batch: M-RoPE ids ``[3, B, T]`` from the
    model's own ``get_rope_index`` (text positions advance by one per token, an image's
    tokens take its grid's height and width positions, and the text after it continues from
    there); ``arange`` ``[B, T]`` for a target with 1-D positions (Llama-4)."""
    if not uses_mrope(model):
        batch_size, length = batch["input_ids"].shape
        return torch.arange(length, device=batch["input_ids"].device).expand(batch_size, -1)
    ids, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=batch.get("attention_mask"),
    )
    return ids


def sample_positions(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """One sample's positions as a prepared dataset keeps them: ``[3, T]`` M-RoPE ids, or
    ``[T]`` for a target with 1-D positions (``batch`` holds that sample alone)."""
    return rope_position_ids(model, batch)[..., 0, :].cpu()


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
    if not uses_mrope(model):
        return _plain_features(model, aux_layers, batch, position_ids)
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


def _plain_features(
    model: nn.Module, aux_layers: list[int], batch: dict[str, Tensor], position_ids: Tensor
) -> VisionFeatures:
    """:func:`vision_features` of a target with 1-D positions and no head-free forward of its
    own (Llama-4): the steps of its forward before the head, with its own modules (token
    embeddings, the vision tower's states projected into the image tokens), then its language
    model. Not the whole forward: transformers 5.24's ``Llama4ForConditionalGeneration``
    fails building its output (``image_outputs``) after the language model has run."""
    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    if batch.get("pixel_values") is not None:
        vision = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        states = vision.last_hidden_state
        projected = model.multi_modal_projector(states.view(-1, states.size(-1)))
        where = model.get_placeholder_mask(
            input_ids, inputs_embeds=embeds, image_features=projected
        )
        embeds = embeds.masked_scatter(where, projected.to(embeds.dtype))
    decoder = language_model(model)
    with capture_layers(decoder, aux_layers) as captured:
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=batch.get("attention_mask"),
            position_ids=position_ids,
            use_cache=False,
        )
    return VisionFeatures(torch.cat(captured, dim=-1), out.last_hidden_state, position_ids)
