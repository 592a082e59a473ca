"""Draft-tree shape (SGLang's knobs) and the pure index functions that build and mask a tree."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from draftforge.decode.errors import DecodeError


@dataclass(frozen=True)
class TreeShape:
    """How much to draft per round, named as SGLang names it.

    num_steps: draft forwards per round (tree depth); 0 turns drafting off.
    topk: children expanded per node; 1 drafts a chain of num_steps tokens.
    num_draft_tokens: tree nodes verified per round, the root included; trees keep the best
        num_draft_tokens - 1 candidates by cumulative draft log-prob. Default: num_steps + 1
        for a chain, 1 + num_steps * topk (at most every candidate) for a tree.
    min_prob: draftforge's own, not SGLang's: the shape is an upper bound, and a node is
        drafted only when its cumulative draft probability (the product of the draft's
        probabilities along its path) is at least min_prob. Drafting stops at the first level
        with no such node; a round without one verifies the root alone, a plain step. Where a
        verified token costs a good part of a step (a CPU), this keeps the tokens the draft
        is unsure of out of the verify. 0 drafts the whole shape.
    """

    num_steps: int = 3
    topk: int = 1
    num_draft_tokens: int | None = None
    min_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.num_steps < 0:
            raise DecodeError(f"num_steps must be >= 0, got {self.num_steps}")
        if self.topk < 1:
            raise DecodeError(f"topk must be >= 1, got {self.topk}")
        if not 0.0 <= self.min_prob < 1.0:
            raise DecodeError(f"min_prob must be in [0, 1), got {self.min_prob}")
        n = self.num_draft_tokens
        if n is None:
            return
        if self.topk == 1 and n != self.num_steps + 1:
            raise DecodeError(
                f"a chain (topk 1) verifies num_steps + 1 = {self.num_steps + 1} tokens; "
                f"num_draft_tokens {n} differs: drop it or set it to {self.num_steps + 1}"
            )
        if not 1 <= n <= self.candidates + 1:
            raise DecodeError(
                f"num_draft_tokens {n} must be in 1..{self.candidates + 1}: num_steps "
                f"{self.num_steps} with topk {self.topk} drafts {self.candidates} candidates"
            )

    @property
    def candidates(self) -> int:
        """Nodes drafted per round: topk at depth 1, topk^2 per deeper level (SGLang)."""
        if self.num_steps == 0:
            return 0
        return self.topk + (self.num_steps - 1) * self.topk**2

    @property
    def draft_tokens(self) -> int:
        """Resolved num_draft_tokens (root included)."""
        if self.num_draft_tokens is not None:
            return self.num_draft_tokens
        if self.topk == 1:
            return self.num_steps + 1
        return 1 + min(self.candidates, self.num_steps * self.topk)

    @property
    def drafting(self) -> bool:
        return self.num_steps > 0 and self.draft_tokens > 1


def select_nodes(scores: Tensor, depths: Tensor, budget: int) -> Tensor:
    """Indices of the ``budget`` best candidates by score, in (depth, -score) order.

    A child's score is its parent's plus a log-prob <= 0, so it never beats its parent; ties
    go to the shallower node, hence every kept node's parent is kept too. The returned order
    puts parents before children and tries siblings best first.
    """
    by_depth = torch.argsort(depths, stable=True)
    best = by_depth[torch.argsort(-scores[by_depth], stable=True)][:budget]
    best = best[torch.argsort(-scores[best], stable=True)]
    return best[torch.argsort(depths[best], stable=True)]


def ancestor_mask(parents: list[int]) -> Tensor:
    """[T, T] bool: entry (i, j) is True iff node j is node i or one of its ancestors."""
    t = len(parents)
    mask = torch.eye(t, dtype=torch.bool)
    for node in range(1, t):
        mask[node] |= mask[parents[node]]
    return mask


def is_chain(parents: list[int]) -> bool:
    return all(parent == node - 1 for node, parent in enumerate(parents) if node > 0)
