"""Progress for a person at a terminal and for a batch log alike.

A tqdm bar redraws itself with carriage returns, which a log file (a scheduler's captured
stdout and stderr) keeps as one ever longer line. :func:`progress_bar` gives a bar when stderr is
a terminal and otherwise a :class:`LineProgress` with the same interface, which writes one
plain line to stderr every ``interval_s`` seconds (``output.progress_interval_s``) and one
when it closes, e.g. ``train step 120/1000 loss 3.210 acc0 0.41 al 1.90 tok/s 5200 eta 12m``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from tqdm import tqdm


class Progress(Protocol):
    """What callers use of a progress bar; tqdm and :class:`LineProgress` both have it."""

    n: float
    total: float | None

    def update(self, n: float = 1) -> bool | None: ...

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Values shown after the count (the latest metrics)."""

    def write(self, s: str) -> None:
        """Print a line to stdout without breaking the bar."""

    def close(self) -> None: ...


def progress_bar(
    total: float | None,
    *,
    desc: str,
    unit: str = "it",
    initial: float = 0,
    interval_s: float = 30.0,
    disable: bool = False,
    **bar_options: Any,
) -> Progress:
    """A tqdm bar when stderr is a terminal, else a :class:`LineProgress`.

    ``bar_options`` (``bar_format``, ``unit_scale``, ...) go to tqdm; the lines use
    ``unit_scale`` only. ``disable`` shows nothing (ranks other than 0)."""
    if sys.stderr.isatty():
        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            disable=disable,
            dynamic_ncols=True,
            **bar_options,
        )
    return LineProgress(
        total,
        desc=desc,
        unit=unit,
        initial=initial,
        interval_s=interval_s,
        disable=disable,
        unit_scale=bool(bar_options.get("unit_scale")),
    )


class LineProgress:
    """A progress bar's interface that writes a plain line at most every ``interval_s``
    seconds (checked on ``update``) and a last one on ``close``."""

    def __init__(
        self,
        total: float | None,
        *,
        desc: str,
        unit: str = "it",
        initial: float = 0,
        interval_s: float = 30.0,
        disable: bool = False,
        unit_scale: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.n = total, initial
        self.desc, self.unit, self.unit_scale = desc, unit, unit_scale
        self.interval_s, self.disable, self.clock = interval_s, disable, clock
        self.start = self.last = clock()
        self.initial = self.shown = initial
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.disable and self.clock() - self.last >= self.interval_s:
            self._show()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def write(self, s: str) -> None:
        print(s, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not (self.disable or self.closed) and self.n != self.shown:
            self._show()
        self.closed = True

    def line(self) -> str:
        """``desc unit n/total key value ... eta T``."""
        parts = [self.desc, self.unit, f"{self._count(self.n)}/{self._count(self.total)}"]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        elapsed = self.clock() - self.start
        done = self.n - self.initial
        if self.total and done > 0 and elapsed > 0:
            parts.append(f"eta {duration_text((self.total - self.n) * elapsed / done)}")
        return " ".join(parts)

    def _show(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
        self.last, self.shown = self.clock(), self.n

    def _count(self, value: float | None) -> str:
        if value is None:
            return "?"
        if self.unit_scale:
            return tqdm.format_sizeof(value)
        return f"{value:.0f}"


def duration_text(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``: the coarse remaining time a log line needs."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours}h{minutes:02d}m"
