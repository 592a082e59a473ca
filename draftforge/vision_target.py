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

Qwen3-VL adds deepstack states of its vision tower (one level per entry of
``vision_config.deepstack_visual_indexes``) into the residual stream at the image tokens,
level i right after decoder layer i. transformers' ``output_hidden_states`` records each
layer's output before that addition (transformers 5.24, ``models/qwen3_vl/
modeling_qwen3_vl.py``, ``Qwen3VLTextModel.forward`` and ``_deepstack_process``). The serving
engines feed the draft the stream after it: each records an aux state as the input of layer
i + 1 (the EAGLE-3 id plus one), and adds level i after layer i, before that record:

- vLLM, ``vllm/model_executor/models/qwen3_vl.py`` @4f5768c7: ``Qwen3VLForConditionalGeneration``
  implements ``SupportsEagle3``; ``Qwen3LLMModel.forward`` appends ``hidden_states +
  residual`` before each layer of ``aux_hidden_state_layers`` and adds
  ``deepstack_input_embeds_{i}`` to ``hidden_states`` after layer i.
- SGLang, ``python/sglang/srt/models/qwen3_vl.py``: ``Qwen3LLMModel.forward`` appends
  ``hidden_states + residual`` before each layer of ``layers_to_capture`` (the ids plus one,
  ``set_eagle3_layers_to_capture``) and adds level i to ``hidden_states`` after layer i: at
  sgl-project/sglang @005fa833 and @2409eacc (whose Qwen3-VL has no EAGLE-3 hook yet), and
  by default in the forks amdpilot-org/sglang @5e1c7f38 and wow-look-at-my/sglang @d8f3d0ee,
  which have the hook. Those forks add the level inside layer i + 1 instead, after the
  record (transformers' order, leaving it out of the aux state), only for
  ``rl_on_policy_target`` runs (``use_hf_deepstack_order``); kvcache-ai/sglang @721bb4ec
  always did, and has no EAGLE-3 hook on Qwen3-VL.

So for a target with deepstack, an aux state is the stream as the next layer reads it
(:func:`capture_stream`); at text tokens, and after the last level, that is the layer's own
output. The final hidden state (after all levels and the final norm) is the same everywhere.
Llama-4 rotates by plain 1-D positions (``arange``); its forward runs step by step up to its
language model's output (:func:`_plain_features`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from draftforge.data.vision import VisionSample
from draftforge.target import (
    TargetError,
    capture_layers,
    collected,
    decoder_layers,
    decoder_module,
)


@dataclass
class VisionFeatures:
    """What the draft learns from for one batch of VL samples."""

    aux: Tensor  # [B, T, 3H]: the aux layers' states (deepstack added), in aux-layer order
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


def deepstack_levels(model: nn.Module) -> int:
    """How many decoder layers of the language model have deepstack visual states added
    after them at the image tokens (Qwen3-VL: one per ``deepstack_visual_indexes`` entry of
    its vision config); 0 for a target without deepstack."""
    vision = getattr(model.config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or [])


@contextmanager
def capture_stream(decoder: nn.Module, layer_ids: list[int]) -> Iterator[list[Tensor]]:
    """Collect, in ``layer_ids`` order, the residual stream after each given decoder layer as
    the next layer reads it (its input, as the serving engines record aux states), or the
    last layer's own output. That is the layer's output plus whatever the model adds between
    the two layers: Qwen3-VL's deepstack states at the image tokens."""
    layers = decoder_layers(decoder)
    captured: list[Tensor | None] = [None] * len(layer_ids)

    def next_input(slot: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[slot] = args[0] if args else kwargs["hidden_states"]

        return hook

    def last_output(slot: int):
        def hook(_module: nn.Module, _args: object, output: Tensor | tuple) -> None:
            captured[slot] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = []
    for slot, layer in enumerate(layer_ids):
        if layer + 1 < len(layers):
            hook = next_input(slot)
            handles.append(layers[layer + 1].register_forward_pre_hook(hook, with_kwargs=True))
        else:
            handles.append(layers[layer].register_forward_hook(last_output(slot)))
    with collected(handles, captured, layer_ids) as result:
        yield result


def aux_capture(
    model: nn.Module,
) -> Callable[[nn.Module, list[int]], AbstractContextManager[list[Tensor]]]:
    """How the aux states of ``model``'s forwards are collected, in training, capture and
    decoding alike: :func:`capture_stream` for a target with deepstack (Qwen3-VL), each
    layer's output (:func:`~draftforge.target.capture_layers`) for any other."""
    return capture_stream if deepstack_levels(model) else capture_layers


@torch.no_grad()
def vision_features(
    model: nn.Module, aux_layers: list[int], batch: dict[str, Tensor]
) -> VisionFeatures:
    """Aux and final states of the language model and its position ids, from one forward of
    the model without the output head (the vision tower runs inside it). With deepstack
    (Qwen3-VL), an aux state is the stream the next layer reads, deepstack states included,
    as the serving engines give it to the draft (see the module's docstring)."""
    position_ids = rope_position_ids(model, batch)
    if not uses_mrope(model):
        return _plain_features(model, aux_layers, batch, position_ids)
    with aux_capture(model)(language_model(model), aux_layers) as captured:
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


def plain_input_embeds(model: nn.Module, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
    """What the language model of a target with 1-D positions (Llama-4) reads: the token
    embeddings of ``input_ids`` [B, T], with the vision tower's states of ``pixel_values``
    projected into the image tokens' places: the steps of the model's own forward before its
    language model, for training (:func:`_plain_features`) and decoding alike."""
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return embeds
    vision = model.get_image_features(pixel_values=pixel_values, return_dict=True)
    states = vision.last_hidden_state
    projected = model.multi_modal_projector(states.view(-1, states.size(-1)))
    where = model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=projected)
    return embeds.masked_scatter(where, projected.to(embeds.dtype))


def _plain_features(
    model: nn.Module, aux_layers: list[int], batch: dict[str, Tensor], position_ids: Tensor
) -> VisionFeatures:
    """:func:`vision_features` of a target with 1-D positions and no head-free forward of its
    own (Llama-4): the steps of its forward before the head, with its own modules (token
    embeddings, the vision tower's states projected into the image tokens), then its language
    model. Not the whole forward: transformers 5.24's ``Llama4ForConditionalGeneration``
    fails building its output (``image_outputs``) after the language model has run."""
    embeds = plain_input_embeds(model, batch["input_ids"], batch.get("pixel_values"))
    decoder = language_model(model)
    with capture_layers(decoder, aux_layers) as captured:
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=batch.get("attention_mask"),
            position_ids=position_ids,
            use_cache=False,
        )
    return VisionFeatures(torch.cat(captured, dim=-1), out.last_hidden_state, position_ids)
