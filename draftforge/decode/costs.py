"""What decoding costs on this machine: the engine's own forwards, timed in place.

:func:`measure_costs` fills the engine's caches with ``context`` entries, then times (after a
warm-up, median of a few calls) one target step (1 token), a verify of each tree size, one
draft step (the frontier's draft forward and head) and a whole draft round (the extension by
one committed token, then the tree). Each timed forward is undone (caches compacted back);
the engine's next ``generate`` starts afresh anyway. A round then costs ``draft_round +
verify(n)``, and speculation pays when ``AL * target_step`` exceeds that
(:meth:`DecodeCosts.speedup_at`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from draftforge.decode.engine import SpecEngine
from draftforge.decode.tree import ancestor_mask


@dataclass
class DecodeCosts:
    """Milliseconds per forward of one engine at a given cache length."""

    path: str
    threads: int
    context: int
    target_step_ms: float
    verify_ms: dict[int, float] = field(default_factory=dict)
    draft_step_ms: float | None = None
    draft_round_ms: float | None = None

    def round_ms(self, tokens: int) -> float | None:
        """One speculative round verifying ``tokens`` nodes: drafting plus the verify."""
        if self.draft_round_ms is None or tokens not in self.verify_ms:
            return None
        return self.draft_round_ms + self.verify_ms[tokens]

    def speedup_at(self, acceptance_length: float, tokens: int) -> float | None:
        """The speedup over one target step per token that acceptance length ``AL`` gives."""
        per_round = self.round_ms(tokens)
        if per_round is None:
            return None
        return acceptance_length * self.target_step_ms / per_round

    def lines(self) -> list[str]:
        """The costs as printable lines."""
        head = (
            f"cost model ({self.path} target path, {self.threads} threads, {self.context} "
            f"cached tokens): target step {self.target_step_ms:.1f} ms"
        )
        lines = [head]
        if self.verify_ms:
            sizes = ", ".join(f"{n}: {ms:.1f}" for n, ms in sorted(self.verify_ms.items()))
            lines.append(f"  verify of n tokens (ms) {{{sizes}}}")
        if self.draft_step_ms is not None and self.draft_round_ms is not None:
            lines.append(
                f"  draft step {self.draft_step_ms:.1f} ms, draft round {self.draft_round_ms:.1f} ms"
            )
            for n in sorted(self.verify_ms):
                if n > 1:
                    steps = (self.round_ms(n) or 0.0) / self.target_step_ms
                    lines.append(
                        f"  n={n}: a round costs {steps:.2f} target steps "
                        f"(speculation pays above acceptance length {steps:.2f})"
                    )
        return lines


def _median_ms(call: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _tree_parents(tokens: int, topk: int) -> list[int]:
    """A tree of ``tokens`` nodes, each node with up to ``topk`` children, breadth first."""
    return [-1] + [(node - 1) // topk for node in range(1, tokens)]


@torch.no_grad()
def measure_costs(
    engine: SpecEngine,
    tree_sizes: Iterable[int] = (),
    context: int = 128,
    repeats: int = 5,
    warmup: int = 2,
) -> DecodeCosts:
    """Time ``engine``'s forwards at ``context`` cached tokens (see the module docstring).

    tree_sizes: the verify sizes to time besides the engine's own shape (1 is always timed)."""
    path, drafter = engine.path, engine.drafter
    device = engine.target.device
    shape = engine.shape
    sizes = sorted({1, *tree_sizes, shape.draft_tokens if engine.drafter else 1})
    context = min(context, engine.max_positions - max(sizes) - shape.num_steps - 1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, engine.target.vocab_size, (context + max(sizes),), generator=gen)
    ids = ids.to(device)
    engine._reset(context)
    path.reserve(context + max(sizes))
    _, aux = path.forward(ids[:context], torch.arange(context, device=device), None, True, True)
    empty = torch.zeros(0, dtype=torch.long, device=device)

    def verify(n: int) -> None:
        parents = _tree_parents(n, max(shape.topk, 1))
        mask = None if shape.topk == 1 else ancestor_mask(parents).to(device)
        positions = context + torch.arange(n, device=device)
        path.forward(ids[context : context + n], positions, mask, False, drafter is not None)
        path.compact(context, empty)

    verify_ms = {n: _median_ms(lambda n=n: verify(n), repeats, warmup) for n in sizes}
    costs = DecodeCosts(
        path=path.name,
        threads=torch.get_num_threads(),
        context=context,
        target_step_ms=verify_ms[1],
        verify_ms=verify_ms,
    )
    if drafter is None or aux is None:
        return costs
    hidden = drafter.extend(aux[:-1], ids[1:context], 0)
    topk = shape.topk
    frontier = hidden.expand(topk, -1)
    seen = torch.zeros(topk, 0, dtype=torch.bool, device=device)

    def step() -> None:
        drafter.logits(drafter.tree_step(frontier, ids[:topk], context, seen))

    def draft_round() -> None:
        extended = drafter.extend(aux[-1:], ids[context : context + 1], context - 1)
        engine._draft_tree(extended, int(ids[context]), context - 1, shape.num_steps)
        drafter.length -= 1

    costs.draft_step_ms = _median_ms(step, repeats, warmup)
    costs.draft_round_ms = _median_ms(draft_round, repeats, warmup)
    return costs
