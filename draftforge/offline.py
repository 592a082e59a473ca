"""Offline mode: capture the target's features to disk once, train drafts from them many times.

What is stored, where, and how it is checked before training: :mod:`draftforge.shards`.
Training reads a capture through :class:`draftforge.features.OfflineFeatures`.

The target runs several samples per forward (``target.batch_tokens``, as in online training:
:func:`draftforge.features.target_forwards`), over the samples of one shard at a time; which
samples go into a shard follows from their lengths alone (:func:`shard_rows`). A
vision-language target runs one sample per forward with its images, as online training runs
it, and its shards also keep the position ids its language model used (3-row M-RoPE ids for
Qwen-VL) for samples whose positions are not ``0..n-1``; training gives the draft those.

Capture is resumable: every file is written under a temporary name, fsynced and renamed into
place, and a slice's progress file is rewritten the same way after each shard, so a killed
capture leaves whole shards and a record of them; a rerun drops files the record does not
list and continues after its last shard.

Under ``torchrun`` capture takes training's layouts (:mod:`draftforge.parallel`). Each
data-parallel group captures a contiguous slice holding about 1/groups of the tokens, and its
first rank writes it (:mod:`draftforge.capture_writer`). ``parallel.tp`` splits the target
over a group's ranks, ``parallel.fsdp=target|both`` shards it over the groups, and each rank
reads only its pieces of the checkpoint. Ranks of a sharded target run as many forwards as the
busiest. Rank 0 waits for every slice's progress file to say done, then writes the manifest.
A rank that dies or stalls ends the capture after ``parallel.timeout_minutes``, with an error
that names it: a collective times out, or its slice's progress file stops changing.

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
import re
import shutil
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from draftforge import __version__, locks, parallel
from draftforge.capture_writer import (
    SliceWriter,
    encode_shard,
    forward_count,
    progress_path,
    shard_prefix,
    shard_rows,
    shard_samples,
)
from draftforge.check import preflight
from draftforge.config import Config
from draftforge.features import load_data
from draftforge.parallel import CollectiveError, Layout
from draftforge.progress import progress_bar
from draftforge.shards import (
    ELSEWHERE,
    FORMAT,
    MANIFEST,
    STORAGE_DTYPES,
    VERSION,
    ShardError,
    atomic_write,
    capture_settings,
    check_settings,
    damaged_shards,
    features_dir,
    file_problem,
    read_json,
    size_text,
)
from draftforge.target import Target
from draftforge.target_load import target_for_layout

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
    :func:`~draftforge.features.load_data`). Runs as one process or under torchrun with the
    layouts of training (:mod:`draftforge.parallel`): each data-parallel group captures its
    own slice, with a target that ``parallel.tp`` splits over the group's ranks and
    ``parallel.fsdp=target|both`` shards over the groups, each rank reading only its pieces.
    Rank 0 holds the features folder's lock (:mod:`draftforge.locks`); the other ranks touch
    nothing in it before it does. A finished capture is checked as training checks it, and
    its missing or damaged shards are captured again. A rank that dies or stalls ends the
    capture after ``parallel.timeout_minutes`` with an error naming it.
    """
    cfg.validate()
    layout = parallel.setup(cfg.parallel)
    try:
        with parallel.collective_errors(layout, lambda: "capture", cfg.parallel.timeout_minutes):
            return _capture(cfg, target, progress, prepared, layout)
    finally:
        parallel.teardown(layout)  # no collective follows the last target forward


def _capture(
    cfg: Config,
    target: Target | None,
    progress: bool,
    prepared: PrepareResult | None,
    layout: Layout,
) -> CaptureResult:
    log = print if layout.is_main else _quiet
    target = target_for_layout(cfg.target, target, layout, fsdp=_fsdp(cfg))
    log(parallel.describe_device(target.device, target.model.dtype), flush=True)
    prepared = preflight(
        cfg, target, prepared, world=layout.world, device=target.device, stage="capture", log=log
    )
    dataset, _ = load_data(cfg, target, log, prepared)
    settings = capture_settings(cfg, target, dataset)
    out = features_dir(cfg, settings)
    hint = "set data.features_dir to another folder"
    with (
        locks.hold(out, "draftforge capture", ShardError, hint) if layout.is_main else nullcontext()
    ):
        # Rank 0 holds the lock once this returns, before any other rank reads the folder.
        finished = parallel.broadcast_object((out / MANIFEST).is_file(), layout)
        if finished:
            return _check_and_repair(cfg, out, settings, target, dataset, layout)
        return _capture_slices(cfg, out, settings, target, dataset, progress, layout)


