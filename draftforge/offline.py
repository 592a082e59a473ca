"""Offline mode: capture the target's features to disk once, train drafts from them many times.

What is stored, where, and how it is checked before training: :mod:`draftforge.shards`.
Training reads a capture through :class:`draftforge.features.OfflineFeatures`.

The target runs several samples per forward (``target.batch_tokens``, as in online training:
:func:`draftforge.features.target_forwards`), over the samples of one shard at a time; which
samples go into a shard follows from their lengths alone (:func:`shard_rows`).

Capture is resumable: every file is written under a temporary name, fsynced and renamed into
place, and a rank's progress file is rewritten the same way after each shard, so a killed
capture leaves whole shards and a record of them; a rerun drops files the record does not
list and continues after its last shard. Under ``torchrun`` each rank captures a contiguous
slice holding about 1/world of the tokens, with a whole target of its own (data parallel
only); rank 0 waits for the others' progress files to say done, then writes the manifest.
No process group is needed: torchrun ends every rank when one fails.

One capture at a time in a folder: rank 0 holds its lock (:mod:`draftforge.locks`) and the
other ranks touch nothing there before it does. A rerun over a finished capture checks it as
training does (:func:`draftforge.shards.damaged_shards`) before it says there is nothing left
to capture: each missing or damaged shard is named and captured again, and the manifest
rewritten. A resumed capture checks its recorded shards' sizes, and their sha256 unless
``data.verify_checksums=false``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors.torch import save
from torch import Tensor

from draftforge import __version__, locks, parallel
from draftforge.check import preflight
from draftforge.config import Config
from draftforge.features import load_data, target_forwards
from draftforge.progress import progress_bar
from draftforge.shards import (
    ELSEWHERE,
    FORMAT,
    MANIFEST,
    STORAGE_DTYPES,
    VERSION,
    ShardError,
    atomic_write,
    bytes_per_token,
    capture_settings,
    check_settings,
    damaged_shards,
    features_dir,
    file_problem,
    read_json,
    size_text,
)
from draftforge.target import Target, load_target

if TYPE_CHECKING:
    from draftforge.data import PrepareResult


# ----------------------------------------------------------------------------- layout


def rank_slice(lengths: Sequence[int], rank: int, world: int) -> range:
    """Rank ``rank``'s samples: a contiguous run holding about 1/world of the tokens.

    The slices of ranks 0..world-1 are disjoint and cover every sample: boundary r is the
    first sample whose preceding tokens reach r/world of the total, which grows with r.
    """
    prefix = [0, *accumulate(lengths)]  # prefix[i]: tokens of samples before i
    total = prefix[-1]

    def boundary(r: int) -> int:
        if r >= world:
            return len(lengths)
        return bisect_left(prefix, total * r, key=lambda tokens: tokens * world)

    return range(boundary(rank), boundary(rank + 1))


def check_disk(directory: Path, tokens: int, per_token: int) -> None:
    """Refuse to start a capture that would not fit on the disk of ``directory``."""
    need, free = tokens * per_token, shutil.disk_usage(directory).free
    if need > free:
        raise ShardError(
            f"{directory}: capture needs about {size_text(need)} ({tokens:,} tokens x {per_token:,} "
            f"bytes/token) but the disk has {size_text(free)} free; "
            "free space, set data.features_dir on a larger disk, or a smaller data.storage_dtype"
        )


def _shard_prefix(rank: int, world: int) -> str:
    return f"shard-r{rank:03d}of{world:03d}-"


def _progress_path(directory: Path, rank: int, world: int) -> Path:
    return directory / f"progress-r{rank:03d}of{world:03d}.json"


# ----------------------------------------------------------------------------- capture


@dataclass
class CaptureResult:
    directory: Path
    rank: int
    manifest: dict[str, Any] | None  # rank 0 only
    tokens: int  # captured by this process in this run
    seconds: float

    def summary(self) -> str:
        lines = []
        if self.manifest is not None:
            m = self.manifest
            lines.append(
                f"features of {m['samples']} samples ({m['tokens']:,} tokens) in "
                f"{len(m['shards'])} shards, {size_text(m['bytes'])} "
                f"({m['bytes_per_token']:,} bytes/token, {m['settings']['storage_dtype']}), "
                f"in {self.directory}"
            )
        if self.tokens:
            rate = self.tokens / max(self.seconds, 1e-9)
            lines.append(f"this run captured {self.tokens:,} tokens at {rate:,.0f} tokens/s")
        else:
            lines.append("nothing left to capture")
        return "\n".join(lines)


def _rank_world() -> tuple[int, int, int]:
    """(rank, world size, local rank): torch.distributed's if initialised, else torchrun's."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local


