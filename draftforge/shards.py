"""The store of captured features: its format on disk, its verification and its reader.

What is stored, and why the final hidden state
----------------------------------------------
Per sample (one row of the prepared dataset): its input ids, loss mask, the aux hidden
states ``[T, 3H]`` (the three aux layers, concatenated) and the target's final-norm hidden
state ``[T, H]``, and the target's full-vocabulary argmax at each token a training step
reads it (-1 at the others: prompts, a sample's last token). The teacher's
distribution is not stored: training recomputes it from the final hidden state with the
draft vocabulary's rows of the target's ``lm_head`` (and final logit softcap), in chunks,
exactly as the online trainer does. That is the cheapest exact representation:

- exact: with float32 storage (or storage in the target's own dtype) the draft sees the very
  numbers online training computes, so the two give the same losses;
- small: ``H`` values per token, where a distribution over the draft vocabulary is ``Vd``
  floats (32k) and a top-k approximation is lossy;
- independent of the draft vocabulary: one capture serves every ``draft.draft_vocab_size``.

The argmax (which tokens the draft can be scored on: those whose target argmax is in its
vocabulary) is the one part of the teacher that needs every row of the head. Storing it, 4
bytes a token, spares training that head: for SmolLM2 and a 4096-token draft vocabulary the
teacher's matmul is 12x smaller, about a quarter of a demo training step. The capture runs
the whole head only on the rows training reads (:func:`draftforge.ttt.teacher_rows`, the
same for every TTT depth). A capture made before argmaxes were stored trains as it did, with
the whole head.

Training from a capture therefore needs of the target only its ``lm_head`` (+ softcap), and
what the draft itself is built from (config, tokenizer, input embedding). This module reads
nothing else from it (:class:`OfflineFeatures` calls ``lm_head()``, ``logit_softcap`` and
``device``), and ``train`` reads just those tensors from the checkpoint
(:mod:`draftforge.target_head`).

On disk (``data.features_dir``; empty: ``<target.cache_dir>/features/<hash of the settings>``)
-----------------------------------------------------------------------------------------------
- ``shard-r{rank}of{world}-{index}.safetensors``: consecutive samples of one rank's slice,
  concatenated along tokens: ``rows`` int64 [n] (dataset rows), ``offsets`` int64 [n + 1],
  ``input_ids`` int32 [N], ``loss_mask`` uint8 [N], ``aux`` [N, 3H] and ``hidden`` [N, H] in
  the storage dtype, ``argmax`` int32 [N] (-1 where no step reads it; the manifest entry
  says ``"argmax": true``).
  About ``data.shard_mb`` each. A shard of a vision-language target whose samples do not
  all sit at positions ``0..n-1`` also holds ``positions`` int32 ``[R, N]``: the position
  ids its language model used (``R = 3`` M-RoPE rows for Qwen-VL, where an image's tokens
  take its grid's positions), every sample's, and its manifest entry says
  ``"positions": R``. Training rotates the draft by them, as online (a text capture has
  neither, and is what it always was).
- ``manifest.json``: format and version, the settings of the capture, the tensors' dtypes and
  shapes, bytes per token, and per shard its file name, byte size, sha256, rows, sample ids
  and offsets. Written last: a directory without it holds an unfinished capture.
- ``progress-r{rank}of{world}.json`` while capturing: each rank's finished shards, in the
  manifest's shard format; merged into the manifest and removed at the end.

Settings that must match the training run: a fingerprint of the target's config and weights,
its dtype, the dataset cache key (tokenizer, chat template, data settings, input files), the
aux layers, the hidden size and the storage dtype. The draft vocabulary is not one of them.

Integrity, checked before training starts (:func:`verify`): the manifest is readable; its
settings match the run's; its samples cover the dataset exactly once with the same ids,
lengths and tokens; every shard exists with the recorded size and holds the tensors the
manifest implies; and, unless ``data.verify_checksums=false``, its sha256 matches. Hashing
runs at disk speed over parallel threads (only rank 0 hashes under torchrun); for captures of
terabytes that is minutes per start, which the option skips at the cost of not noticing bit
rot inside a shard. Sizes, headers and tokens are always checked. `draftforge capture` run
again on the folder makes the same checks and captures any missing or damaged shard again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from draftforge.checkpoint import sha256_file
from draftforge.config import Config, cache_root
from draftforge.target import TargetParts

FORMAT = "draftforge-features"
VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The dtype names safetensors headers use.
_HEADER_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Bytes read from each end of a weight file for the target fingerprint.
_SAMPLED_BYTES = 1 << 20
RECAPTURE = (
    "capture again with this config (`draftforge capture`), or point data.features_dir "
    "at a capture made with it"
)
ELSEWHERE = "set data.features_dir to another folder, or delete this one to capture again"


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


def capture_settings(cfg: Config, target: TargetParts, dataset: Any) -> dict[str, Any]:
    """Everything the stored features depend on; training refuses a capture that differs."""
    target_dtype = str(target.lm_head()[0].dtype).removeprefix("torch.")
    storage = cfg.data.storage_dtype
    if storage == "auto":
        storage = target_dtype if target_dtype in STORAGE_DTYPES else "float32"
    settings = {
        "target_fingerprint": target_fingerprint(target.path),
        "target_dtype": target_dtype,
        "dataset_key": dataset.key,
        "aux_layers": list(target.aux_layers),
        "hidden_size": target.hidden_size,
        "storage_dtype": storage,
    }
    vision = getattr(target.model_config, "vision_config", None)
    if getattr(vision, "deepstack_visual_indexes", None):
        # Aux states as the next layer reads them, deepstack included (vision_target): a
        # capture made before draftforge recorded them so is not this one.
        settings["aux_states"] = "next layer's input"
    return settings


def features_dir(cfg: Config, settings: dict[str, Any]) -> Path:
    """``data.features_dir``, or a folder of the cache named by the settings."""
    if cfg.data.features_dir:
        return Path(cfg.data.features_dir).expanduser()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root(cfg.target.cache_dir) / "features" / key


def check_settings(
    found: dict[str, Any], expected: dict[str, Any], where: Path, hint: str = RECAPTURE
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


def bytes_per_token(hidden_size: int, storage_dtype: str) -> int:
    """Disk bytes per captured token: aux [3H] and hidden [H] values, an int32 id, a mask
    byte, an int32 argmax (the 16 bytes of row and offset per sample are left out)."""
    return 4 * hidden_size * STORAGE_DTYPES[storage_dtype].itemsize + 4 + 1 + 4


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def atomic_write(path: Path, data: bytes) -> None:
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


def read_json(path: Path) -> dict[str, Any] | None:
    """The parsed file, ``None`` when it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: not readable JSON ({err}); {RECAPTURE}") from None