def _fsdp(cfg: Config) -> bool:
    return cfg.parallel.fsdp in ("target", "both")


def _capture_slices(
    cfg: Config,
    out: Path,
    settings: dict[str, Any],
    target: Target,
    dataset: Any,
    progress: bool,
    layout: Layout,
) -> CaptureResult:
    """Capture this data-parallel group's slice, after the shards a killed run left; rank 0
    then waits for the other slices and writes the manifest."""
    log = print if layout.is_main else _quiet
    slice_, slices, budget = layout.dp_rank, layout.dp, cfg.target.batch_tokens
    write = layout.rank % layout.tp == 0  # the group's first rank writes; all run the target
    lengths = dataset.lengths()
    rows = rank_slice(lengths, slice_, slices)
    shards = _resume(out, settings, slice_, slices, cfg.data.verify_checksums) if write else []
    # Where each slice resumes, from its writer's record, for the other ranks of its group.
    first = rows.start + sum(len(entry["rows"]) for entry in shards)
    first = parallel.all_gather_object(first, layout)[slice_ * layout.tp]
    shard_bytes = int(cfg.data.shard_mb * 1e6)
    writer = SliceWriter(out, settings, slice_, slices, shards, shard_bytes, dataset.ids, write)
    todo = shard_rows(range(first, rows.stop), lengths, writer.per_token, shard_bytes)
    forwards = forward_count(todo, lengths, budget)
    idle = int(parallel.all_reduce_max(forwards, layout)) - forwards if _fsdp(cfg) else 0
    if write:
        remaining = sum(lengths) - _recorded_tokens(out, slices, slice_, shards)
        log(
            f"capture: {remaining:,} tokens to go x {writer.per_token:,} bytes/token = about "
            f"{size_text(remaining * writer.per_token)} into {out} "
            f"({size_text(shutil.disk_usage(out).free)} free)",
            flush=True,
        )
        check_disk(out, remaining, writer.per_token)

    start = time.perf_counter()
    bar = progress_bar(
        sum(lengths[r] for r in rows),
        initial=sum(lengths[r] for r in range(rows.start, first)),
        desc="capture",
        unit="tok",
        unit_scale=True,
        interval_s=cfg.output.progress_interval_s,
        disable=not progress or not layout.is_main,
    )
    tokens = writer.run(target, dataset, todo, budget, cfg.target.teacher_chunk_mb, idle, bar)
    manifest = None
    if layout.is_main:
        _wait_for_slices(out, slices, layout.tp, log, cfg.parallel.timeout_minutes)
        manifest = _merge(out, settings, slices, len(lengths), writer.per_token)
    return CaptureResult(out, layout.rank, manifest, tokens, time.perf_counter() - start)


def _check_and_repair(
    cfg: Config,
    out: Path,
    settings: dict[str, Any],
    target: Target,
    dataset: Any,
    layout: Layout,
) -> CaptureResult:
    """Check a finished capture as training does, each rank a share of its shards, and capture
    the missing or damaged ones again: every rank runs their forwards (the target may be
    sharded), rank 0 writes them and the manifest."""
    start = time.perf_counter()
    manifest = read_json(out / MANIFEST)
    if manifest is None:
        raise ShardError(f"{out / MANIFEST}: removed during the capture; run the capture again")
    share = (layout.rank, layout.world)
    mine = damaged_shards(
        out,
        manifest,
        settings,
        dataset,
        checksums=cfg.data.verify_checksums,
        hint=ELSEWHERE,
        share=share,
    )
    found = [(entry["file"], problem) for entry, problem in mine]
    damaged = sorted(x for part in parallel.all_gather_object(found, layout) for x in part)
    entries = {entry["file"]: entry for entry in manifest["shards"]}
    dtype = STORAGE_DTYPES[settings["storage_dtype"]]
    for name, problem in damaged:
        if layout.is_main:
            print(f"{problem}; capturing it again", flush=True)
        entry = entries[name]
        samples = shard_samples(
            target,
            dataset,
            entry["rows"],
            dtype,
            cfg.target.batch_tokens,
            cfg.target.teacher_chunk_mb,
        )
        if layout.is_main:
            data, _, _ = encode_shard(samples)
            atomic_write(out / name, data)
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), argmax=True)
    if damaged and layout.is_main:
        manifest["bytes"] = sum(entry["bytes"] for entry in manifest["shards"])
        atomic_write(out / MANIFEST, json.dumps(manifest).encode())
    tokens = sum(entries[name]["offsets"][-1] for name, _ in damaged)
    mine_manifest = manifest if layout.is_main else None
    return CaptureResult(out, layout.rank, mine_manifest, tokens, time.perf_counter() - start)