def _quiet(*_args: object, **_kwargs: object) -> None:
    """``print`` for ranks other than 0."""


def capture(
    cfg: Config,
    target: Target | None = None,
    *,
    progress: bool = True,
    prepared: PrepareResult | None = None,
) -> CaptureResult:
    """Capture the features of every sample of the prepared dataset into shards (resumable).

    Uses the same ``prepare`` call and cache as ``train`` (or ``prepared``, see
    :func:`~draftforge.features.load_data`). Runs as one process or under torchrun, each rank
    capturing its own slice. Rank 0 holds the features folder's lock (:mod:`draftforge.locks`);
    the other ranks touch nothing in it before it does. A finished capture is checked as
    training checks it, and its missing or damaged shards are captured again.
    """
    cfg.validate()
    rank, world, local_rank = _rank_world()
    log = print if rank == 0 else _quiet
    target = target or load_target(
        cfg.target, parallel.default_device(local_rank, cfg.parallel.device)
    )
    log(parallel.describe_device(target.device, target.model.dtype), flush=True)
    prepared = preflight(
        cfg, target, prepared, world=world, device=target.device, stage="capture", log=log
    )
    dataset, _ = load_data(cfg, target, log, prepared)
    settings = capture_settings(cfg, target, dataset)
    out = features_dir(cfg, settings)
    if rank != 0:
        if _wait_for_rank_0(out):
            return CaptureResult(out, rank, None, 0, 0.0)  # finished: rank 0 checks it
        return _capture_slices(cfg, out, settings, target, dataset, progress)
    with locks.hold(
        out, "draftforge capture", ShardError, "set data.features_dir to another folder"
    ):
        finished = read_json(out / MANIFEST)
        if finished is None:
            return _capture_slices(cfg, out, settings, target, dataset, progress)
        start = time.perf_counter()
        damaged = damaged_shards(
            out, finished, settings, dataset, checksums=cfg.data.verify_checksums, hint=ELSEWHERE
        )
        budget = cfg.target.batch_tokens
        tokens = _repair(out, finished, damaged, target, dataset, budget) if damaged else 0
        return CaptureResult(out, rank, finished, tokens, time.perf_counter() - start)


def _wait_for_rank_0(out: Path) -> bool:
    """Wait until rank 0 of this job holds the lock on ``out`` (the other ranks' first step);
    True when the capture there is finished, with nothing left for this rank to do."""
    while not locks.held_by_this_job(out):
        if (out / MANIFEST).is_file():
            return True
        time.sleep(0.2)
    return (out / MANIFEST).is_file()


def _capture_slices(
    cfg: Config,
    out: Path,
    settings: dict[str, Any],
    target: Target,
    dataset: Any,
    progress: bool,
) -> CaptureResult:
    """Capture this rank's slice, after the shards a killed run left; rank 0 then waits for the
    other ranks and writes the manifest."""
    rank, world, _ = _rank_world()
    log = print if rank == 0 else _quiet
    lengths = dataset.lengths()
    shards, done = _resume(out, settings, rank, world, cfg.data.verify_checksums)
    per_token = bytes_per_token(target.hidden_size, settings["storage_dtype"])
    shard_bytes = int(cfg.data.shard_mb * 1e6)
    recorded = _recorded_tokens(out, world, rank, shards)
    remaining = sum(lengths) - recorded
    log(
        f"capture: {remaining:,} tokens to go x {per_token:,} bytes/token = about "
        f"{size_text(remaining * per_token)} into {out} ({size_text(shutil.disk_usage(out).free)} free)",
        flush=True,
    )
    check_disk(out, remaining, per_token)

    start = time.perf_counter()
    tokens = 0
    if not done:
        writer = _SliceWriter(out, settings, rank, world, shards, shard_bytes, dataset.ids)
        rows = rank_slice(lengths, rank, world)
        tokens = writer.run(
            target, dataset, rows, cfg.target.batch_tokens, progress, cfg.output.progress_interval_s
        )
    manifest = None
    if rank == 0:
        _wait_for_ranks(out, world, log)
        manifest = _merge(out, settings, world, len(lengths), per_token)
    return CaptureResult(out, rank, manifest, tokens, time.perf_counter() - start)


