"""Conversations with images: templating, tokenising and loss masks for vision-language
targets (Qwen-VL: one image placeholder token repeated once per merged patch; Llama-4: tiles
of patch tokens between markers, :mod:`draftforge.data.llama4_images`).

A message's content is a list of OpenAI-style parts, ``{"type": "text", "text": ...}`` and
``{"type": "image", "image": path}`` (or ``{"type": "image_url", "image_url": {"url":
path}}`` with a local path). Masking reuses :class:`~draftforge.data.template.ChatTemplate`
unchanged: each image becomes one private-use character in the message's text, and the
template sees the content parts again (:class:`_PartsTokenizer`), so the supervised spans are
found by the same rendering rules as for text conversations. Then each image's placeholder
in the rendering is replaced by the image's text (:meth:`VisionProcessor.image_text`: its
placeholder token once per merged patch, for Qwen-VL), the text is tokenised with offsets,
and a token is supervised when it overlaps an assistant span and no image's text, and is no
image marker (``<|vision_start|>``...). Image tokens are never supervised, wherever the
image is.

Why not transformers' ``Qwen2_5_VLProcessor``: in transformers 5.24 it cannot be built
without torchvision (its video processor's base class is only exported with torchvision),
and torchvision does not import beside the CPU torch build draftforge pins. The image
processor (``Qwen2VLImageProcessorPil``) and the tokenizer are what it wraps, and what
:class:`VisionProcessor` holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from draftforge import require_extra
from draftforge.data.conversation import ROLE_ALIASES, Message, RowError
from draftforge.data.template import ChatTemplate

# One image in a message's text while ChatTemplate finds the spans; a private-use code point
# beside template.py's markers (U+E000, U+E001).
IMAGE_SLOT = "\ue002"

# mm_token_type_ids values, as Qwen2.5-VL's get_rope_index reads them.
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


@dataclass
class VisionProcessor:
    """What templating a conversation with images needs: the tokenizer (with the image
    placeholder among its special tokens), the image processor, the chat template that
    writes content parts, and the placeholder tokens."""

    tokenizer: Any  # a fast HF tokenizer
    image_processor: Any  # e.g. Qwen2VLImageProcessorPil
    chat_template: str
    image_token: str = "<|image_pad|>"
    video_token: str = "<|video_pad|>"
    # where an image's tokens start and end in the text: never supervised, like the image
    markers: tuple[str, ...] = ("<|vision_start|>", "<|vision_end|>")

    @classmethod
    def from_checkpoint(cls, path: str, tokenizer: Any) -> VisionProcessor:
        """The processor of a VL checkpoint folder, from its files: ``tokenizer`` (loaded
        from it), its chat template and ``preprocessor_config.json``, read by the Pillow
        image processor (patch, merge and pixel settings; Qwen2-VL's, which Qwen2.5-VL's and
        Qwen3-VL's checkpoints name) or, for a Llama-4 checkpoint, by
        :class:`~draftforge.data.llama4_images.Llama4Tiles`. Not ``AutoProcessor``: see the
        module docstring."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        settings = Path(path) / "preprocessor_config.json"
        if not settings.is_file():
            raise FileNotFoundError(f"{path} has no preprocessor_config.json for its images")
        if not tokenizer.chat_template:
            raise ValueError(f"{path}: its tokenizer has no chat template")
        kind = str(json.loads(settings.read_text()).get("image_processor_type", ""))
        if kind.startswith("Llama4"):
            return Llama4VisionProcessor.from_files(path, tokenizer)
        if kind and not kind.startswith("Qwen2VL"):
            raise ValueError(
                f"{settings}: image_processor_type {kind!r} is not one draftforge reads "
                "(Qwen2VLImageProcessor for Qwen2.5-VL and Qwen3-VL, Llama4ImageProcessor)"
            )
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        return cls(tokenizer, image_processor, tokenizer.chat_template)

    @property
    def placeholder(self) -> str:
        """What the chat template writes where an image goes."""
        return self.image_token

    def image_text(self, grid: Tensor) -> str:
        """What stands for one image in the model's input, in place of its placeholder: the
        image token once per merged patch (``grid``: the image's row of ``image_grid_thw``)."""
        return self.image_token * self.tokens_per_image(grid[None])[0]

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.video_token)

    def tokens_per_image(self, grid_thw: Tensor) -> list[int]:
        """Placeholder tokens of each image: its patches over the merge window (the rule of
        Qwen2.5-VL's processor; the vision tower merges ``merge_size**2`` patches into one)."""
        merge = self.image_processor.merge_size
        return [int(n) // merge**2 for n in grid_thw.prod(dim=-1)]


@dataclass
class Llama4VisionProcessor(VisionProcessor):
    """A Llama-4 checkpoint's processor: ``<|image|>`` in the template becomes the image's
    tiles of ``<|patch|>`` tokens (:mod:`draftforge.data.llama4_images` has the layout); ``patches_per_tile`` is what the
    vision tower makes of one tile (its patches after pixel shuffle)."""

    image_token: str = "<|patch|>"
    # Llama-4 takes no video; encoding marks image tokens after video ones, so these are images
    video_token: str = "<|patch|>"
    markers: tuple[str, ...] = (
        "<|image_start|>",
        "<|image_end|>",
        "<|image|>",
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
    )
    patches_per_tile: int = 144

    @property
    def placeholder(self) -> str:
        return "<|image|>"

    def image_text(self, grid: Tensor) -> str:
        _, rows, cols = (int(n) for n in grid)
        patches = self.image_token * self.patches_per_tile
        text = "<|image_start|>"
        if rows * cols > 1:
            row = "<|tile_x_separator|>".join([patches] * cols)
            text += (row + "<|tile_y_separator|>") * rows
        return text + "<|image|>" + patches + "<|image_end|>"

    @classmethod
    def from_files(cls, path: str | Path, tokenizer: Any) -> Llama4VisionProcessor:
        """From a Llama-4 checkpoint folder: its tiling settings and, from ``config.json``'s
        vision config, how many tokens one tile becomes."""
        from draftforge.data.llama4_images import Llama4Tiles

        tiles = Llama4Tiles.from_pretrained(path)
        vision = json.loads((Path(path) / "config.json").read_text())["vision_config"]
        side = tiles.tile // int(vision["patch_size"])
        shrink = round(1 / float(vision["pixel_shuffle_ratio"]) ** 2)
        return cls(tokenizer, tiles, tokenizer.chat_template, patches_per_tile=side**2 // shrink)


@dataclass
class VisionSample:
    """One templated conversation with images: token ids, loss mask and modality of each
    token ([T]), the image processor's pixel values and per-image patch grid."""

    input_ids: Tensor  # [T] int64
    loss_mask: Tensor  # [T] int64, 1 = supervised
    mm_token_type_ids: Tensor  # [T] int64: TEXT_TYPE, IMAGE_TYPE or VIDEO_TYPE
    pixel_values: Tensor  # [patches, C * temporal_patch * patch * patch]
    image_grid_thw: Tensor  # [images, 3] int64


def _image_path(part: dict[str, Any], where: str) -> str:
    source = part.get("image")
    if part.get("type") == "image_url":
        url = part.get("image_url")
        source = url.get("url") if isinstance(url, dict) else url
    if not isinstance(source, str):
        raise RowError("bad_image", f"{where}: an image part without a path")
    return source.removeprefix("file://")


def parse_vision_messages(messages: list[dict[str, Any]]) -> tuple[list[Message], list[str]]:
    """Messages with OpenAI-style content parts -> :class:`Message` objects whose text holds
    :data:`IMAGE_SLOT` for each image, and the image paths in order of appearance."""
    parsed, images = [], []
    for k, raw in enumerate(messages):
        role = ROLE_ALIASES.get(str(raw.get("role", "")).lower())
        if role is None:
            raise RowError("unknown_role", f"message {k}: role {raw.get('role')!r}")
        content = raw.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        pieces = []
        for part in parts:
            if part.get("type") == "text":
                text = part.get("text", "")
                if not isinstance(text, str) or IMAGE_SLOT in text:
                    raise RowError("non_string_content", f"message {k}: a bad text part")
                pieces.append(text)
            elif part.get("type") in ("image", "image_url"):
                images.append(_image_path(part, f"message {k}"))
                pieces.append(IMAGE_SLOT)
            else:
                raise RowError("unknown_part", f"message {k}: content part {part.get('type')!r}")
        parsed.append(Message(role=role, content="".join(pieces)))
    return parsed, images


class _PartsTokenizer:
    """The processor's tokenizer as ChatTemplate uses it, except that rendering turns each
    :data:`IMAGE_SLOT` in a message's text back into an image part, so the template writes
    the image as it does for real content parts."""

    def __init__(self, tokenizer: Any, chat_template: str) -> None:
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self.is_fast = tokenizer.is_fast
        self.added_tokens_decoder = tokenizer.added_tokens_decoder
        self.all_special_tokens = tokenizer.all_special_tokens

    @staticmethod
    def _parts(text: str) -> list[dict[str, str]]:
        parts: list[dict[str, str]] = []
        for k, piece in enumerate(text.split(IMAGE_SLOT)):
            if k:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        as_parts = [
            {**m, "content": self._parts(m["content"])} if isinstance(m["content"], str) else m
            for m in messages
        ]
        return self._tokenizer.apply_chat_template(as_parts, **kwargs)


# Pixels an image may have: decoded as RGB it takes 3 bytes a pixel before any processor
# shrinks it (Qwen's keep at most ~12.8M), so larger files are refused before decoding.
MAX_IMAGE_PIXELS = 64 * 2**20


def load_images(paths: list[str]) -> list[Any]:
    """The images at ``paths`` as RGB PIL images; a missing, unreadable or too large file
    (over :data:`MAX_IMAGE_PIXELS`, read from its header) is a RowError."""
    image_mod = require_extra("PIL.Image", "vision", "conversations with images")
    images = []
    for path in paths:
        try:
            with image_mod.open(Path(path).expanduser()) as image:
                width, height = image.size
                pixels = width * height
                if pixels <= MAX_IMAGE_PIXELS:
                    images.append(image.convert("RGB"))
        except (OSError, ValueError, image_mod.DecompressionBombError) as err:
            raise RowError("bad_image", f"{path}: {err}") from None
        if pixels > MAX_IMAGE_PIXELS:
            raise RowError(
                "bad_image",
                f"{path}: too large ({width} x {height} pixels, at most {MAX_IMAGE_PIXELS} "
                "accepted); downscale it",
            )
    return images


def _expand_images(
    text: str, placeholder: str, image_texts: list[str]
) -> tuple[str, list[int], list[tuple[int, int]]]:
    """``text`` with its k-th ``placeholder`` replaced by ``image_texts[k]``; for each
    character offset of ``text`` (and its end) the same character's offset after that; and
    each image text's span of characters in the result."""
    pieces = text.split(placeholder)
    if len(pieces) - 1 != len(image_texts):
        raise RowError(
            "image_count",
            f"the template writes {len(pieces) - 1} image placeholders for "
            f"{len(image_texts)} images",
        )
    shift = np.zeros(len(text) + 1, dtype=np.int64)
    out, at, spans = [pieces[0]], len(pieces[0]), []
    for image_text, piece in zip(image_texts, pieces[1:], strict=True):
        start = at + int(shift[at])
        spans.append((start, start + len(image_text)))
        at += len(placeholder)
        shift[at:] += len(image_text) - len(placeholder)
        out.append(image_text + piece)
        at += len(piece)
    return "".join(out), (np.arange(len(text) + 1) + shift).tolist(), spans


def encode_vision_conversation(
    processor: VisionProcessor,
    messages: list[dict[str, Any]],
    chat_template_kwargs: dict[str, Any] | None = None,
) -> VisionSample:
    """Template, tokenise and mask one conversation with images (see the module docstring)."""
    parsed, paths = parse_vision_messages(messages)
    template = ChatTemplate(
        _PartsTokenizer(processor.tokenizer, processor.chat_template),
        chat_template_kwargs=chat_template_kwargs,
    )
    text, spans = template.spans(parsed)
    images = load_images(paths)
    pixels: dict[str, Tensor] = {}
    image_texts: list[str] = []
    if images:
        pixels = dict(processor.image_processor(images=images, return_tensors="pt"))
        image_texts = [processor.image_text(grid) for grid in pixels["image_grid_thw"]]
    expanded, moved, image_spans = _expand_images(text, processor.placeholder, image_texts)
    encoding = processor.tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        mask |= (starts < moved[end]) & (ends > moved[start])
    for start, end in image_spans:
        mask &= (starts >= end) | (ends <= start)
    types = torch.full_like(ids, TEXT_TYPE)
    types[ids == processor.video_token_id] = VIDEO_TYPE
    types[ids == processor.image_token_id] = IMAGE_TYPE
    expected = sum(t.count(processor.image_token) for t in image_texts)
    if int((types == IMAGE_TYPE).sum()) != expected:
        raise RowError("image_count", "the image placeholder does not tokenise to one token")
    markers = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(processor.markers)))
    text_only = (types == TEXT_TYPE) & ~torch.isin(ids, markers)
    loss_mask = torch.from_numpy(mask).long() * text_only
    return VisionSample(
        input_ids=ids,
        loss_mask=loss_mask,
        mm_token_type_ids=types,
        pixel_values=pixels.get("pixel_values", torch.empty(0)),
        image_grid_thw=pixels.get("image_grid_thw", torch.empty(0, 3, dtype=torch.long)),
    )


