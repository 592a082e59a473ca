"""Training-time-test (TTT) attention for the EAGLE-3 unroll, without a dense [T, K*T] mask.

At unroll step k the query at index i attends to

* the step-0 keys ``j <= i`` of its own packed segment (a causal block), and
* the same-index key ``i`` of each of the steps 1..k (the "diagonal").

The obvious implementation concatenates the k+1 key sets into one [T, (k+1)*T] score matrix
with a dense mask and lets autograd keep the fp32 probabilities alive for backward: O(T^2)
memory per head and per step. Here the causal block goes through a fused attention kernel
that also returns its log-sum-exp (lse), the k diagonal scores are only [B, H, T] each, and
the two are merged exactly by log-sum-exp. The backward re-uses the fused *backward* kernel:
fed the merged output and the merged lse, it sees exactly the probabilities and the
``rowsum(dO * O)`` term of the full attention, so its gradients for q, k0, v0 are the full
gradients; the diagonal keys add a few [B, H, T] terms by hand. Nothing of size T*T per
(batch, head) is saved for backward.

The kernels for the causal block live in :mod:`draftforge.ttt_kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from draftforge.ttt_kernels import Kernel, chunked_kernel, pick_kernel

__all__ = ["ttt_attention", "ttt_attention_chunked"]


# ---------------------------------------------------------------------------------------------
# Diagonal keys and the log-sum-exp merge
# ---------------------------------------------------------------------------------------------


def _diag_scores(qg: Tensor, k_j: Tensor, scale: float) -> Tensor:
    """qg [B, Hkv, G, T, D], k_j [B, Hkv, T, D] -> scale * <q[i], k_j[i]>  [B, Hkv, G, T]."""
    return torch.einsum("bhgtd,bhtd->bhgt", qg, k_j) * scale


def _merge_diagonal(
    q: Tensor,
    out_c: Tensor,
    lse_c: Tensor,
    k_diag: Sequence[Tensor],
    v_diag: Sequence[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Fold the diagonal keys into the causal result: (out [B,Hq,T,D] q.dtype, lse [B,Hq,T])."""
    hkv = k_diag[0].shape[1]
    cdt = lse_c.dtype
    qg = q.unflatten(1, (hkv, -1)).to(cdt)  # [B, Hkv, G, T, D]
    lse_cg = lse_c.unflatten(1, (hkv, -1))  # [B, Hkv, G, T]
    scores = [_diag_scores(qg, k.to(cdt), scale) for k in k_diag]  # k x [B, Hkv, G, T]
    lse = torch.logsumexp(torch.stack([lse_cg, *scores]), dim=0)  # [B, Hkv, G, T]
    out = torch.exp(lse_cg - lse)[..., None] * out_c.unflatten(1, (hkv, -1)).to(cdt)
    for s, v in zip(scores, v_diag, strict=True):
        out = out + torch.exp(s - lse)[..., None] * v.to(cdt)[:, :, None]
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def _diagonal_backward(
    grad_out: Tensor,
    q: Tensor,
    out: Tensor,
    lse: Tensor,
    k_diag: Sequence[Tensor],
    v_diag: Sequence[Tensor],
    scale: float,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Gradient contributions of the diagonal keys: (dq part [B,Hq,T,D] in lse dtype, dk_j, dv_j).

    With P_j = exp(s_j - lse) and D = rowsum(dO * out) (the full attention's quantities):
    dS_j = P_j (dO . v_j - D), dq += scale dS_j k_j, dk_j = scale sum_g dS_j q,
    dv_j = sum_g P_j dO, where sum_g runs over the query heads sharing a kv head.
    """
    hkv = k_diag[0].shape[1]
    cdt = lse.dtype
    qg = q.unflatten(1, (hkv, -1)).to(cdt)  # [B, Hkv, G, T, D]
    dog = grad_out.unflatten(1, (hkv, -1)).to(cdt)
    lse_g = lse.unflatten(1, (hkv, -1))  # [B, Hkv, G, T]
    delta = (dog * out.unflatten(1, (hkv, -1)).to(cdt)).sum(-1)  # [B, Hkv, G, T]
    dq = torch.zeros_like(qg)
    dks: list[Tensor] = []
    dvs: list[Tensor] = []
    for k, v in zip(k_diag, v_diag, strict=True):
        kc, vc = k.to(cdt), v.to(cdt)
        probs = torch.exp(_diag_scores(qg, kc, scale) - lse_g)  # [B, Hkv, G, T]
        dscores = probs * (torch.einsum("bhgtd,bhtd->bhgt", dog, vc) - delta)
        dq = dq + (scale * dscores)[..., None] * kc[:, :, None]
        dks.append((scale * torch.einsum("bhgt,bhgtd->bhtd", dscores, qg)).to(k.dtype))
        dvs.append(torch.einsum("bhgt,bhgtd->bhtd", probs, dog).to(v.dtype))
    return dq.flatten(1, 2), dks, dvs


class _TTTAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        kernel: Kernel,
        scale: float,
        segment_ids: Tensor | None,
        n_diag: int,
        q: Tensor,
        k0: Tensor,
        v0: Tensor,
        *diag: Tensor,
    ) -> Tensor:
        k_diag, v_diag = diag[:n_diag], diag[n_diag:]
        out_c, lse_c, aux, aux_ints = kernel.forward(q, k0, v0, scale, segment_ids)
        if n_diag:
            out, lse = _merge_diagonal(q, out_c, lse_c, k_diag, v_diag, scale)
        else:
            out, lse = out_c, lse_c
        # Saved: inputs (no copies), out [B,Hq,T,D], lse [B,Hq,T], kernel aux (rng state) —
        # nothing quadratic in T.
        ctx.save_for_backward(q, k0, v0, out, lse, segment_ids, *aux, *diag)
        ctx.kernel, ctx.scale, ctx.n_diag, ctx.n_aux = kernel, scale, n_diag, len(aux)
        ctx.aux_ints = aux_ints
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k0, v0, out, lse, segment_ids, *rest = ctx.saved_tensors
        aux, diag = tuple(rest[: ctx.n_aux]), rest[ctx.n_aux :]
        k_diag, v_diag = diag[: ctx.n_diag], diag[ctx.n_diag :]
        # The merged out/lse make the fused backward produce the full-attention gradients
        # restricted to the step-0 keys (see module docstring).
        dq, dk0, dv0 = ctx.kernel.backward(
            grad_out, q, k0, v0, out, lse, ctx.scale, segment_ids, aux, ctx.aux_ints
        )
        dks: list[Tensor] = []
        dvs: list[Tensor] = []
        if ctx.n_diag:
            dq_diag, dks, dvs = _diagonal_backward(grad_out, q, out, lse, k_diag, v_diag, ctx.scale)
            dq = (dq.to(dq_diag.dtype) + dq_diag).to(q.dtype)
        return None, None, None, None, dq, dk0, dv0, *dks, *dvs


def _check_inputs(
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    k_diag: Sequence[Tensor],
    v_diag: Sequence[Tensor],
    segment_ids: Tensor | None,
) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, T, D], got shape {tuple(q.shape)}")
    b, hq, t, d = q.shape
    if k0.shape != v0.shape or k0.dim() != 4 or (k0.shape[0], k0.shape[2:]) != (b, (t, d)):
        raise ValueError(
            f"k0/v0 must be [B, Hkv, T, D] = [{b}, Hkv, {t}, {d}], got "
            f"{tuple(k0.shape)} and {tuple(v0.shape)}"
        )
    if hq % k0.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k0.shape[1]})")
    if len(k_diag) != len(v_diag):
        raise ValueError(f"k_diag has {len(k_diag)} tensors but v_diag has {len(v_diag)}")
    for x in (*k_diag, *v_diag):
        if x.shape != k0.shape:
            raise ValueError(f"diagonal keys/values must match k0 {tuple(k0.shape)}: {x.shape}")
    if any(x.dtype != q.dtype for x in (k0, v0, *k_diag, *v_diag)):
        raise ValueError("q, k0, v0 and the diagonal keys/values must share one dtype")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = [{b}, {t}], got {segment_ids.shape}")


def _run(
    kernel: Kernel | None,
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    k_diag: Sequence[Tensor],
    v_diag: Sequence[Tensor],
    scale: float | None,
    segment_ids: Tensor | None,
) -> Tensor:
    _check_inputs(q, k0, v0, k_diag, v_diag, segment_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kernel = pick_kernel(q, segment_ids) if kernel is None else kernel
    out: Tensor = _TTTAttention.apply(
        kernel, scale, segment_ids, len(k_diag), q, k0, v0, *k_diag, *v_diag
    )
    return out


def ttt_attention(
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    k_diag: Sequence[Tensor],
    v_diag: Sequence[Tensor],
    *,
    scale: float | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """EAGLE-3 TTT attention at unroll step k = len(k_diag).

    Args:
        q: [B, Hq, T, D] queries of step k (rotary already applied).
        k0, v0: [B, Hkv, T, D] keys/values of step 0; Hq % Hkv == 0 (query head h uses kv
            head h // (Hq // Hkv)).
        k_diag, v_diag: k tensors [B, Hkv, T, D] each, the keys/values of steps 1..k. Query i
            attends index i of each of them (always allowed).
        scale: softmax scale, default 1/sqrt(D).
        segment_ids: [B, T] integer ids of packed samples, or None for one sample per row.
            Query i sees step-0 key j iff j <= i and both share a segment id. Right padding
            needs no special handling (every query sees at least its own diagonal key).

    Returns:
        [B, Hq, T, D]: softmax over {causal step-0 keys} ∪ {the k diagonal keys} times values.
    """
    return _run(None, q, k0, v0, k_diag, v_diag, scale, segment_ids)


def ttt_attention_chunked(
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    k_diag: Sequence[Tensor],
    v_diag: Sequence[Tensor],
    *,
    scale: float | None = None,
    segment_ids: Tensor | None = None,
    block_size: int = 128,
) -> Tensor:
    """``ttt_attention`` forced onto the pure-PyTorch kernel (blocks of ``block_size`` queries).

    The automatic fallback of ``ttt_attention`` on devices/dtypes without a fused kernel;
    exposed for tests and for checking a fused kernel against it.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return _run(chunked_kernel(block_size), q, k0, v0, k_diag, v_diag, scale, segment_ids)