def _repair(
    out: Path,
    manifest: dict[str, Any],
    damaged: list[tuple[dict[str, Any], str]],
    target: Target,
    dataset: Any,
    budget: int,
) -> int:
    """Capture the samples of each damaged shard again into its file, then rewrite the
    manifest; return the tokens captured."""
    dtype = STORAGE_DTYPES[manifest["settings"]["storage_dtype"]]
    for entry, problem in damaged:
        print(f"{problem}; capturing it again", flush=True)
        data, _, _ = _encode(_samples(target, dataset, entry["rows"], dtype, budget))
        atomic_write(out / entry["file"], data)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["bytes"] = sum(entry["bytes"] for entry in manifest["shards"])
    atomic_write(out / MANIFEST, json.dumps(manifest).encode())
    return sum(entry["offsets"][-1] for entry, _ in damaged)


def _resume(
    out: Path, settings: dict[str, Any], rank: int, world: int, checksums: bool
) -> tuple[list[dict[str, Any]], bool]:
    """This rank's finished shards that are still whole (size, and sha256 with ``checksums``),
    and whether its slice is done."""
    for other in out.glob("progress-r*of*.json"):
        started = re.fullmatch(r"progress-r\d+of(\d+)\.json", other.name)
        if started and int(started.group(1)) != world:
            raise ShardError(
                f"{out}: this capture was started with {int(started.group(1))} processes; "
                f"resume it with torchrun --nproc-per-node {int(started.group(1))}, "
                "or delete the folder to start over"
            )
    path = _progress_path(out, rank, world)
    state = read_json(path)
    shards: list[dict[str, Any]] = []
    if state is not None:
        check_settings(state.get("settings", {}), settings, path, ELSEWHERE)
        for entry in state["shards"]:
            problem = file_problem(out / entry["file"], entry, checksums, path.name)
            if problem is not None:
                print(f"{problem}; capturing again from it", flush=True)
                break
            shards.append(entry)
    # Leftovers of a killed run: temporary files, and shards renamed into place whose
    # progress entry was never written (they would be written again, identically).
    prefix = _shard_prefix(rank, world)
    keep = {entry["file"] for entry in shards}
    leftovers = [
        *out.glob(f".tmp-{prefix}*"),
        *out.glob(f"{prefix}*"),
        *out.glob(f".tmp-{path.name}"),
    ]
    for stale in leftovers:
        if stale.name not in keep:
            stale.unlink()
    done = state is not None and state.get("done", False) and len(shards) == len(state["shards"])
    return shards, done


def _recorded_tokens(out: Path, world: int, rank: int, mine: list[dict[str, Any]]) -> int:
    """Tokens already in finished shards, over all ranks (for the disk estimate)."""
    total = sum(entry["offsets"][-1] for entry in mine)
    for other in range(world):
        state = read_json(_progress_path(out, other, world)) if other != rank else None
        if state is not None:
            total += sum(entry["offsets"][-1] for entry in state["shards"])
    return total


# A captured sample: its dataset row, input ids, loss mask, aux and final hidden states.
Sample = tuple[int, Tensor, Tensor, Tensor, Tensor]


def _samples(
    target: Target,
    dataset: Any,
    rows: Sequence[int],
    dtype: torch.dtype,
    budget: int,
    done: Callable[[int], object] = lambda _tokens: None,
) -> list[Sample]:
    """The features of dataset rows, in their order, in the storage dtype, on the CPU; the
    target runs ``budget`` padded tokens per forward (``target.batch_tokens``), and ``done``
    hears the tokens of each forward."""
    items = [dataset[row] for row in rows]
    features: dict[int, tuple[Tensor, Tensor]] = {}
    for group, aux, last in target_forwards(target, [s["input_ids"] for s in items], budget):
        for b, i in enumerate(group):
            n = len(items[i]["input_ids"])
            # Copies: a view would keep the whole padded batch alive until the shard is written.
            features[i] = (
                aux[b, :n].to("cpu", dtype, copy=True),
                last[b, :n].to("cpu", dtype, copy=True),
            )
        done(sum(len(items[i]["input_ids"]) for i in group))
    return [
        (row, s["input_ids"].int(), s["loss_mask"].to(torch.uint8), *features[i])
        for i, (row, s) in enumerate(zip(rows, items, strict=True))
    ]


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


def _encode(samples: list[Sample]) -> tuple[bytes, list[int], list[int]]:
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
    }
    return save(tensors, metadata={"format": FORMAT, "version": str(VERSION)}), rows, offsets


