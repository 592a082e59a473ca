"""Evaluation prompts with images, for a vision-language target.

Prompt rows take the forms the training data takes (:mod:`draftforge.data.vision`):
OpenAI-style content parts (``{"type": "image", "image": path}`` or ``image_url`` with a
local path) and LLaVA / ShareGPT4V rows (an ``image`` field, ``<image>`` placeholders),
image paths relative to the JSONL file. :func:`encode_image_prompt` renders such a prompt
through the target's chat template with the generation prompt, puts each image's tokens in
place of its placeholder (``VisionProcessor.image_text``: Qwen-VL's image token once per
merged patch) and returns the image processor's inputs beside the token ids.

Built-in image prompts (:func:`builtin_image_prompts`) ask about pictures drawn in code by
:mod:`draftforge.synthetic_images` (shapes, a line of text, a bar chart, and two pictures at
once); no third-party image ships.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from draftforge.data.conversation import ROLE_ALIASES, RowError
from draftforge.data.vision import IMAGE_TYPE, VisionProcessor, load_images, vision_messages
from draftforge.decode.vision import ImageInputs
from draftforge.synthetic_images import SyntheticImage, synthetic_image

# What each built-in prompt asks about its picture.
QUESTIONS = {
    "shapes": "Which shapes are in this picture, from left to right, and what colours are they?",
    "text": "What does the text in this image say?",
    "chart": "Read this bar chart: which bar is tallest, and what are the values?",
}
IMAGE_PARTS = ("image", "image_url")


def has_images(row: Any) -> bool:
    """Whether a prompt row holds images (content parts or a LLaVA ``image`` field)."""
    if not isinstance(row, dict):
        return False
    if row.get("image"):
        return True
    messages = row.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict)
        and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS for p in m["content"])
        for m in messages
    )


def image_row_messages(row: dict[str, Any], folder: Any) -> list[dict[str, Any]]:
    """A row with images as chat messages with content parts, roles normalised and image
    paths made absolute against ``folder`` (the prompt file's)."""
    messages = []
    for message in vision_messages(row, folder):
        role = ROLE_ALIASES.get(str(message.get("role", "")).lower())
        if role is None:
            raise RowError("unknown_role", f"role {message.get('role')!r}")
        messages.append({**message, "role": role})
    return messages


def _template_parts(
    messages: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The messages as the chat template takes them (each image part a bare ``{"type":
    "image"}``) and each image's source in order: a path, or an image drawn in memory."""
    rendered, sources = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            rendered.append(message)
            continue
        parts = []
        for part in content:
            if part.get("type") in IMAGE_PARTS:
                sources.append(part.get("image"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        rendered.append({**message, "content": parts})
    return rendered, sources


def _images(sources: list[Any]) -> list[Any]:
    """RGB images from paths (a missing or unreadable file is a RowError naming it) or from
    images already drawn."""
    images = []
    for source in sources:
        if isinstance(source, str):
            images.extend(load_images([source]))
        elif hasattr(source, "convert"):
            images.append(source.convert("RGB"))
        else:
            raise RowError("bad_image", f"an image part without a path: {source!r}")
    return images


def check_images(messages: list[dict[str, Any]]) -> None:
    """Read every image of a prompt once, so a missing or unreadable one is reported (a
    RowError naming its path) before any model is loaded."""
    _images(_template_parts(messages)[1])


def encode_image_prompt(
    processor: VisionProcessor, messages: list[dict[str, Any]]
) -> tuple[list[int], ImageInputs | None]:
    """A prompt's token ids, ready for the assistant's answer, and its image inputs (None
    without images)."""
    rendered, sources = _template_parts(messages)
    text = processor.tokenizer.apply_chat_template(
        rendered, add_generation_prompt=True, tokenize=False
    )
    pieces = text.split(processor.placeholder)
    if len(pieces) - 1 != len(sources):
        raise RowError(
            "image_count",
            f"the chat template writes {len(pieces) - 1} image placeholders for "
            f"{len(sources)} images",
        )
    if not sources:
        return processor.tokenizer(text, add_special_tokens=False)["input_ids"], None
    pixels = processor.image_processor(images=_images(sources), return_tensors="pt")
    image_texts = [processor.image_text(grid) for grid in pixels["image_grid_thw"]]
    expanded = pieces[0] + "".join(
        image + piece for image, piece in zip(image_texts, pieces[1:], strict=True)
    )
    ids = torch.tensor(processor.tokenizer(expanded, add_special_tokens=False)["input_ids"])
    types = torch.where(ids == processor.image_token_id, IMAGE_TYPE, 0)
    expected = sum(image.count(processor.image_token) for image in image_texts)
    if int((types == IMAGE_TYPE).sum()) != expected:
        raise RowError("image_count", "the image placeholder does not tokenise to one token")
    return ids.tolist(), ImageInputs(pixels["pixel_values"], pixels["image_grid_thw"], types)


def _ask(drawn: list[SyntheticImage], question: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image", "image": d.image} for d in drawn]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def builtin_image_prompts(seed: int = 0) -> list[tuple[str, list[dict[str, Any]]]]:
    """(id, messages) of the built-in image prompts: one picture of each kind with its
    question, then two pictures in one prompt, all drawn from ``seed``."""
    rng = random.Random(seed)
    drawn = {kind: synthetic_image(kind, rng) for kind in QUESTIONS}
    prompts = [(f"image-{kind}", _ask([d], QUESTIONS[kind])) for kind, d in drawn.items()]
    pair = [drawn["shapes"], drawn["chart"]]
    prompts.append(("image-pair", _ask(pair, "What do these two pictures have in common?")))
    return prompts
