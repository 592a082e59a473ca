"""The EAGLE-3 training-time-test (TTT) objective as pure tensor functions.

Alignment (docs/architecture.md): at step k, index t feeds the draft the embedding of token t+1+k and
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


def teacher_rows(loss_mask: Tensor, segment_ids: Tensor | None) -> Tensor:
    """[B, T] bool: the indices whose teacher some step reads, at any TTT depth.

    Step k at index i reads the teacher at p = i+1+k for the token at i+2+k (:func:`step_mask`):
    that token is supervised and, samples being contiguous, p and p+1 lie in one sample. So
    every such p has a supervised token after it in its sample, which is what this marks.
    """
    return step_mask(loss_mask, segment_ids, -1)


def step_counts(loss_mask: Tensor, segment_ids: Tensor | None, steps: int) -> Tensor:
    """[K] int64: supervised indices per step, known from the data alone (no target needed).

    The trainer sums these over the whole global batch (all micro-batches and ranks) to get
    loss denominators that do not depend on how the batch is split.
    """
    return torch.stack([step_mask(loss_mask, segment_ids, k).sum() for k in range(steps)])


def step_weights(steps: int, decay: float) -> list[float]:
    """Loss weight of step k: decay**k."""
    return [decay**k for k in range(steps)]


def step_loss_terms(
    normed: Tensor,
    head_weight: Tensor,
    teacher_probs: Tensor,
    teacher_argmax: Tensor,
    mask: Tensor,
    d2t: Tensor,
    t2d: Tensor,
    keep_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sum of soft cross-entropies and count of correct argmaxes at one step.

    normed: [B, L, H] the draft's final-norm states; head_weight: [Vd, H] its lm_head;
    teacher_probs: [B, L, Vd] and teacher_argmax: [B, L] aligned with them; mask: [B, L]
    supervised indices (from :func:`step_mask`). Indices whose teacher argmax is outside the
    draft vocab add no loss (the draft cannot put mass there) but count as wrong: the draft
    would be rejected there when decoding. ``keep_grad``: see :func:`head_soft_cross_entropy`.

    Only the supervised indices go through the head: the others (prompts, padding, the last
    indices of a sample) would add nothing but its cost.
    """
    argmax = teacher_argmax[mask]
    ce_sum, draft_pred = head_soft_cross_entropy(
        normed[mask],
        head_weight,
        teacher_probs[mask],
        t2d[argmax].to(torch.float32),
        keep_grad=keep_grad,
    )
    correct = (draft_pred + d2t[draft_pred] == argmax).sum()
    return ce_sum, correct


def head_soft_cross_entropy(
    h: Tensor,
    weight: Tensor,
    probs: Tensor,
    row_weights: Tensor,
    chunk: int = 1024,
    keep_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """sum_n w_n * CE(probs_n, softmax(h_n @ weight^T)), and each row's argmax.

    Equals -sum(p * log_softmax(h @ weight.T)) row by row, without a log-softmax tensor.
    By default only ``h`` is kept for backward, which recomputes the logits ``chunk`` rows at
    a time: the K steps' [T, Vd] logits (the largest activations of the unroll) are never
    alive together. ``keep_grad`` instead keeps d(loss)/d(logits) from the forward: one
    [N, Vd] tensor per step, and no recomputation (faster when it fits).
    h: [N, H]; weight: [Vd, H]; probs: [N, Vd]; row_weights: [N] float. Returns a scalar
    and [N] int64 argmaxes (ties: first index, as torch.argmax).
    """
    return _HeadSoftCE.apply(h, weight, probs, row_weights, chunk, keep_grad)


class _HeadSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        h: Tensor,
        weight: Tensor,
        probs: Tensor,
        row_weights: Tensor,
        chunk: int,
        keep_grad: bool,
    ) -> tuple[Tensor, Tensor]:
        # Softmax statistics in fp32 at least (bf16 inputs), fp64 when the inputs are.
        acc = torch.promote_types(h.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=h.device)
        preds = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
        w = weight.to(h.dtype)
        dlogits = (
            torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
            if keep_grad
            else None
        )
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (h[rows] @ w.T).to(acc)  # [c, Vd]
            p = probs[rows].to(acc)
            # CE = lse * sum(p) - <p, logits>: no log-softmax tensor is formed.
            lse = torch.logsumexp(logits, dim=-1)
            ce = lse * p.sum(-1) - (p * logits).sum(-1)
            total += (ce * row_weights[rows]).sum()
            preds[rows] = logits.argmax(dim=-1)
            if dlogits is not None:
                dlogits[rows] = _dlogits(logits, lse, p, row_weights[rows]).to(h.dtype)
        ctx.save_for_backward(h, weight, probs, row_weights, dlogits)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(preds)
        return total, preds

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor, _grad_preds: Tensor
    ) -> tuple[Tensor | None, ...]:
        h, weight, probs, row_weights, dlogits = ctx.saved_tensors
        w = weight.to(h.dtype)
        grad_h = torch.empty_like(h)
        acc = torch.promote_types(h.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for start in range(0, h.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            if dlogits is not None:
                g = dlogits[rows] * grad_total.to(h.dtype)
            else:
                logits = (h[rows] @ w.T).to(acc)
                lse = torch.logsumexp(logits, dim=-1)
                g = _dlogits(logits, lse, probs[rows].to(acc), row_weights[rows])
                g = (g * grad_total).to(h.dtype)
            grad_h[rows] = g @ w
            grad_w += (g.T @ h[rows]).to(acc)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None


def _dlogits(logits: Tensor, lse: Tensor, p: Tensor, row_weights: Tensor) -> Tensor:
    """d(w * CE)/d(logits) = w * (softmax * sum(p) - p), row by row."""
    softmax = torch.exp(logits - lse[:, None])
    return (softmax * p.sum(-1, keepdim=True) - p) * row_weights.to(logits.dtype)[:, None]


def acceptance_length(acc: Tensor) -> Tensor:
    """Training-time estimate of tokens per verification: 1 + sum_k prod_{j<=k} acc_j."""
    return 1 + torch.cumprod(acc, dim=0).sum()
