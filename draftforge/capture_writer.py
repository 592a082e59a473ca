"""How a data-parallel group of a capture writes its slice: which rows go into each shard, the
target's batched forwards over a shard's samples, the shard files, and the progress record
that makes the slice resumable.

Every rank of the group runs the forwards (a tensor-parallel target needs them all); one
rank, the group's writer, writes. A vision-language target runs one sample per forward, its
images with it, and its shards keep the position ids its language model used where they are
not ``0..n-1`` (:mod:`draftforge.shards`). Locks, resuming, merging and repair:
:mod:`draftforge.offline`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save
from torch import Tensor

from draftforge.features import captured_argmax, forward_groups, idle_forwards, target_forwards
from draftforge.shards import FORMAT, STORAGE_DTYPES, VERSION, atomic_write, bytes_per_token
from draftforge.vision_features import vision_states

if TYPE_CHECKING:
    from draftforge.target import Target

# A captured sample: its dataset row, input ids, loss mask, aux and final hidden states, the
# position ids ``[R, n]`` its language model used (None where they are 0..n-1) and the
# target's full-vocabulary argmax (int32) at each index a training step reads it
# (:func:`draftforge.ttt.teacher_rows`), -1 at the others.
Sample = tuple[int, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]


def shard_prefix(slice_: int, slices: int) -> str:
    return f"shard-r{slice_:03d}of{slices:03d}-"


def progress_path(directory: Path, slice_: int, slices: int) -> Path:
    return directory / f"progress-r{slice_:03d}of{slices:03d}.json"


def shard_rows(
    rows: Sequence[int], lengths: Sequence[int], per_token: int, shard_bytes: int
) -> list[list[int]]:
    """The rows of each shard, in order: a shard closes once its tokens reach ``shard_bytes``.

    The split follows from the lengths alone, so how the target batches a shard's samples
    changes neither its rows nor its file name.
    """
    shards: list[list[int]] = []
    tokens = 0
    for row in rows:
        if not shards or tokens * per_token >= shard_bytes:
            shards.append([])
            tokens = 0
        shards[-1].append(row)
        tokens += lengths[row]
    return shards


def forward_count(shards: Sequence[Sequence[int]], lengths: Sequence[int], budget: int) -> int:
    """How many target forwards :func:`shard_samples` runs for these shards."""
    return sum(len(forward_groups([lengths[r] for r in rows], budget)) for rows in shards)


def shard_samples(
    target: Target,
    dataset: Any,
    rows: Sequence[int],
    dtype: torch.dtype,
    budget: int,
    chunk_mb: int,
    done: Callable[[int], object] = lambda _tokens: None,
) -> list[Sample]:
    """The features of dataset rows, in their order, in the storage dtype, on the CPU; the
    target runs ``budget`` padded tokens per forward (``target.batch_tokens``), its head
    ``chunk_mb`` of logits at a time (``target.teacher_chunk_mb``), and ``done`` hears the
    tokens of each forward."""
    if getattr(target, "processor", None) is not None:
        return vision_samples(target, dataset, rows, dtype, chunk_mb, done)
    items = [dataset[row] for row in rows]
    features: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    for group, aux, last in target_forwards(target, [s["input_ids"] for s in items], budget):
        for b, i in enumerate(group):
            n = len(items[i]["input_ids"])
            stored = last[b, :n].to(dtype)
            # Copies: a view would keep the whole padded batch alive until the shard is written.
            features[i] = (
                aux[b, :n].to("cpu", dtype, copy=True),
                stored.to("cpu", copy=True),
                captured_argmax(target, stored, items[i]["loss_mask"], chunk_mb),
            )
        done(sum(len(items[i]["input_ids"]) for i in group))
    samples: list[Sample] = []
    for i, (row, s) in enumerate(zip(rows, items, strict=True)):
        aux, last, argmax = features[i]
        samples.append(
            (row, s["input_ids"].int(), s["loss_mask"].to(torch.uint8), aux, last, None, argmax)
        )
    return samples


def vision_samples(
    target: Target,
    dataset: Any,
    rows: Sequence[int],
    dtype: torch.dtype,
    chunk_mb: int,
    done: Callable[[int], object],
) -> list[Sample]:
    """The features of a vision-language target's dataset rows, in their order: one sample
    per forward, with its images (batching samples whose image grids differ is not done
    yet), and the position ids its language model used when they are not ``0..n-1``."""
    samples: list[Sample] = []
    for row in rows:
        sample = dataset.samples[row]
        found = vision_states(target, sample)
        positions = found.position_ids[:, 0].cpu()
        plain = torch.arange(positions.shape[-1]).expand_as(positions)
        stored = found.final[0].to(dtype)
        samples.append(
            (
                row,
                sample.input_ids.int(),
                sample.loss_mask.to(torch.uint8),
                found.aux[0].to("cpu", dtype, copy=True),
                stored.to("cpu", copy=True),
                None if torch.equal(positions, plain) else positions,
                captured_argmax(target, stored, sample.loss_mask, chunk_mb),
            )
        )
        done(sample.input_ids.numel())
    return samples


def position_rows(samples: list[Sample]) -> int | None:
    """Rows of the position ids a shard of these samples stores; ``None``: it stores none,
    every sample sitting at ``0..n-1``."""
    return next((s[5].shape[0] for s in samples if s[5] is not None), None)


def encode_shard(samples: list[Sample]) -> tuple[bytes, list[int], list[int]]:
    """A shard file's bytes, and the rows and token offsets of its samples."""
    rows = [row for row, *_ in samples]
    offsets = [0, *accumulate(len(ids) for _, ids, *_ in samples)]
    tensors = {
        "rows": torch.tensor(rows, dtype=torch.int64),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "input_ids": torch.cat([s[1] for s in samples]),
        "loss_mask": torch.cat([s[2] for s in samples]),
        "aux": torch.cat([s[3] for s in samples]),
        "hidden": torch.cat([s[4] for s in samples]),
        "argmax": torch.cat([s[6] for s in samples]),
    }
    lines = position_rows(samples)
    if lines is not None:  # every sample's, 0..n-1 for those that sit there
        tensors["positions"] = torch.cat(
            [
                s[5] if s[5] is not None else torch.arange(len(s[1])).expand(lines, -1)
                for s in samples
            ],
            dim=1,
        ).int()
    return save(tensors, metadata={"format": FORMAT, "version": str(VERSION)}), rows, offsets


