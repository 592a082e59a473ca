"""Read conversation rows from local JSONL / JSON / Parquet files, folders of them, or the Hub.

Row locations in reports: `file:line` for JSONL (1-based line), `file#index` for JSON arrays
and Parquet rows (0-based), `name[split]#index` for Hugging Face datasets. A file that cannot
be read as its type at all (damaged gzip or Parquet, unknown extension) is a `DataError`
naming it; other files in a folder are left out and listed in the report.
"""

import gzip
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from draftforge.data.conversation import Conversation, RowError, parse_row
from draftforge.data.report import DataError, DataReport

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
JSON_SUFFIXES = (".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
# The file types read, for messages.
TYPES = f"JSON lines, JSON or Parquet ({', '.join(SUFFIXES)})"


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def _is_hidden(path: Path, folder: Path) -> bool:
    """Whether a file of `folder` is hidden or in a hidden folder (.git, .cache, ...)."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if not path.name.lower().endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: cannot decompress it ({err}): the file is damaged or cut short; "
            "write or download it again, or leave it out of the data"
        ) from err


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for number, raw in enumerate(_read_bytes(path).splitlines(), start=1):
        where = f"{path}:{number}"
        if not raw.strip():
            continue  # blank lines separate nothing and are not rows
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield where, RowError("invalid_utf8", f"byte {err.start}: {err.reason}")
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as err:
            yield where, RowError("malformed_json", str(err))


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # A whole-file failure is reported as one skipped row at the file itself.
    try:
        data = json.loads(_read_bytes(path).decode("utf-8"))
    except UnicodeDecodeError as err:
        yield str(path), RowError("invalid_utf8", f"byte {err.start}: {err.reason}")
        return
    except json.JSONDecodeError as err:
        yield str(path), RowError("malformed_json", str(err))
        return
    rows = data if isinstance(data, list) else [data]
    for index, row in enumerate(rows):
        yield f"{path}#{index}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # A dependency of `datasets`; only needed for Parquet.
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                yield f"{path}#{index}", row
                index += 1
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{path}: not readable as Parquet ({err}); write it again with a Parquet writer, "
            "or leave it out of the data"
        ) from err


@dataclass
class Source:
    """Where the rows come from: local files (sorted) or a loaded Hugging Face dataset."""

    name: str
    split: str
    files: list[Path]
    hub: Any = None  # a `datasets.Dataset` when `name` is not a local path
    # Files of a folder that are not of a type read here (hidden ones aside): left out.
    unsupported: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path, split: str = "train") -> "Source":
        """Resolve `path`: a file, a folder (searched recursively) or a Hub dataset name.

        `split` only applies to Hub datasets; local files are read whole.
        """
        local = Path(path).expanduser()
        if local.is_dir():
            found = sorted(p for p in local.rglob("*") if p.is_file())
            files = [p for p in found if _has_suffix(p, SUFFIXES)]
            unsupported = [
                p for p in found if not _has_suffix(p, SUFFIXES) and not _is_hidden(p, local)
            ]
            if not files:
                names = ", ".join(p.name for p in unsupported[:3])
                more = f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else ""
                skipped = f" (skipped {names}{more}: unsupported file type)" if names else ""
                raise DataError(
                    f"{local}: no usable conversations: no data files inside{skipped}; "
                    f"add or convert files to {TYPES}"
                )
            return cls(str(local), split, files, unsupported=unsupported)
        if local.is_file():
            if not _has_suffix(local, SUFFIXES):
                raise DataError(f"{local}: unsupported file type; convert it to {TYPES}")
            return cls(str(local), split, [local])
        if _has_suffix(local, SUFFIXES):
            raise FileNotFoundError(f"{local}: no such file")
        import datasets  # slow to import; only needed for Hub datasets

        return cls(str(path), split, [], datasets.load_dataset(str(path), split=split))

    def fingerprint(self) -> str:
        """Identity of the input for cache keys: content hashes of local files, or the
        Hub dataset's own fingerprint.

        Content rather than size + mtime: a rewrite within one mtime tick, or a copy that
        keeps the mtime, would otherwise reuse a stale cache.
        """
        if self.hub is not None:
            return f"hub:{self.name}:{self.split}:{self.hub._fingerprint}"
        digest = hashlib.sha256()
        for path in self.files:
            file_hash = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    file_hash.update(chunk)
            digest.update(f"{path.resolve()}\0{file_hash.hexdigest()}\0".encode())
        return digest.hexdigest()

    def rows(self) -> Iterator[tuple[str, Any]]:
        """(location, row) pairs; a row that could not be decoded is a RowError."""
        if self.hub is not None:
            for index, row in enumerate(self.hub):
                yield f"{self.name}[{self.split}]#{index}", row
            return
        for path in self.files:
            if _has_suffix(path, JSONL_SUFFIXES):
                yield from _jsonl_rows(path)
            elif _has_suffix(path, JSON_SUFFIXES):
                yield from _json_rows(path)
            else:
                yield from _parquet_rows(path)


def read_conversations(
    source: Source | str | Path,
    *,
    split: str = "train",
    fmt: str = "auto",
    require_assistant: bool = True,
    report: DataReport | None = None,
    strict: bool = False,
) -> tuple[list[Conversation], DataReport]:
    """Every usable row of `source` as a Conversation, and the report of what was skipped.

    `require_assistant=False` keeps user-only conversations (prompt lists for
    regeneration); training data needs at least one assistant turn. Pass `report` to add
    to an existing one (its `strict` then applies).
    """
    if not isinstance(source, Source):
        source = Source.open(source, split)
    report = report if report is not None else DataReport(strict=strict)
    report.files_skipped.extend(str(p) for p in source.unsupported)
    conversations = []
    seen: Counter[str] = Counter()
    for where, row in source.rows():
        report.rows_read += 1
        try:
            if isinstance(row, RowError):
                raise row
            conv_id, messages = parse_row(row, fmt, require_assistant=require_assistant)
        except RowError as err:
            report.skip(err.reason, where, err.detail)
            continue
        # Repeated ids (duplicate rows, or datasets with clashing ids) get a suffix, so
        # every kept conversation has its own id.
        seen[conv_id] += 1
        if seen[conv_id] > 1:
            conv_id = f"{conv_id}#{seen[conv_id]}"
        conversations.append(Conversation(conv_id, messages, where))
    return conversations, report
