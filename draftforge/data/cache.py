"""Tokenise a conversation dataset once, in parallel, and keep the result on disk.

Cache entry `<cache_dir>/<key>/`, written to a temporary folder and renamed into place:

- `tokens.safetensors`: `input_ids` int32 [N], `loss_mask` uint8 [N] (all rows
  concatenated) and `offsets` int64 [rows + 1] (row r is `offsets[r]:offsets[r+1]`).
- `meta.json`: the key's inputs, row ids, stats, the skip report, the byte size and sha256
  of `tokens.safetensors` (`files`), and `checksum`, the sha256 of meta.json's own content.

Loading checks both; a missing, unreadable or differing file (or a meta.json without
checksums, as earlier versions wrote it) is reported as `DamagedFile`, and
`prepare_dataset` says so in one line and builds the entry again. A rebuild of an existing
entry replaces its files one by one (`os.replace`, tokens first), so a concurrent reader
never finds a file missing, and a reader that sees the rebuilt meta.json sees the rebuilt
tokens. Nothing deletes an entry's files.

The key hashes everything the tokens depend on: the tokenizer (its full serialised state
and special tokens), the chat template text, every setting (the template variables
`chat_template_kwargs` among them), and the input's identity (content hashes of local files,
or a Hub dataset's fingerprint). `num_workers` is not in it: the result does not depend on
it.
"""

import hashlib
import json
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from draftforge.checkpoint import sha256_file
from draftforge.config import cache_root
from draftforge.data.conversation import Conversation, RowError
from draftforge.data.readers import Source, read_conversations
from draftforge.data.report import DamagedFile, DataReport
from draftforge.data.template import ChatTemplate, template_kwargs
from draftforge.progress import progress_bar

