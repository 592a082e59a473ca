"""Offline mode: capture the target's features to disk once, train drafts from them many times.

What is stored, and why the final hidden state
----------------------------------------------
Per sample (one row of the prepared dataset): its input ids, loss mask, the aux hidden
states ``[T, 3H]`` (the three aux layers, concatenated) and the target's final-norm hidden
state ``[T, H]``. The teacher itself is not stored: training recomputes it from the final
hidden state with the target's ``lm_head`` (and final logit softcap), in chunks, exactly as
the online trainer does. That is the cheapest exact representation:

- exact: with float32 storage (or storage in the target's own dtype) the draft sees the very
  numbers online training computes, so the two give the same losses;
- small: ``H`` values per token, where a distribution over the draft vocabulary is ``Vd``
  floats (32k) and a top-k approximation is lossy;
- independent of the draft vocabulary: one capture serves every ``draft.draft_vocab_size``.

Training from a capture therefore needs of the target only its ``lm_head`` (+ softcap), and
what the draft itself is built from (config, tokenizer, input embedding). This module reads
nothing else from it (:class:`OfflineFeatures` calls ``lm_head()``, ``logit_softcap`` and
``device``), so loading just those tensors is a change to ``train``'s target loading only;
today it loads the whole target.

On disk (``data.features_dir``; empty: ``<target.cache_dir>/features/<hash of the settings>``)
-----------------------------------------------------------------------------------------------
- ``shard-r{rank}of{world}-{index}.safetensors``: consecutive samples of one rank's slice,
  concatenated along tokens: ``rows`` int64 [n] (dataset rows), ``offsets`` int64 [n + 1],
  ``input_ids`` int32 [N], ``loss_mask`` uint8 [N], ``aux`` [N, 3H] and ``hidden`` [N, H] in
  the storage dtype. About ``data.shard_mb`` each.
- ``manifest.json``: format and version, the settings of the capture, the tensors' dtypes and
  shapes, bytes per token, and per shard its file name, byte size, sha256, rows, sample ids
  and offsets. Written last: a directory without it holds an unfinished capture.
- ``progress-r{rank}of{world}.json`` while capturing: each rank's finished shards, in the
  manifest's shard format; merged into the manifest and removed at the end.

Settings that must match the training run: a fingerprint of the target's config and weights,
its dtype, the dataset cache key (tokenizer, chat template, data settings, input files), the
aux layers, the hidden size and the storage dtype. The draft vocabulary is not one of them.

Capture is resumable: every file is written under a temporary name, fsynced and renamed into
place, and a rank's progress file is rewritten the same way after each shard, so a killed
capture leaves whole shards and a record of them; a rerun drops files the record does not
list and continues after its last shard. Under ``torchrun`` each rank captures a contiguous
slice holding about 1/world of the tokens, with a whole target of its own (data parallel
only); rank 0 waits for the others' progress files to say done, then writes the manifest.
No process group is needed: torchrun ends every rank when one fails.

Integrity, checked before training starts (:func:`verify`): the manifest is readable; its
settings match the run's; its samples cover the dataset exactly once with the same ids,
lengths and tokens; every shard exists with the recorded size and holds the tensors the
manifest implies; and, unless ``data.verify_checksums=false``, its sha256 matches. Hashing
runs at disk speed over parallel threads (only rank 0 hashes under torchrun); for captures of
terabytes that is minutes per start, which the option skips at the cost of not noticing bit
rot inside a shard. Sizes, headers and tokens are always checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor
from tqdm import tqdm

from draftforge import __version__, parallel
from draftforge.checkpoint import sha256_file
from draftforge.config import Config, ConfigError
from draftforge.parallel import Layout
from draftforge.target import Target, load_target
from draftforge.train import (
    Features,
    MicroBatch,
    Position,
    features_from_hidden,
    load_data,
    sample_features,
)

if TYPE_CHECKING:
    from draftforge.data import PrepareResult

FORMAT = "draftforge-features"
VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The dtype names safetensors headers use.
_HEADER_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Bytes read from each end of a weight file for the target fingerprint.
_SAMPLED_BYTES = 1 << 20
_RECAPTURE = (
    "capture again with this config (`draftforge capture`), or point data.features_dir "
    "at a capture made with it"
)
_ELSEWHERE = "set data.features_dir to another folder, or delete this one to capture again"


class ShardError(RuntimeError):
    """Captured features are missing, damaged or made with other settings, or cannot be
    written; the message names the file and the problem."""


# ----------------------------------------------------------------------------- settings


def target_fingerprint(path: str) -> str:
    """Identity of a target's config and weights, cheap at any size.

    Hashes config.json and, for each weight file, its name, size and first and last MiB
    (a safetensors header names every tensor; changed weights change those bytes). It tells
    models apart; it is not a content hash of every weight.
    """
    directory = Path(path)
    if not directory.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        if not isinstance(cached, str):  # not in the local hub cache: the id is all we know
            return hashlib.sha256(path.encode()).hexdigest()[:32]
        directory = Path(cached).parent
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for file in sorted(directory.iterdir()):
        if file.suffix not in (".safetensors", ".bin"):
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            digest.update(f.read(_SAMPLED_BYTES))
            f.seek(max(0, size - _SAMPLED_BYTES))
            digest.update(f.read())
    return digest.hexdigest()[:32]


def capture_settings(cfg: Config, target: Target, dataset: Any) -> dict[str, Any]:
    """Everything the stored features depend on; training refuses a capture that differs."""
    target_dtype = str(target.lm_head()[0].dtype).removeprefix("torch.")
    storage = cfg.data.storage_dtype
    if storage == "auto":
        storage = target_dtype if target_dtype in STORAGE_DTYPES else "float32"
    return {
        "target_fingerprint": target_fingerprint(target.path),
        "target_dtype": target_dtype,
        "dataset_key": dataset.key,
        "aux_layers": list(target.aux_layers),
        "hidden_size": target.hidden_size,
        "storage_dtype": storage,
    }


def features_dir(cfg: Config, settings: dict[str, Any]) -> Path:
    """``data.features_dir``, or a folder of the cache named by the settings."""
    if cfg.data.features_dir:
        return Path(cfg.data.features_dir).expanduser()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cfg.target.cache_dir).expanduser() / "features" / key


def _check_settings(
    found: dict[str, Any], expected: dict[str, Any], where: Path, hint: str = _RECAPTURE
) -> None:
    diff = [
        f"{key} {found.get(key)!r} (this config: {value!r})"
        for key, value in expected.items()
        if found.get(key) != value
    ]
    if diff:
        raise ShardError(
            f"{where}: features captured with other settings: {'; '.join(diff)}; {hint}"
        )


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


def bytes_per_token(hidden_size: int, storage_dtype: str) -> int:
    """Disk bytes per captured token: aux [3H] and hidden [H] values, an int32 id, a mask byte
    (the 16 bytes of row and offset per sample are left out)."""
    return 4 * hidden_size * STORAGE_DTYPES[storage_dtype].itemsize + 4 + 1


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_disk(directory: Path, tokens: int, per_token: int) -> None:
    """Refuse to start a capture that would not fit on the disk of ``directory``."""
    need, free = tokens * per_token, shutil.disk_usage(directory).free
    if need > free:
        raise ShardError(
            f"{directory}: capture needs about {_size(need)} ({tokens:,} tokens x {per_token:,} "
            f"bytes/token) but the disk has {_size(free)} free; "
            "free space, set data.features_dir on a larger disk, or a smaller data.storage_dtype"
        )


def _shard_prefix(rank: int, world: int) -> str:
    return f"shard-r{rank:03d}of{world:03d}-"


def _progress_path(directory: Path, rank: int, world: int) -> Path:
    return directory / f"progress-r{rank:03d}of{world:03d}.json"


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one: temporary name, fsync, rename, fsync dir."""
    tmp = path.with_name(f".tmp-{path.name}")  # one writer per name: each rank owns its files
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The parsed file, ``None`` when it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: not readable JSON ({err}); {_RECAPTURE}") from None


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
                f"{len(m['shards'])} shards, {_size(m['bytes'])} "
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
    :func:`~draftforge.train.load_data`). Runs as one process or under torchrun, each rank
    capturing its own slice.
    """
    if cfg.data.shard_mb <= 0:
        raise ConfigError(f"data.shard_mb must be positive, got {cfg.data.shard_mb}")
    rank, world, local_rank = _rank_world()
    log = print if rank == 0 else _quiet
    target = target or load_target(cfg.target, parallel.default_device(local_rank))
    dataset, _ = load_data(cfg, target, log, prepared)
    settings = capture_settings(cfg, target, dataset)
    out = features_dir(cfg, settings)
    out.mkdir(parents=True, exist_ok=True)
    finished = _read_json(out / MANIFEST)
    if finished is not None:
        _check_settings(finished.get("settings", {}), settings, out / MANIFEST, _ELSEWHERE)
        return CaptureResult(out, rank, finished if rank == 0 else None, 0, 0.0)

    lengths = [int(n) for n in (dataset.offsets[1:] - dataset.offsets[:-1]).tolist()]
    shards, done = _resume(out, settings, rank, world)
    per_token = bytes_per_token(target.hidden_size, settings["storage_dtype"])
    shard_bytes = int(cfg.data.shard_mb * 1e6)
    recorded = _recorded_tokens(out, world, rank, shards)
    remaining = sum(lengths) - recorded
    log(
        f"capture: {remaining:,} tokens to go x {per_token:,} bytes/token = about "
        f"{_size(remaining * per_token)} into {out} ({_size(shutil.disk_usage(out).free)} free)",
        flush=True,
    )
    check_disk(out, remaining, per_token)

    start = time.perf_counter()
    tokens = 0
    if not done:
        writer = _SliceWriter(out, settings, rank, world, shards, shard_bytes, dataset.ids)
        tokens = writer.run(target, dataset, rank_slice(lengths, rank, world), progress)
    manifest = None
    if rank == 0:
        _wait_for_ranks(out, world, log)
        manifest = _merge(out, settings, world, len(lengths), per_token)
    return CaptureResult(out, rank, manifest, tokens, time.perf_counter() - start)


def _resume(
    out: Path, settings: dict[str, Any], rank: int, world: int
) -> tuple[list[dict[str, Any]], bool]:
    """This rank's finished shards that are still whole, and whether its slice is done."""
    for other in out.glob("progress-r*of*.json"):
        started = re.fullmatch(r"progress-r\d+of(\d+)\.json", other.name)
        if started and int(started.group(1)) != world:
            raise ShardError(
                f"{out}: this capture was started with {int(started.group(1))} processes; "
                f"resume it with torchrun --nproc-per-node {int(started.group(1))}, "
                "or delete the folder to start over"
            )
    path = _progress_path(out, rank, world)
    state = _read_json(path)
    shards: list[dict[str, Any]] = []
    if state is not None:
        _check_settings(state.get("settings", {}), settings, path, _ELSEWHERE)
        for entry in state["shards"]:
            file = out / entry["file"]
            if not file.is_file() or file.stat().st_size != entry["bytes"]:
                print(f"{file} is missing or resized: capturing again from it", flush=True)
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
        state = _read_json(_progress_path(out, other, world)) if other != rank else None
        if state is not None:
            total += sum(entry["offsets"][-1] for entry in state["shards"])
    return total


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

    def run(self, target: Target, dataset: Any, rows: range, progress: bool) -> int:
        """Capture the samples after the recorded shards; return the tokens captured."""
        first = rows.start + sum(len(entry["rows"]) for entry in self.shards)
        todo = range(first, rows.stop)
        lengths = (dataset.offsets[1:] - dataset.offsets[:-1]).tolist()
        bar = tqdm(
            total=sum(lengths[r] for r in rows),
            initial=sum(lengths[r] for r in range(rows.start, first)),
            desc="capture",
            unit="tok",
            unit_scale=True,
            dynamic_ncols=True,
            disable=not progress or self.rank != 0,
        )
        pending: list[tuple[int, Tensor, Tensor, Tensor, Tensor]] = []
        tokens = pending_tokens = 0
        for row in todo:
            sample = dataset[row]
            aux, last = sample_features(target, sample["input_ids"])
            pending.append(
                (
                    row,
                    sample["input_ids"].int(),
                    sample["loss_mask"].to(torch.uint8),
                    aux.to(self.dtype).cpu(),
                    last.to(self.dtype).cpu(),
                )
            )
            n = len(sample["input_ids"])
            tokens += n
            pending_tokens += n
            bar.update(n)
            if pending_tokens * self.per_token >= self.shard_bytes:
                self._flush(pending)
                pending, pending_tokens = [], 0
        if pending:
            self._flush(pending)
        bar.close()
        self._save_progress(done=True)
        return tokens

    def _flush(self, samples: list[tuple[int, Tensor, Tensor, Tensor, Tensor]]) -> None:
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
        data = save(tensors, metadata={"format": FORMAT, "version": str(VERSION)})
        name = f"{_shard_prefix(self.rank, self.world)}{len(self.shards):06d}.safetensors"
        _atomic_write(self.out / name, data)
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
        _atomic_write(_progress_path(self.out, self.rank, self.world), json.dumps(state).encode())


