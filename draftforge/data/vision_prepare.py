"""Datasets of conversations with images, for a vision-language target.

Rows come from local data files as for text conversations (``file:line`` locations), in
either form :func:`~draftforge.data.vision.vision_messages` reads, with image paths relative
to their data file's folder. Each row is templated, tokenised and masked through the
target's processor (:func:`~draftforge.data.vision.encode_vision_conversation`) and gets the
language model's position ids, which for Qwen-VL's M-RoPE depend on the image grids: the
draft must rotate by the positions the target used. A bad image (missing, unreadable) or a
row whose images would be cut by ``max_length`` is a skipped row of the report, like any
other bad row.

The samples stay in memory: pixel values are kept per sample, beside the token arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from draftforge.data.conversation import RowError
from draftforge.data.prepare import PrepareResult, _nothing_usable
from draftforge.data.readers import Source
from draftforge.data.report import DataError, DataReport
from draftforge.data.vision import (
    TEXT_TYPE,
    VisionProcessor,
    VisionSample,
    encode_vision_conversation,
    vision_messages,
)
from draftforge.data.vocab import build_draft_vocab, save_draft_vocab

# A sample's language-model position ids, [3, T] for M-RoPE (from the target's own rule).
Positions = Callable[[VisionSample], Tensor]


@dataclass
class VisionDataset:
    """Prepared conversations with images: what training reads of a dataset (ids, lengths,
    rows with input ids, loss mask and position ids) plus each row's image inputs."""

    path: Path  # the folder its draft vocabulary is saved in
    ids: list[str]
    samples: list[VisionSample]
    positions: list[Tensor]  # [3, T] per sample
    report: DataReport
    stats: dict[str, Any]

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        return [s.input_ids.numel() for s in self.samples]

    @property
    def key(self) -> str:
        """What names the data and settings it was prepared from (its folder, named by a
        hash of them): the dataset key in a capture's settings."""
        return self.path.name

    @property
    def input_ids(self) -> Tensor:
        """All rows' token ids, concatenated (for the draft vocabulary's counts)."""
        return torch.cat([s.input_ids for s in self.samples])

    @property
    def loss_mask(self) -> Tensor:
        return torch.cat([s.loss_mask for s in self.samples])

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.samples[i]
        return {
            "id": self.ids[i],
            "input_ids": sample.input_ids,
            "loss_mask": sample.loss_mask.bool(),
            "position_ids": self.positions[i],
        }


def _cut(sample: VisionSample, max_length: int) -> VisionSample:
    """``sample`` cut to ``max_length`` tokens; a RowError when that would cut an image."""
    if sample.input_ids.numel() <= max_length:
        return sample
    if (sample.mm_token_type_ids[max_length:] != TEXT_TYPE).any():
        raise RowError("image_cut", f"an image ends after data.max_length ({max_length}) tokens")
    return VisionSample(
        input_ids=sample.input_ids[:max_length],
        loss_mask=sample.loss_mask[:max_length],
        mm_token_type_ids=sample.mm_token_type_ids[:max_length],
        pixel_values=sample.pixel_values,
        image_grid_thw=sample.image_grid_thw,
    )


def encode_vision_row(
    processor: VisionProcessor,
    row: Any,
    folder: Path,
    max_length: int,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[VisionSample, bool]:
    """One row as a sample (cut to ``max_length``), and whether it was cut; RowError when
    it cannot be used."""
    sample = encode_vision_conversation(
        processor, vision_messages(row, folder), chat_template_kwargs
    )
    cut = _cut(sample, max_length)
    if not cut.loss_mask.any():
        raise RowError(
            "no_supervised_tokens", f"no assistant token in the first {max_length} tokens"
        )
    return cut, cut is not sample


def read_vision_dataset(
    path: str | Path,
    processor: VisionProcessor,
    positions: Positions,
    out_dir: Path,
    *,
    max_length: int = 2048,
    strict: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> VisionDataset:
    """Every usable row of the local data files at ``path`` as a sample with its positions;
    the report counts and locates the rest."""
    source = Source.open(path)
    if source.hub is not None:
        raise DataError(f"{path}: conversations with images are read from local files only")
    report = DataReport(strict=strict)
    ids, samples, rows_positions, truncated = [], [], [], 0
    for file in source.files:
        for where, row in Source(str(file), "train", [file]).rows():
            report.rows_read += 1
            try:
                if isinstance(row, RowError):
                    raise row
                sample, cut = encode_vision_row(
                    processor, row, file.parent, max_length, chat_template_kwargs
                )
            except RowError as err:
                report.skip(err.reason, where, err.detail)
                continue
            ids.append(str(row.get("id", where)) if isinstance(row, dict) else where)
            samples.append(sample)
            rows_positions.append(positions(sample))
            truncated += cut
    tokens = sum(s.input_ids.numel() for s in samples)
    stats = {
        "rows": len(samples),
        "tokens": tokens,
        "supervised_tokens": int(sum(int(s.loss_mask.sum()) for s in samples)),
        "rows_truncated": truncated,
    }
    return VisionDataset(out_dir, ids, samples, rows_positions, report, stats)


def prepare_vision(
    path: str | Path,
    processor: VisionProcessor,
    positions: Positions,
    out_dir: str | Path,
    *,
    max_length: int = 2048,
    strict: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    draft_vocab_size: int = 32000,
    target_vocab_size: int,
) -> PrepareResult:
    """The dataset of ``path`` and its draft vocabulary (saved in ``out_dir``), as
    :func:`~draftforge.data.prepare.prepare` returns them for text conversations."""
    out_dir = Path(out_dir)
    dataset = read_vision_dataset(
        path,
        processor,
        positions,
        out_dir,
        max_length=max_length,
        strict=strict,
        chat_template_kwargs=chat_template_kwargs,
    )
    if not len(dataset):
        raise DataError(_nothing_usable(str(path), dataset.report))
    vocab = build_draft_vocab(
        dataset.input_ids,
        dataset.loss_mask,
        target_vocab_size=target_vocab_size,
        draft_vocab_size=draft_vocab_size,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path = out_dir / f"draft_vocab_{draft_vocab_size}_of_{target_vocab_size}.safetensors"
    save_draft_vocab(vocab, vocab_path)
    return PrepareResult(dataset, vocab, vocab_path)