# ----------------------------------------------------------------------------- verification


def verify(
    directory: Path, settings: dict[str, Any], dataset: Any, *, checksums: bool
) -> dict[str, Any]:
    """The manifest of a capture that fits this run; :class:`ShardError` otherwise."""
    manifest = read_json(directory / MANIFEST)
    if manifest is None:
        started = any(directory.glob("progress-*.json")) or any(directory.glob("shard-*"))
        hint = (
            "the capture there is unfinished: run `draftforge capture` with this config to finish it"
            if started
            else "run `draftforge capture` with this config first"
        )
        raise ShardError(f"{directory}: no {MANIFEST} ({hint})")
    damaged = damaged_shards(
        directory, manifest, settings, dataset, checksums=checksums, hint=RECAPTURE
    )
    if damaged:
        raise ShardError(f"{damaged[0][1]}; {RECAPTURE}")
    return manifest


def damaged_shards(
    directory: Path,
    manifest: dict[str, Any],
    settings: dict[str, Any],
    dataset: Any,
    *,
    checksums: bool,
    hint: str,
    share: tuple[int, int] = (0, 1),
) -> list[tuple[dict[str, Any], str]]:
    """The shards of a capture that are missing or damaged, each with what is wrong with it;
    with ``share=(i, n)`` only among every n-th shard from the i-th (ranks split the checking).

    Raises :class:`ShardError`, ending in ``hint``, when the manifest itself does not fit: its
    format, version or settings differ, or its samples are not the dataset's, each once.
    """
    path = directory / MANIFEST
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(
            f"{path}: not a {FORMAT} version {VERSION} manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r}); {hint}"
        )
    check_settings(manifest.get("settings", {}), settings, path, hint)
    try:
        _check_samples(manifest, dataset, directory, hint)
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            problems = list(
                pool.map(
                    lambda entry: _check_shard(directory, entry, settings, dataset, checksums),
                    manifest["shards"][share[0] :: share[1]],
                )
            )
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ShardError(f"{path}: malformed manifest ({err!r}); {hint}") from None
    return [
        (entry, problem)
        for entry, problem in zip(manifest["shards"][share[0] :: share[1]], problems, strict=True)
        if problem is not None
    ]