def _wait_for_ranks(out: Path, world: int, log: Callable[..., None]) -> None:
    """Block until every rank's progress file says done (torchrun ends us if a rank fails)."""
    waiting: list[int] = []
    while True:
        pending = [
            r
            for r in range(world)
            if not (_read_json(_progress_path(out, r, world)) or {}).get("done", False)
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
        state = _read_json(_progress_path(out, r, world))
        assert state is not None, "the wait above saw every progress file"
        path = _progress_path(out, r, world)
        _check_settings(state.get("settings", {}), settings, path, _ELSEWHERE)
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
    _atomic_write(out / MANIFEST, json.dumps(manifest).encode())
    for r in range(world):
        _progress_path(out, r, world).unlink(missing_ok=True)
    return manifest


# ----------------------------------------------------------------------------- verification


def verify(
    directory: Path, settings: dict[str, Any], dataset: Any, *, checksums: bool
) -> dict[str, Any]:
    """The manifest of a capture that fits this run; :class:`ShardError` otherwise."""
    path = directory / MANIFEST
    manifest = _read_json(path)
    if manifest is None:
        started = any(directory.glob("progress-*.json")) or any(directory.glob("shard-*"))
        hint = (
            "the capture there is unfinished: run `draftforge capture` with this config to finish it"
            if started
            else "run `draftforge capture` with this config first"
        )
        raise ShardError(f"{directory}: no {MANIFEST} ({hint})")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(
            f"{path}: not a {FORMAT} version {VERSION} manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r}); {_RECAPTURE}"
        )
    _check_settings(manifest.get("settings", {}), settings, path)
    try:
        _check_samples(manifest, dataset, directory)
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            problems = list(
                pool.map(
                    lambda entry: _check_shard(directory, entry, settings, dataset, checksums),
                    manifest["shards"],
                )
            )
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ShardError(f"{path}: malformed manifest ({err!r}); {_RECAPTURE}") from None
    for problem in problems:
        if problem is not None:
            raise ShardError(problem)
    return manifest


def _check_samples(manifest: dict[str, Any], dataset: Any, directory: Path) -> None:
    """Every dataset row exactly once, with its id and length."""
    lengths = (dataset.offsets[1:] - dataset.offsets[:-1]).tolist()
    seen = [False] * len(dataset.ids)
    for entry in manifest["shards"]:
        offsets = entry["offsets"]
        for j, (row, sample_id) in enumerate(zip(entry["rows"], entry["ids"], strict=True)):
            if (
                not 0 <= row < len(seen)
                or seen[row]
                or dataset.ids[row] != sample_id
                or offsets[j + 1] - offsets[j] != lengths[row]
            ):
                raise ShardError(
                    f"{directory / entry['file']}: sample {sample_id!r} (row {row}) is not the "
                    f"dataset's row {row} or is listed twice; {_RECAPTURE}"
                )
            seen[row] = True
    if not all(seen):
        first = seen.index(False)
        raise ShardError(
            f"{directory / MANIFEST}: {seen.count(False)} dataset samples have no features "
            f"(first: {dataset.ids[first]!r}); {_RECAPTURE}"
        )


def _check_shard(
    directory: Path, entry: dict[str, Any], settings: dict[str, Any], dataset: Any, checksums: bool
) -> str | None:
    """What is wrong with one shard, or ``None``."""
    path = directory / entry["file"]
    if not path.is_file():
        return f"{path}: missing (listed in {MANIFEST}); {_RECAPTURE}"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path}: {size} bytes where {MANIFEST} records {entry['bytes']} (truncated or replaced); {_RECAPTURE}"
    if checksums and sha256_file(path) != entry["sha256"]:
        return f"{path}: sha256 differs from {MANIFEST}: the shard is damaged; {_RECAPTURE}"
    n, tokens, hidden = len(entry["rows"]), entry["offsets"][-1], settings["hidden_size"]
    storage = _HEADER_DTYPES[settings["storage_dtype"]]
    expected = {
        "rows": ([n], "I64"),
        "offsets": ([n + 1], "I64"),
        "input_ids": ([tokens], "I32"),
        "loss_mask": ([tokens], "U8"),
        "aux": ([tokens, 3 * hidden], storage),
        "hidden": ([tokens, hidden], storage),
    }
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            found = {key: (s.get_shape(), s.get_dtype()) for key, s in slices.items()}
            if found != expected:
                return f"{path}: holds {found}, where {MANIFEST} implies {expected}; {_RECAPTURE}"
            rows, offsets = slices["rows"][:].tolist(), slices["offsets"][:].tolist()
            input_ids, loss_mask = slices["input_ids"][:], slices["loss_mask"][:]
    except Exception as err:  # safetensors raises its own error types on damaged headers
        return f"{path}: not a readable safetensors file ({err}); {_RECAPTURE}"
    if rows != entry["rows"] or offsets != entry["offsets"]:
        return f"{path}: its samples differ from those {MANIFEST} lists for it; {_RECAPTURE}"
    spans = [(int(dataset.offsets[r]), int(dataset.offsets[r + 1])) for r in rows]
    if not torch.equal(input_ids, torch.cat([dataset.input_ids[a:b] for a, b in spans])) or not (
        torch.equal(loss_mask, torch.cat([dataset.loss_mask[a:b] for a, b in spans]))
    ):
        return f"{path}: its tokens or loss mask differ from the dataset's; {_RECAPTURE}"
    return None


