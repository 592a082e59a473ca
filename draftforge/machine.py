"""How fast this machine is: its fp32 matmul rate, for run-time estimates and benchmark reports.

Machines that run the same command differ 2-5x in speed, so absolute times mean little
without the rate they were measured at.
"""

from __future__ import annotations

import time

import torch


def matmul_gflops(n: int = 1024, runs: int = 5) -> float:
    """The best fp32 rate of an n x n matmul over ``runs`` tries, in GFLOP/s (about 0.1 s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
