"""Llama-4's image inputs without torchvision: tiles of pixels (the tokens that stand for
them in the text are :class:`~draftforge.data.vision.Llama4VisionProcessor`'s).

transformers 5.24 has only a torchvision backend for Llama-4 images
(``models/llama4/image_processing_llama4.py`` imports ``torchvision.transforms.v2``), and
torchvision does not import beside the CPU torch build draftforge pins. This module follows
that processor's rules with Pillow and torch: the canvas is a grid of square tiles (at most
``max_patches`` of them) chosen to scale the image as little as possible, never up past one
tile; the image is resized into it keeping its aspect ratio, zero-padded right and bottom,
rescaled and normalised in bfloat16 (as the original does), and cut into tiles row by row;
an image of several tiles gets one more, the whole image squeezed into a single tile. What
differs: Pillow's bilinear resampling instead of torchvision's, so pixel values are close to
the original processor's, not equal to them.

The text of one image (transformers' ``Llama4Processor._prompt_split_image``):
``<|image_start|>``, then for several tiles each tile's patch tokens row by row, tiles
separated by ``<|tile_x_separator|>`` and rows ended by ``<|tile_y_separator|>``, then
``<|image|>`` and the global tile's patch tokens, then ``<|image_end|>``. The chat template
writes ``<|image|>`` where an image goes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

CONFIG_NAME = "preprocessor_config.json"


def canvases(tile: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every grid of at most ``max_tiles`` tiles, as (height, width) in pixels."""
    return [
        (rows * tile, (count // rows) * tile)
        for count in range(max_tiles, 0, -1)
        for rows in range(1, count + 1)
        if count % rows == 0
    ]


def best_canvas(height: int, width: int, tile: int, max_tiles: int, to_max: bool) -> tuple:
    """The canvas an image of ``height`` x ``width`` is fitted into: of the scales each canvas
    allows without distortion, the smallest one that does not shrink the image (the largest
    with ``to_max``), else the largest one that does; ties go to the smaller canvas."""
    options = canvases(tile, max_tiles)
    scales = [min(h / height, w / width) for h, w in options]
    up = [s for s in scales if s >= 1]
    chosen = (max(up) if to_max else min(up)) if up else max(scales)
    fits = [c for c, s in zip(options, scales, strict=True) if s == chosen]
    return min(fits, key=lambda c: c[0] * c[1])


def fitted_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """The largest size of the image's aspect ratio inside ``canvas`` (height, width)."""
    scale_h, scale_w = canvas[0] / height, canvas[1] / width
    if scale_w < scale_h:
        return max(min(int(height * scale_w), canvas[0]), 1), canvas[1]
    return canvas[0], max(min(int(width * scale_h), canvas[1]), 1)


@dataclass
class Llama4Tiles:
    """Llama-4's image processor settings (its ``preprocessor_config.json``) and the tiling
    they imply; ``__call__`` returns ``pixel_values`` ``[tiles, 3, S, S]`` over all images and
    ``image_grid_thw`` ``[images, 3]``: each image's (tiles, tile rows, tile columns)."""

    tile: int = 336
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    rescale_factor: float = 1 / 255

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Llama4Tiles:
        settings = json.loads((Path(path) / CONFIG_NAME).read_text())
        size = settings.get("size", {"height": 336, "width": 336})
        if size.get("height") != size.get("width"):
            raise ValueError(f"{path}/{CONFIG_NAME}: size must be square, got {size}")
        return cls(
            tile=int(size["height"]),
            max_patches=int(settings.get("max_patches", 16)),
            resize_to_max_canvas=bool(settings.get("resize_to_max_canvas", False)),
            image_mean=list(settings.get("image_mean", [0.5, 0.5, 0.5])),
            image_std=list(settings.get("image_std", [0.5, 0.5, 0.5])),
            rescale_factor=float(settings.get("rescale_factor", 1 / 255)),
        )

    def save_pretrained(self, path: str | Path) -> None:
        settings = {
            "image_processor_type": "Llama4ImageProcessorFast",
            "size": {"height": self.tile, "width": self.tile},
            "max_patches": self.max_patches,
            "resize_to_max_canvas": self.resize_to_max_canvas,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "rescale_factor": self.rescale_factor,
            "resample": 2,  # bilinear
        }
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")

    def _normalised(self, image: Any, size: tuple[int, int], canvas: tuple[int, int]) -> Tensor:
        """``image`` resized to ``size`` (height, width), zero-padded to ``canvas``, rescaled
        and normalised in bfloat16 -> float32 ``[3, H, W]``."""
        resized = image.resize((size[1], size[0]), resample=2)  # PIL's BILINEAR
        pixels = torch.zeros(3, *canvas)
        pixels[:, : size[0], : size[1]] = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        scaled = pixels.to(torch.bfloat16) * self.rescale_factor
        return ((scaled - mean) / std).to(torch.bfloat16).float()

    def layout(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The canvas of an image of ``height`` x ``width`` pixels and the size it is resized
        to inside it (both (height, width)); the image grows past one tile only with
        ``resize_to_max_canvas``."""
        canvas = best_canvas(height, width, self.tile, self.max_patches, self.resize_to_max_canvas)
        bound = canvas
        if not self.resize_to_max_canvas:
            bound = (min(max(height, self.tile), canvas[0]), min(max(width, self.tile), canvas[1]))
        return canvas, fitted_size(height, width, bound)

    def tiles(self, image: Any) -> tuple[Tensor, tuple[int, int]]:
        """One RGB PIL image -> its tiles ``[n, 3, S, S]`` and its grid (rows, columns)."""
        canvas, size = self.layout(image.height, image.width)
        pixels = self._normalised(image, size, canvas)
        rows, cols = canvas[0] // self.tile, canvas[1] // self.tile
        tiles = (
            pixels.view(3, rows, self.tile, cols, self.tile)
            .permute(1, 3, 0, 2, 4)
            .reshape(rows * cols, 3, self.tile, self.tile)
        )
        if rows * cols > 1:
            whole = self._normalised(image, (self.tile, self.tile), (self.tile, self.tile))
            tiles = torch.cat([tiles, whole[None]])
        return tiles, (rows, cols)

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Tensor]:
        del return_tensors  # always torch tensors
        tiles, grids = [], []
        for image in images:
            pixels, (rows, cols) = self.tiles(image)
            tiles.append(pixels)
            grids.append([pixels.shape[0], rows, cols])
        return {
            "pixel_values": torch.cat(tiles),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        }