# ----------------------------------------------------------------------------- training


class ShardReader:
    """Features of a verified capture by dataset row, read from memory-mapped shards: a
    sample's slice is copied out of the page cache, nothing else of the shard is read."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.files = [directory / entry["file"] for entry in manifest["shards"]]
        # row -> (shard, first token in it, tokens); verify() saw rows 0..n-1 once each
        self._where: list[tuple[int, int, int]] = [(0, 0, 0)] * sum(
            len(entry["rows"]) for entry in manifest["shards"]
        )
        for k, entry in enumerate(manifest["shards"]):
            offsets = entry["offsets"]
            for j, row in enumerate(entry["rows"]):
                self._where[row] = (k, offsets[j], offsets[j + 1] - offsets[j])
        self._open: dict[int, Any] = {}
        # The prefetch thread and an evaluation in the training thread may read at once.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._where)

    def _read(self, row: int, name: str, tokens: int) -> Tensor:
        shard, start, length = self._where[row]
        with self._lock:
            handle = self._open.get(shard)
            if handle is None:
                handle = self._open[shard] = safe_open(str(self.files[shard]), framework="pt")
            return handle.get_slice(name)[start : start + min(tokens, length)]

    def hidden(self, rows: Sequence[int], lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Aux [T, 3H] and final hidden [T, H] (storage dtype) of the first ``lengths[i]``
        tokens of each row, concatenated in order: a packed micro-batch's layout."""
        pairs = list(zip(rows, lengths, strict=True))
        aux = torch.cat([self._read(row, "aux", n) for row, n in pairs])
        last = torch.cat([self._read(row, "hidden", n) for row, n in pairs])
        return aux, last