class _SliceWriter:
    """Captures one rank's slice into shards, recording each finished shard in its progress
    file."""

    def __init__(
        self,
        out: Path,
        settings: dict[str, Any],
        rank: int,
        world: int,
        shards: list[dict[str, Any]],
        shard_bytes: int,
        ids: list[str],
    ) -> None:
        self.out, self.settings, self.rank, self.world = out, settings, rank, world
        self.shards, self.shard_bytes, self.ids = shards, shard_bytes, ids
        self.dtype = STORAGE_DTYPES[settings["storage_dtype"]]
        self.per_token = bytes_per_token(settings["hidden_size"], settings["storage_dtype"])

    def run(
        self,
        target: Target,
        dataset: Any,
        rows: range,
        budget: int,
        progress: bool,
        interval_s: float,
    ) -> int:
        """Capture the samples after the recorded shards, ``budget`` padded tokens per target
        forward; return the tokens captured."""
        first = rows.start + sum(len(entry["rows"]) for entry in self.shards)
        todo = range(first, rows.stop)
        lengths = dataset.lengths()
        bar = progress_bar(
            sum(lengths[r] for r in rows),
            initial=sum(lengths[r] for r in range(rows.start, first)),
            desc="capture",
            unit="tok",
            unit_scale=True,
            interval_s=interval_s,
            disable=not progress or self.rank != 0,
        )
        for shard in shard_rows(todo, lengths, self.per_token, self.shard_bytes):
            self._flush(_samples(target, dataset, shard, self.dtype, budget, bar.update))
        bar.close()
        self._save_progress(done=True)
        return sum(lengths[r] for r in todo)

    def _flush(self, samples: list[Sample]) -> None:
        data, rows, offsets = _encode(samples)
        name = f"{_shard_prefix(self.rank, self.world)}{len(self.shards):06d}.safetensors"
        atomic_write(self.out / name, data)
        self.shards.append(
            {
                "file": name,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "rows": rows,
                "ids": [self.ids[row] for row in rows],
                "offsets": offsets,
            }
        )
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
        atomic_write(_progress_path(self.out, self.rank, self.world), json.dumps(state).encode())


def _wait_for_ranks(out: Path, world: int, log: Callable[..., None]) -> None:
    """Block until every rank's progress file says done (torchrun ends us if a rank fails)."""
    waiting: list[int] = []
    while True:
        pending = [
            r
            for r in range(world)
            if not (read_json(_progress_path(out, r, world)) or {}).get("done", False)
        ]
        if not pending:
            return
        if pending != waiting:
            log(f"waiting for ranks {pending} to finish their slices", flush=True)
            waiting = pending
        time.sleep(1.0)


def _merge(
    out: Path, settings: dict[str, Any], world: int, samples: int, per_token: int
) -> dict[str, Any]:
    """Write the manifest from the ranks' progress files, then remove them."""
    shards: list[dict[str, Any]] = []
    for r in range(world):
        state = read_json(_progress_path(out, r, world))
        assert state is not None, "the wait above saw every progress file"
        path = _progress_path(out, r, world)
        check_settings(state.get("settings", {}), settings, path, ELSEWHERE)
        shards.extend(state["shards"])
    for entry in shards:
        file = out / entry["file"]
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise ShardError(f"{file}: missing or resized while merging; run the capture again")
    rows = sorted(row for entry in shards for row in entry["rows"])
    if rows != list(range(samples)):
        raise ShardError(
            f"{out}: the ranks' shards hold {len(rows)} samples, not each of the dataset's "
            f"{samples} once; delete the folder and capture again"
        )
    hidden = settings["hidden_size"]
    storage = settings["storage_dtype"]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings,
        "created_by": f"draftforge {__version__}, torch {torch.__version__}",
        "tensors": {
            "rows": {"dtype": "int64", "shape": ["samples"]},
            "offsets": {"dtype": "int64", "shape": ["samples + 1"]},
            "input_ids": {"dtype": "int32", "shape": ["tokens"]},
            "loss_mask": {"dtype": "uint8", "shape": ["tokens"]},
            "aux": {"dtype": storage, "shape": ["tokens", 3 * hidden]},
            "hidden": {"dtype": storage, "shape": ["tokens", hidden]},
        },
        "bytes_per_token": per_token,
        "samples": samples,
        "tokens": sum(entry["offsets"][-1] for entry in shards),
        "bytes": sum(entry["bytes"] for entry in shards),
        "shards": shards,
    }
    atomic_write(out / MANIFEST, json.dumps(manifest).encode())
    for r in range(world):
        _progress_path(out, r, world).unlink(missing_ok=True)
    return manifest
