"""The EAGLE-3 training-time-test (TTT) objective as pure tensor functions.

Alignment (DESIGN.md): at step k, index t feeds the draft the embedding of token t+1+k and
learns the target's next-token distribution at position t+1+k, i.e. it predicts token
t+2+k. Index t is supervised at step k iff token t+2+k is a supervised (assistant) token of
the same packed sample, and the teacher's argmax there lies inside the draft vocabulary.
Step k's loss weighs decay**k; each step is normalised by its count of supervised indices.
"""

from __future__ import annotations

import torch
from torch import Tensor


def shift_left(x: Tensor, n: int, fill: int | float | bool = 0) -> Tensor:
    """x[:, t] <- x[:, t + n] along dim 1; the last n entries become ``fill``."""
    if n == 0:
        return x
    pad = x.new_full((x.shape[0], min(n, x.shape[1]), *x.shape[2:]), fill)
    return torch.cat([x[:, n:], pad], dim=1)


def step_mask(loss_mask: Tensor, segment_ids: Tensor | None, k: int) -> Tensor:
    """[B, T] bool: index t at step k predicts token t+2+k, supervised and in t's sample."""
    predicted = 2 + k
    mask = shift_left(loss_mask.bool(), predicted, False)
    if segment_ids is not None:
        mask &= shift_left(segment_ids, predicted, -1) == segment_ids
    return mask


def step_counts(loss_mask: Tensor, segment_ids: Tensor | None, steps: int) -> Tensor:
    """[K] int64: supervised indices per step, known from the data alone (no target needed).

    The trainer sums these over the whole global batch (all micro-batches and ranks) to get
    loss denominators that do not depend on how the batch is split.
    """
    return torch.stack([step_mask(loss_mask, segment_ids, k).sum() for k in range(steps)])


def step_weights(steps: int, decay: float) -> list[float]:
    """Loss weight of step k: decay**k."""
    return [decay**k for k in range(steps)]


def soft_cross_entropy(logits: Tensor, probs: Tensor) -> Tensor:
    """-sum_v p(v) log q(v), over the last dim; fp32 for the log-softmax."""
    return -(probs * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)


def step_loss_terms(
    logits: Tensor,
    teacher_probs: Tensor,
    teacher_argmax: Tensor,
    mask: Tensor,
    d2t: Tensor,
    t2d: Tensor,
) -> tuple[Tensor, Tensor]:
    """Sum of soft cross-entropies and count of correct argmaxes at one step.

    logits: [B, L, Vd] draft logits; teacher_probs: [B, L, Vd] and teacher_argmax: [B, L]
    already aligned with them; mask: [B, L] supervised indices (from :func:`step_mask`).
    Indices whose teacher argmax is outside the draft vocab add no loss (the draft cannot
    put mass there) but count as wrong: the draft would be rejected there when decoding.
    """
    ce = soft_cross_entropy(logits, teacher_probs)  # [B, L]
    in_vocab = t2d[teacher_argmax]
    ce_sum = torch.where(mask & in_vocab, ce, 0.0).sum()
    draft_pred = logits.argmax(dim=-1)
    correct = ((draft_pred + d2t[draft_pred] == teacher_argmax) & mask).sum()
    return ce_sum, correct


def acceptance_length(acc: Tensor) -> Tensor:
    """Training-time estimate of tokens per verification: 1 + sum_k prod_{j<=k} acc_j."""
    return 1 + torch.cumprod(acc, dim=0).sum()