class SliceWriter:
    """Captures one data-parallel group's slice into shards, recording each finished shard in
    its progress file; on a rank that is not the group's writer (``write=False``) it runs the
    same forwards and writes nothing."""

    def __init__(
        self,
        out: Path,
        settings: dict[str, Any],
        slice_: int,
        slices: int,
        shards: list[dict[str, Any]],
        shard_bytes: int,
        ids: list[str],
        write: bool,
    ) -> None:
        self.out, self.settings, self.slice, self.slices = out, settings, slice_, slices
        self.shards, self.shard_bytes, self.ids, self.write = shards, shard_bytes, ids, write
        self.dtype = STORAGE_DTYPES[settings["storage_dtype"]]
        self.per_token = bytes_per_token(settings["hidden_size"], settings["storage_dtype"])

    def run(
        self,
        target: Target,
        dataset: Any,
        todo: list[list[int]],
        budget: int,
        chunk_mb: int,
        idle: int,
        bar: Any,
    ) -> int:
        """Capture the shards of ``todo`` (rows each), ``budget`` padded tokens per target
        forward and ``chunk_mb`` of logits at a time in its head, then run ``idle``
        one-token forwards (an FSDP-sharded target's ranks run as many forwards as the
        busiest), updating ``bar`` per forward; return the tokens captured."""
        for rows in todo:
            samples = shard_samples(target, dataset, rows, self.dtype, budget, chunk_mb, bar.update)
            if self.write:
                self._flush(samples)
        idle_forwards(target, idle)
        bar.close()
        if self.write:
            self._save_progress(done=True)
        lengths = dataset.lengths()
        return sum(lengths[r] for rows in todo for r in rows)

    def _flush(self, samples: list[Sample]) -> None:
        data, rows, offsets = encode_shard(samples)
        name = f"{shard_prefix(self.slice, self.slices)}{len(self.shards):06d}.safetensors"
        atomic_write(self.out / name, data)
        self.shards.append(
            {
                "file": name,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "rows": rows,
                "ids": [self.ids[row] for row in rows],
                "offsets": offsets,
                "argmax": True,
            }
        )
        lines = position_rows(samples)
        if lines is not None:
            self.shards[-1]["positions"] = lines
        # Only now is the shard on record: a kill before this line leaves an unlisted file,
        # which the next run deletes and writes again.
        self._save_progress(done=False)

    def _save_progress(self, done: bool) -> None:
        state = {
            "format": FORMAT,
            "version": VERSION,
            "settings": self.settings,
            "done": done,
            "shards": self.shards,
        }
        path = progress_path(self.out, self.slice, self.slices)
        atomic_write(path, json.dumps(state).encode())