class OfflineFeatures:
    """Features from a capture: aux states as stored, the teacher recomputed from the final
    hidden states with the target's lm_head (see the module docstring).

    A background thread reads up to ``data.prefetch`` optimizer steps ahead (``steps``), so
    the disk and the conversion to the training dtypes overlap with the draft's compute.
    """

    def __init__(self, reader: ShardReader, target: Target, cfg: Config) -> None:
        self.reader = reader
        self.target = target
        self.chunk_mb = cfg.target.teacher_chunk_mb
        self.depth = cfg.data.prefetch

    def _load(self, batches: list[MicroBatch]) -> list[tuple[Tensor, Tensor]]:
        """The host-side work of one step: read, convert to the dtypes the step computes in,
        and pin for an asynchronous copy to the GPU."""
        head_dtype = self.target.lm_head()[0].dtype
        pin = self.target.device.type == "cuda"
        loaded = []
        for batch in batches:
            aux, last = self.reader.hidden(batch.rows, batch.lengths)
            aux, last = aux.float(), last.to(head_dtype)
            if pin:
                aux, last = aux.pin_memory(), last.pin_memory()
            loaded.append((aux, last))
        return loaded

    def _teacher(self, loaded: list[tuple[Tensor, Tensor]], draft_ids: Tensor) -> list[Features]:
        device = self.target.device
        return [
            features_from_hidden(
                self.target,
                aux.to(device, non_blocking=True),
                last.to(device, non_blocking=True),
                draft_ids,
                self.chunk_mb,
            )
            for aux, last in loaded
        ]

    def features(self, batches: list[MicroBatch], draft_ids: Tensor) -> list[Features]:
        return self._teacher(self._load(batches), draft_ids)

    def steps(
        self, plan: Iterator[tuple[Position, list[MicroBatch]]], draft_ids: Tensor
    ) -> Generator[tuple[Position, list[MicroBatch], list[Features]], None, None]:
        if self.depth == 0:
            for position, batches in plan:
                yield position, batches, self.features(batches, draft_ids)
            return
        ready: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            # Wakes up now and then to notice that the consumer has gone.
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for position, batches in plan:
                    if not put((position, batches, self._load(batches))):
                        return
            except BaseException as err:  # handed to the training thread, which raises it
                put(err)
            else:
                put(None)

        producer = threading.Thread(target=produce, name="offline-prefetch", daemon=True)
        producer.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                position, batches, loaded = item
                yield position, batches, self._teacher(loaded, draft_ids)
        finally:
            # The producer notices within 0.1 s (or after the read in flight): never leave it
            # running into interpreter shutdown, where a thread inside torch aborts the process.
            stop.set()
            producer.join()


def open_features(cfg: Config, target: Target, dataset: Any, layout: Layout) -> OfflineFeatures:
    """Verify the capture this run needs, before any training, and read features from it."""
    if layout.tp > 1 or cfg.parallel.fsdp in ("target", "both"):
        raise ConfigError(
            "data.mode=offline runs no target forward, so the target is not sharded: "
            "use parallel.tp=1 and parallel.fsdp none or draft"
        )
    if cfg.data.prefetch < 0:
        raise ConfigError(f"data.prefetch must be 0 or more, got {cfg.data.prefetch}")
    settings = capture_settings(cfg, target, dataset)
    directory = features_dir(cfg, settings)
    # Every rank reads every shard, so one rank's hashing vouches for all of them.
    manifest = verify(
        directory, settings, dataset, checksums=cfg.data.verify_checksums and layout.is_main
    )
    parallel.barrier(layout)
    return OfflineFeatures(ShardReader(directory, manifest), target, cfg)