def file_problem(
    path: Path, entry: dict[str, Any], checksums: bool, record: str = MANIFEST
) -> str | None:
    """What is wrong with a shard's file by the size and sha256 ``record`` lists for it (the
    sha256 only with ``checksums``), or ``None``."""
    if not path.is_file():
        return f"{path}: missing (listed in {record})"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return (
            f"{path}: {size} bytes where {record} records {entry['bytes']} (truncated or replaced)"
        )
    if checksums and sha256_file(path) != entry["sha256"]:
        return f"{path}: sha256 differs from {record}: the shard is damaged"
    return None


def _check_samples(manifest: dict[str, Any], dataset: Any, directory: Path, hint: str) -> None:
    """Every dataset row exactly once, with its id and length."""
    lengths = dataset.lengths()
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
                    f"dataset's row {row} or is listed twice; {hint}"
                )
            seen[row] = True
    if not all(seen):
        first = seen.index(False)
        raise ShardError(
            f"{directory / MANIFEST}: {seen.count(False)} dataset samples have no features "
            f"(first: {dataset.ids[first]!r}); {hint}"
        )


def _check_shard(
    directory: Path, entry: dict[str, Any], settings: dict[str, Any], dataset: Any, checksums: bool
) -> str | None:
    """What is wrong with one shard, or ``None``."""
    path = directory / entry["file"]
    problem = file_problem(path, entry, checksums)
    if problem is not None:
        return problem
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
    if "positions" in entry:
        expected["positions"] = ([entry["positions"], tokens], "I32")
    if entry.get("argmax"):
        expected["argmax"] = ([tokens], "I32")
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            found = {key: (s.get_shape(), s.get_dtype()) for key, s in slices.items()}
            if found != expected:
                return f"{path}: holds {found}, where {MANIFEST} implies {expected}"
            rows, offsets = slices["rows"][:].tolist(), slices["offsets"][:].tolist()
            input_ids, loss_mask = slices["input_ids"][:], slices["loss_mask"][:]
    except Exception as err:  # safetensors raises its own error types on damaged headers
        return f"{path}: not a readable safetensors file ({err})"
    if rows != entry["rows"] or offsets != entry["offsets"]:
        return f"{path}: its samples differ from those {MANIFEST} lists for it"
    samples = [dataset[r] for r in rows]
    if not torch.equal(input_ids, torch.cat([s["input_ids"] for s in samples]).int()) or not (
        torch.equal(loss_mask, torch.cat([s["loss_mask"] for s in samples]).to(torch.uint8))
    ):
        return f"{path}: its tokens or loss mask differ from the dataset's"
    return None


# ----------------------------------------------------------------------------- reading


class ShardReader:
    """Features of a verified capture by dataset row, read from memory-mapped shards: a
    sample's slice is copied out of the page cache, nothing else of the shard is read."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.files = [directory / entry["file"] for entry in manifest["shards"]]
        self._positioned = ["positions" in entry for entry in manifest["shards"]]
        self._argmaxed = [bool(entry.get("argmax")) for entry in manifest["shards"]]
        # Rows of the stored position ids (3 for M-RoPE), None when no shard stores any.
        self.position_rows: int | None = next(
            (entry["positions"] for entry in manifest["shards"] if "positions" in entry), None
        )
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
            if name == "positions":  # [R, N]: the tokens are its columns
                return handle.get_slice(name)[:, start : start + min(tokens, length)]
            return handle.get_slice(name)[start : start + min(tokens, length)]

    def positions(self, row: int) -> Tensor:
        """The position ids ``[R, n]`` (int64) the target's language model used for a row
        of a capture that stores positions; ``0..n-1`` in each row where its shard stores
        none (the capture keeps only positions that are not)."""
        assert self.position_rows is not None, "this capture stores no positions"
        shard, _, length = self._where[row]
        if not self._positioned[shard]:
            return torch.arange(length).expand(self.position_rows, -1)
        return self._read(row, "positions", length).long()

    def hidden(self, rows: Sequence[int], lengths: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Aux [T, 3H] and final hidden [T, H] (storage dtype) of the first ``lengths[i]``
        tokens of each row, concatenated in order: a packed micro-batch's layout."""
        pairs = list(zip(rows, lengths, strict=True))
        aux = torch.cat([self._read(row, "aux", n) for row, n in pairs])
        last = torch.cat([self._read(row, "hidden", n) for row, n in pairs])
        return aux, last

    def argmax(self, rows: Sequence[int], lengths: Sequence[int]) -> Tensor | None:
        """The stored full-vocabulary argmax [T] (int32) laid out as :meth:`hidden`; ``None``
        when a row's shard has none (captured before they were stored)."""
        if not all(self._argmaxed[self._where[row][0]] for row in rows):
            return None
        return torch.cat(
            [self._read(row, "argmax", n) for row, n in zip(rows, lengths, strict=True)]
        )