LLAVA_IMAGE = "<image>"  # where a LLaVA / ShareGPT4V row's images sit in its turns' text


def _llava_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A LLaVA / ShareGPT4V row (``image``: one path or a list, ``conversations`` of
    ``from``/``value`` turns with ``<image>`` placeholders) as messages with content parts.
    Images without a placeholder go before the first turn's text, as LLaVA places them."""
    images = row.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    turns = row.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise RowError("unknown_format", "a LLaVA row needs a list of conversation turns")
    placed = sum(str(t.get("value", "")).count(LLAVA_IMAGE) for t in turns)
    if placed not in (0, len(images)):
        raise RowError(
            "image_count", f"{placed} {LLAVA_IMAGE} placeholders for {len(images)} images"
        )
    pending = iter(images)
    messages = []
    for k, turn in enumerate(turns):
        text = str(turn.get("value", ""))
        if placed == 0 and k == 0:
            text = LLAVA_IMAGE * len(images) + text
        parts: list[dict[str, Any]] = []
        for n, piece in enumerate(text.split(LLAVA_IMAGE)):
            if n:
                parts.append({"type": "image", "image": next(pending)})
                piece = piece.removeprefix("\n")  # LLaVA writes "<image>\n" before the text
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": turn.get("from"), "content": parts})
    return messages


def vision_messages(row: Any, folder: Path) -> list[dict[str, Any]]:
    """A row's messages with content parts, its image paths made absolute against
    ``folder`` (the data file's): OpenAI-style ``messages``, or a LLaVA / ShareGPT4V row."""
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        messages = row["messages"]
    elif isinstance(row, dict) and "conversations" in row:
        messages = _llava_messages(row)
    else:
        raise RowError("unknown_format", "a row with images needs `messages` or `conversations`")
    resolved = []
    for k, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            resolved.append(message)
            continue
        parts = [
            {"type": "image", "image": str(folder / _image_path(p, f"message {k}"))}
            if isinstance(p, dict) and p.get("type") in ("image", "image_url")
            else p
            for p in content
        ]
        resolved.append({**message, "content": parts})
    return resolved