CACHE_VERSION = 1
TOKENS = "tokens.safetensors"
META = "meta.json"


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything besides tokenizer, template and input that changes the tokens."""

    fmt: str = "auto"
    max_length: int = 2048
    last_turn_only: bool = False
    supervise_empty_think: bool = False
    # In the key because a strict run must fail on rows that a lenient run skipped.
    strict: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's vocabulary, merges, normaliser, added and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    digest = hashlib.sha256(state.encode("utf-8"))
    # Templates read bos_token/eos_token etc. by name, so the names matter too.
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(
    tokenizer: Any, template: str, settings: TokenizeSettings, source_fingerprint: str
) -> str:
    described = asdict(settings)
    if not settings.chat_template_kwargs:
        # Left out when empty: entries (and the feature shards named by their key) built
        # without template variables keep their key.
        del described["chat_template_kwargs"]
    payload = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template,
        "settings": described,
        "input": source_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _meta_checksum(meta: dict[str, Any]) -> str:
    """sha256 of meta.json's content without its `checksum` field, in canonical JSON."""
    content = {name: value for name, value in meta.items() if name != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _read_meta(entry: Path) -> dict[str, Any]:
    """meta.json of `entry`, checked against its own checksum; `DamagedFile` otherwise."""
    path = entry / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedFile(f"{path} is damaged (missing)") from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        raise DamagedFile(f"{path} is damaged (not valid JSON)") from None
    if not isinstance(meta, dict) or "checksum" not in meta:
        raise DamagedFile(f"{path} records no checksums (an earlier draftforge wrote it)")
    if meta["checksum"] != _meta_checksum(meta):
        raise DamagedFile(f"{path} is damaged (its content differs from its checksum)")
    return meta


def _check_file(path: Path, record: dict[str, Any]) -> None:
    """`DamagedFile` unless `path` has the size and sha256 that meta.json records.

    Hashing reads the whole file once per load, at disk or sha256 speed (about 1 GB/s):
    a second or so per 200M tokens (5 bytes each). load_file then reads it mostly from the
    page cache.
    """
    if not path.is_file():
        raise DamagedFile(f"{path} is damaged (missing)")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise DamagedFile(f"{path} is damaged ({size} bytes, {META} records {record['bytes']})")
    if sha256_file(path) != record["sha256"]:
        raise DamagedFile(f"{path} is damaged (sha256 differs from {META})")


class TokenizedDataset(torch.utils.data.Dataset):
    """A tokenised dataset loaded from a cache entry; rows are views into flat arrays.

    Raises `DamagedFile` when meta.json or tokens.safetensors fails its check.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta = _read_meta(self.path)
        _check_file(self.path / TOKENS, meta["files"][TOKENS])
        tensors = load_file(self.path / TOKENS)
        self.input_ids: torch.Tensor = tensors["input_ids"]  # int32 [N]
        self.loss_mask: torch.Tensor = tensors["loss_mask"]  # uint8 [N]
        self.offsets: torch.Tensor = tensors["offsets"]  # int64 [rows + 1]
        self.key: str = meta["key"]
        self.ids: list[str] = meta["ids"]
        self.stats: dict[str, Any] = meta["stats"]
        self.report = DataReport.from_dict(meta["report"])

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        """Tokens of each row."""
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return {
            "id": self.ids[i],
            "input_ids": self.input_ids[start:end].long(),
            "loss_mask": self.loss_mask[start:end].bool(),
        }


# (input_ids int32, loss_mask uint8, whether it was truncated), or why the row was dropped
_Result = tuple[np.ndarray, np.ndarray, bool] | RowError


def _encode(template: ChatTemplate, max_length: int, conversation: Conversation) -> _Result:
    try:
        ids, mask = template.encode(conversation.messages)
    except RowError as err:
        return err
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        return RowError(
            "no_supervised_tokens", f"no assistant token in the first {len(ids)} tokens"
        )
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8), truncated


# Set once per worker process by the pool initializer, so that the tokenizer crosses the
# process boundary once instead of with every task.
_worker_args: tuple[ChatTemplate, int] | None = None


def _init_worker(template: ChatTemplate, max_length: int) -> None:
    global _worker_args
    _worker_args = template, max_length


def _encode_in_worker(conversation: Conversation) -> _Result:
    assert _worker_args is not None, "the pool initializer did not run"
    return _encode(*_worker_args, conversation)


def _encode_all(
    conversations: list[Conversation], template: ChatTemplate, max_length: int, num_workers: int
) -> Iterator[_Result]:
    """Results in input order, from `num_workers` processes (in this one when 1)."""
    if num_workers <= 1 or len(conversations) < 2:
        for conversation in conversations:
            yield _encode(template, max_length, conversation)
        return
    # Fork where the platform has it: workers inherit the tokenizer instead of unpickling
    # it, and skip re-importing torch. They only run the tokenizer and numpy.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    chunksize = max(1, min(64, len(conversations) // (4 * num_workers)))
    with context.Pool(num_workers, _init_worker, (template, max_length)) as pool:
        yield from pool.imap(_encode_in_worker, conversations, chunksize=chunksize)


def _write_entry(
    entry: Path,
    key: str,
    ids: list[str],
    arrays: list[tuple[np.ndarray, np.ndarray]],
    stats: dict[str, Any],
    report: DataReport,
    description: dict[str, Any],
) -> None:
    lengths = np.fromiter((len(a) for a, _ in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty = np.zeros(0, dtype=np.int32)
    tensors = {
        "input_ids": np.concatenate([a for a, _ in arrays]) if arrays else empty,
        "loss_mask": np.concatenate([m for _, m in arrays]) if arrays else empty.astype(np.uint8),
        "offsets": offsets,
    }
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / TOKENS))
        meta = {
            **description,
            "key": key,
            "ids": ids,
            "stats": stats,
            "report": report.to_dict(),
            "files": {TOKENS: _file_record(tmp / TOKENS)},
        }
        meta["checksum"] = _meta_checksum(meta)
        (tmp / META).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        try:
            tmp.rename(entry)
        except OSError:
            # The entry exists: damaged and being built again, or finished first by another
            # process (the same tokens). Replace its files in place, tokens first; the draft
            # vocabularies beside them stay, each checked on its own.
            if not entry.is_dir():
                raise
            for name in (TOKENS, META):
                os.replace(tmp / name, entry / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_entry(entry: Path, source: Source) -> TokenizedDataset:
    dataset = TokenizedDataset(entry)
    # Not in the key nor in the entry: the folder's other files as they are now.
    dataset.report.files_skipped = [str(p) for p in source.unsupported]
    return dataset


def prepare_dataset(
    path: str | Path | Source,
    tokenizer: Any,
    *,
    split: str = "train",
    fmt: str = "auto",
    max_length: int = 2048,
    last_turn_only: bool = False,
    supervise_empty_think: bool = False,
    chat_template: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    strict: bool = False,
    progress: bool = True,
    progress_interval_s: float = 30.0,
) -> TokenizedDataset:
    """Read, template, mask and tokenise `path` once; later calls load the cached result.

    `chat_template` replaces the tokenizer's own template (the jinja text itself);
    `chat_template_kwargs` are variables for it (`enable_thinking`, ...).
    `num_workers` defaults to the number of CPU cores. `progress`: a bar, or a line every
    `progress_interval_s` seconds when stderr is not a terminal.
    """
    source = path if isinstance(path, Source) else Source.open(path, split)
    kwargs = template_kwargs(chat_template_kwargs)
    template = ChatTemplate(
        tokenizer,
        chat_template,
        last_turn_only=last_turn_only,
        supervise_empty_think=supervise_empty_think,
        chat_template_kwargs=kwargs,
    )
    settings = TokenizeSettings(
        fmt=fmt,
        max_length=max_length,
        last_turn_only=last_turn_only,
        supervise_empty_think=supervise_empty_think,
        strict=strict,
        chat_template_kwargs=kwargs,
    )
    key = cache_key(tokenizer, template.template, settings, source.fingerprint())
    entry = (Path(cache_dir).expanduser() if cache_dir else cache_root() / "datasets") / key
    if entry.is_dir():
        try:
            return _load_entry(entry, source)
        except DamagedFile as err:
            print(f"dataset cache: {err}; building the entry again", flush=True)

    conversations, report = read_conversations(source, fmt=fmt, strict=strict)
    workers = num_workers if num_workers is not None else os.cpu_count() or 1
    ids, arrays, truncated = [], [], 0
    # closing(): a strict-mode DataError must also shut the worker pool down.
    with closing(_encode_all(conversations, template, max_length, workers)) as results:
        bar = progress_bar(
            len(conversations),
            desc="tokenising",
            unit="conv",
            interval_s=progress_interval_s,
            disable=not progress,
        )
        for conversation, result in zip(conversations, results, strict=True):
            bar.update(1)
            if isinstance(result, RowError):
                report.skip(result.reason, conversation.source, result.detail)
                continue
            ids.append(conversation.id)
            arrays.append(result[:2])
            truncated += result[2]
        bar.close()
    description = {
        "settings": asdict(settings),
        "source": source.name,
        "template": template.template,
    }
    _write_entry(entry, key, ids, arrays, _stats(arrays, truncated), report, description)
    return _load_entry(entry, source)


def _stats(arrays: list[tuple[np.ndarray, np.ndarray]], truncated: int) -> dict[str, Any]:
    """Rows and tokens of the tokenised rows (input ids, loss mask), as meta.json keeps them."""
    tokens = sum(len(a) for a, _ in arrays)
    return {
        "rows": len(arrays),
        "tokens": tokens,
        "supervised_tokens": int(sum(int(m.sum()) for _, m in arrays)),
        "max_row_tokens": max((len(a) for a, _ in arrays), default=0),
        "mean_row_tokens": tokens / len(arrays) if arrays else 0.0,
        "rows_truncated": truncated,
    }
