"""Synthetic images drawn in code, for vision-language tests and built-in image prompts.

draftforge ships no third-party images: every picture a test or an image prompt needs is
drawn here from a seed with Pillow (coloured shapes, a line of text, a bar chart), together
with a caption that states what the picture shows, so a prompt can ask about it and a
tiny task can be trained on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftforge import require_extra

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 170),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
KINDS = ("shapes", "text", "chart")
_BACKGROUND = (250, 250, 245)
_INK = (20, 20, 20)


@dataclass(frozen=True)
class SyntheticImage:
    """A drawn image and a one-sentence caption of what it shows."""

    image: Any  # a PIL.Image.Image in RGB
    caption: str
    kind: str  # one of KINDS


def _pil() -> Any:
    return require_extra("PIL.Image", "vision", "drawing synthetic images")


def _draw_shape(draw: Any, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)


def shapes_image(rng: random.Random, size: tuple[int, int] = (96, 64)) -> SyntheticImage:
    """Two or three coloured shapes side by side, captioned from left to right."""
    image_mod = _pil()
    from PIL import ImageDraw

    width, height = size
    count = rng.randint(2, 3)
    image = image_mod.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    slot = width // count
    names = []
    side = min(slot, height) * 3 // 4  # each shape fills a square cell centred in its slot
    top = (height - side) // 2
    for k in range(count):
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        left = k * slot + (slot - side) // 2
        _draw_shape(draw, shape, (left, top, left + side, top + side), COLOURS[colour])
        names.append(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}")
    return SyntheticImage(image, "From left to right: " + ", ".join(names) + ".", "shapes")


def text_image(text: str, size: tuple[int, int] = (128, 48)) -> SyntheticImage:
    """``text`` written in black on a light background with Pillow's built-in font."""
    image_mod = _pil()
    from PIL import ImageDraw, ImageFont

    image = image_mod.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((4, size[1] // 3), text, fill=_INK, font=ImageFont.load_default())
    return SyntheticImage(image, f"The image says: {text}.", "text")


def bar_chart_image(
    values: dict[str, int], size: tuple[int, int] = (96, 72), max_value: int = 10
) -> SyntheticImage:
    """A bar chart of ``values`` (label -> 0..max_value), one coloured bar per label on a
    baseline, captioned with the tallest bar."""
    image_mod = _pil()
    from PIL import ImageDraw

    width, height = size
    image = image_mod.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    baseline, top = height - 6, 4
    slot = width // max(1, len(values))
    for k, (label, value) in enumerate(values.items()):
        bar_top = baseline - round((baseline - top) * min(value, max_value) / max_value)
        colour = COLOURS.get(label, _INK)
        draw.rectangle((k * slot + 3, bar_top, (k + 1) * slot - 3, baseline), fill=colour)
    draw.line((0, baseline, width, baseline), fill=_INK, width=1)
    tallest = max(values, key=lambda label: values[label])
    parts = ", ".join(f"{label} {value}" for label, value in values.items())
    return SyntheticImage(image, f"A bar chart ({parts}); the {tallest} bar is tallest.", "chart")


def synthetic_image(kind: str, rng: random.Random) -> SyntheticImage:
    """One image of ``kind`` (see KINDS), its content drawn from ``rng``."""
    if kind == "shapes":
        return shapes_image(rng)
    if kind == "text":
        words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
        return text_image(f"{rng.choice(words)} {rng.randint(10, 99)}")
    if kind == "chart":
        labels = rng.sample(sorted(COLOURS), 3)
        values = dict(zip(labels, rng.sample(range(1, 11), 3), strict=True))
        return bar_chart_image(values)
    raise ValueError(f"unknown synthetic image kind {kind!r}; choose from {KINDS}")


def synthetic_images(count: int, seed: int = 0) -> list[SyntheticImage]:
    """``count`` images cycling through the kinds, the same for the same seed."""
    rng = random.Random(seed)
    return [synthetic_image(KINDS[k % len(KINDS)], rng) for k in range(count)]


def write_synthetic_images(
    directory: str | Path, count: int, seed: int = 0
) -> list[tuple[Path, SyntheticImage]]:
    """Save :func:`synthetic_images` as PNG files ``directory/image_K.png``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for k, drawn in enumerate(synthetic_images(count, seed)):
        path = directory / f"image_{k}.png"
        drawn.image.save(path)
        written.append((path, drawn))
    return written
