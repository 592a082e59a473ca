"""The learning-rate schedule and the training clock it can follow.

A run ends at ``training.max_steps`` (or the steps of ``training.epochs``, when fewer) or,
under ``training.time_limit_minutes``, when its training time (summed over resumes) runs out;
the cosine decay follows whichever is further along, so a time-boxed run still ends annealed.
"""

from __future__ import annotations

import math
import time

from draftforge import parallel
from draftforge.parallel import Layout


def lr_factor(
    step: int, warmup: int, total: int, min_ratio: float, time_fraction: float = 0.0
) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``.

    The decay's progress is the share of the steps after warmup that are done, or the share
    of a time budget that is spent (``time_fraction``), whichever is further along.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Clock:
    """Training time in seconds, summed over resumes and agreed on by every rank.

    Ranks must stop at the same step and use the same learning rate, so each `tick` takes
    the largest time over the ranks (one tiny all-reduce per step, only under a limit).
    """

    def __init__(self, limit_s: float, spent_s: float, layout: Layout) -> None:
        self.limit_s = limit_s
        self.spent_s = spent_s
        self.layout = layout
        self._start = time.perf_counter()

    def start(self) -> None:
        self._start = time.perf_counter()

    def tick(self) -> None:
        if self.limit_s:
            now = self.spent_s + time.perf_counter() - self._start
            self.spent_s, self._start = (
                parallel.all_reduce_max(now, self.layout),
                time.perf_counter(),
            )

    @property
    def fraction(self) -> float:
        return min(1.0, self.spent_s / self.limit_s) if self.limit_s else 0.0

    @property
    def out_of_time(self) -> bool:
        return bool(self.limit_s) and self.spent_s >= self.limit_s