def _resume(
    out: Path, settings: dict[str, Any], slice_: int, slices: int, checksums: bool
) -> list[dict[str, Any]]:
    """A slice's finished shards that are still whole (size, and sha256 with ``checksums``);
    its other files are leftovers of a killed run, and go."""
    for other in out.glob("progress-r*of*.json"):
        started = re.fullmatch(r"progress-r\d+of(\d+)\.json", other.name)
        if started and int(started.group(1)) != slices:
            n = int(started.group(1))
            raise ShardError(
                f"{out}: this capture was started with {n} data-parallel groups, this run has "
                f"{slices}; resume it with torchrun --nproc-per-node {n} x parallel.tp, "
                "or delete the folder to start over"
            )
    path = progress_path(out, slice_, slices)
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
    prefix = shard_prefix(slice_, slices)
    keep = {entry["file"] for entry in shards}
    leftovers = [
        *out.glob(f".tmp-{prefix}*"),
        *out.glob(f"{prefix}*"),
        *out.glob(f".tmp-{path.name}"),
    ]
    for stale in leftovers:
        if stale.name not in keep:
            stale.unlink()
    return shards


def _recorded_tokens(out: Path, slices: int, slice_: int, mine: list[dict[str, Any]]) -> int:
    """Tokens already in finished shards, over all slices (for the disk estimate)."""
    total = sum(entry["offsets"][-1] for entry in mine)
    for other in range(slices):
        state = read_json(progress_path(out, other, slices)) if other != slice_ else None
        if state is not None:
            total += sum(entry["offsets"][-1] for entry in state["shards"])
    return total


def _wait_for_slices(
    out: Path, slices: int, tp: int, log: Callable[..., None], timeout_minutes: float
) -> None:
    """Block until every slice's progress file says done. A slice whose file has not changed
    for ``parallel.timeout_minutes`` ends the capture with an error naming its writer: a
    process of a data-parallel capture runs no collective that would notice it is gone."""
    start = time.time()
    waiting: list[int] = []
    while True:
        pending = [
            s
            for s in range(slices)
            if not (read_json(progress_path(out, s, slices)) or {}).get("done", False)
        ]
        if not pending:
            return
        if pending != waiting:
            log(f"waiting for slices {pending} to finish", flush=True)
            waiting = pending
        for s in pending:
            path = progress_path(out, s, slices)
            last = max(start, path.stat().st_mtime if path.exists() else start)
            if time.time() - last > timeout_minutes * 60:
                raise CollectiveError(
                    f"capture: rank {s * tp}, the writer of slice {s} of {slices}, recorded no "
                    f"progress in {path} for parallel.timeout_minutes={timeout_minutes:g}: it "
                    "died or stalled; its finished shards are kept, run the capture again to resume"
                )
        time.sleep(1.0)


def _merge(
    out: Path, settings: dict[str, Any], slices: int, samples: int, per_token: int
) -> dict[str, Any]:
    """Write the manifest from the slices' progress files, then remove them."""
    shards: list[dict[str, Any]] = []
    for r in range(slices):
        state = read_json(progress_path(out, r, slices))
        assert state is not None, "the wait above saw every progress file"
        path = progress_path(out, r, slices)
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
    tensors: dict[str, Any] = {
        "rows": {"dtype": "int64", "shape": ["samples"]},
        "offsets": {"dtype": "int64", "shape": ["samples + 1"]},
        "input_ids": {"dtype": "int32", "shape": ["tokens"]},
        "loss_mask": {"dtype": "uint8", "shape": ["tokens"]},
        "aux": {"dtype": storage, "shape": ["tokens", 3 * hidden]},
        "hidden": {"dtype": storage, "shape": ["tokens", hidden]},
    }
    if all(entry.get("argmax") for entry in shards):  # a repaired older shard may lack it
        tensors["argmax"] = {"dtype": "int32", "shape": ["tokens"]}
    lines = next((entry["positions"] for entry in shards if "positions" in entry), None)
    if lines is not None:  # a VL target's: in the shards whose samples are not all at 0..n-1
        tensors["positions"] = {"dtype": "int32", "shape": [lines, "tokens"]}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings,
        "created_by": f"draftforge {__version__}, torch {torch.__version__}",
        "tensors": tensors,
        "bytes_per_token": per_token,
        "samples": samples,
        "tokens": sum(entry["offsets"][-1] for entry in shards),
        "bytes": sum(entry["bytes"] for entry in shards),
        "shards": shards,
    }
    atomic_write(out / MANIFEST, json.dumps(manifest).encode())
    for r in range(slices):
        progress_path(out, r, slices).unlink(missing_ok=True)
    return manifest
