"""Accounting for rows that a data run skips, so that nothing is dropped silently."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """Input that cannot be used: a bad row under `strict=True`, an unreadable file, or no
    usable rows at all; the message starts with the row's or the file's location."""


class DamagedFile(DataError):
    """A file of the dataset cache is missing, unreadable, or differs from the checksum
    recorded for it; the message names the file and says which."""


@dataclass
class DataReport:
    """Rows read, rows skipped per reason, and where the first few of each reason came from.

    With `strict`, the first skip raises `DataError` instead of being counted.
    """

    strict: bool = False
    max_examples: int = 3
    rows_read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    # reason -> ["file:line: detail", ...], the first `max_examples` of each reason
    examples: dict[str, list[str]] = field(default_factory=dict)
    # Files of a data folder left out for their type. Not saved with the rows: which other
    # files a folder holds is no part of the input's identity.
    files_skipped: list[str] = field(default_factory=list)

    @property
    def rows_kept(self) -> int:
        return self.rows_read - self.skipped.total()

    def skip(self, reason: str, where: str, detail: str) -> None:
        """Record one skipped row (already counted in `rows_read`)."""
        message = f"{where}: {detail}"
        if self.strict:
            raise DataError(f"{message} [{reason}]")
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(message)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per fact."""
        out = [f"rows read: {self.rows_read}, kept: {self.rows_kept}"]
        for reason, count in sorted(self.skipped.items()):
            out.append(f"skipped {count} ({reason}), e.g.")
            out.extend(f"    {example}" for example in self.examples.get(reason, []))
        if self.files_skipped:
            out.append(f"skipped {len(self.files_skipped)} files (unsupported_file_type), e.g.")
            out.extend(
                f"    {path}: not read; convert it to JSON lines, JSON or Parquet to use it"
                for path in self.files_skipped[: self.max_examples]
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "skipped": dict(self.skipped),
            "examples": self.examples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataReport":
        return cls(
            rows_read=data["rows_read"],
            skipped=Counter(data["skipped"]),
            examples={k: list(v) for k, v in data["examples"].items()},
        )
