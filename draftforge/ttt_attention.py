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

Kernels for the causal block (chosen per call, see ``_pick_kernel``):

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``). It takes
  float16/bfloat16/float32/float64, grouped-query attention (fewer kv heads) natively, and an
  additive ``attn_mask`` together with ``is_causal`` (a bool mask is rejected), which is how
  packed segments are handled.
* CUDA without packing: ``aten._scaled_dot_product_flash_attention`` (half types only).
* CUDA with packing or in float32: ``aten._scaled_dot_product_efficient_attention``, which
  takes an additive bias next to ``is_causal``.
* Anything else (other devices, float64 on CUDA, unsupported head dims): a pure-PyTorch
  kernel over blocks of queries with the same interface; at most ``block_size * T`` scores
  per (batch, head) exist at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["ttt_attention", "ttt_attention_chunked"]

aten = torch.ops.aten

_HALF_TYPES = (torch.float16, torch.bfloat16)
_CPU_FUSED_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of softmax statistics (lse, merge weights): float64 stays, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Causal-block kernels. Every kernel has the same two entry points:
#
#   forward(q, k0, v0, scale, segment_ids)
#       -> out [B, Hq, T, D] (q.dtype), lse [B, Hq, T] (compute dtype), aux tensors, aux ints
#   backward(dO, q, k0, v0, out, lse, scale, segment_ids, aux tensors, aux ints)
#       -> dq [B, Hq, T, D], dk0 [B, Hkv, T, D], dv0 [B, Hkv, T, D]
#
# `out`/`lse` passed to backward may be those of a larger key set (the merged TTT attention);
# the kernel must then return the gradients of that larger attention restricted to its own
# keys. Fused flash-style kernels do this by construction: they recompute
# P = exp(S - lse) and use D = rowsum(dO * out).
# ---------------------------------------------------------------------------------------------

_Aux = tuple[Tensor | None, ...]
_Fwd = Callable[
    [Tensor, Tensor, Tensor, float, Tensor | None], tuple[Tensor, Tensor, _Aux, tuple[int, ...]]
]
_Bwd = Callable[..., tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class _Kernel:
    name: str
    forward: _Fwd
    backward: _Bwd


def _segment_bias(segment_ids: Tensor, dtype: torch.dtype, align: int = 1) -> Tensor:
    """Additive mask [B, 1, T, T]: 0 where query and key share a segment, -inf elsewhere.

    Causality is left to the kernels' ``is_causal`` (they skip whole key blocks above the
    diagonal), so this only encodes segments. One mask per batch row, broadcast over heads.
    ``align`` pads the key axis of the storage (the CUDA efficient kernel wants the bias row
    stride to be a multiple of 16) and returns a view of the first T columns.
    """
    batch, seq = segment_ids.shape
    padded = -(-seq // align) * align
    bias = torch.full(
        (batch, 1, seq, padded), float("-inf"), dtype=dtype, device=segment_ids.device
    )
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, T, T]
    bias = bias[..., :seq]
    bias.masked_fill_(same, 0.0)
    return bias


# --- CPU: flash attention for CPU -------------------------------------------------------------


def _cpu_flash_forward(
    q: Tensor, k0: Tensor, v0: Tensor, scale: float, segment_ids: Tensor | None
) -> tuple[Tensor, Tensor, _Aux, tuple[int, ...]]:
    mask = None if segment_ids is None else _segment_bias(segment_ids, q.dtype)
    # GQA: the CPU kernel maps query head h to kv head h // (Hq // Hkv) itself.
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
        q, k0, v0, 0.0, True, attn_mask=mask, scale=scale
    )
    # The kernel's lse is a transposed view of [B, T, H]; make it plain [B, H, T].
    return out, lse.contiguous(), (), ()


def _cpu_flash_backward(
    grad_out: Tensor,
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    segment_ids: Tensor | None,
    aux: _Aux,
    aux_ints: tuple[int, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    # The [B, 1, T, T] mask is rebuilt rather than saved: it is cheap to recompute and would
    # otherwise stay alive for every unroll step until backward.
    mask = None if segment_ids is None else _segment_bias(segment_ids, q.dtype)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k0, v0, out, lse, 0.0, True, attn_mask=mask, scale=scale
    )
    return dq, dk, dv


# --- CUDA: flash and memory-efficient attention ----------------------------------------------
# Not exercised by the CPU test-suite (see tests marked `gpu`); argument plumbing follows the
# op schemas of torch 2.13 and is checked against their meta kernels in the tests.


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * groups, T, D], kv head h serving query heads h*g..h*g+g-1.

    The CUDA entry points are given equal head counts: the efficient kernel has no GQA, and
    materialising the kv heads is cheap next to the attention itself.
    """
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _sum_kv(grad: Tensor, groups: int) -> Tensor:
    """Adjoint of ``_repeat_kv``: [B, Hkv * groups, T, D] -> [B, Hkv, T, D]."""
    if groups == 1:
        return grad
    return grad.unflatten(1, (-1, groups)).sum(2)


def _cuda_operands(q: Tensor, k0: Tensor, v0: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Contiguous q and head-expanded k, v (the CUDA kernels want a unit last-dim stride and
    aligned head strides; `.contiguous()` is free when that already holds)."""
    groups = q.shape[1] // k0.shape[1]
    k, v = _repeat_kv(k0, groups).contiguous(), _repeat_kv(v0, groups).contiguous()
    return q.contiguous(), k, v, groups


def _cuda_flash_forward(
    q: Tensor, k0: Tensor, v0: Tensor, scale: float, segment_ids: Tensor | None
) -> tuple[Tensor, Tensor, _Aux, tuple[int, ...]]:
    assert segment_ids is None, "flash attention has no mask; packed rows use efficient"
    q, k, v, _ = _cuda_operands(q, k0, v0)
    out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, _ = (
        aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    )
    # lse: [B, Hq, T] float32. cum_q/cum_k are undefined (None) for dense inputs.
    return out, lse, (cum_q, cum_k, rng_state, unused), (int(max_q), int(max_k))


def _cuda_flash_backward(
    grad_out: Tensor,
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    segment_ids: Tensor | None,
    aux: _Aux,
    aux_ints: tuple[int, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, groups = _cuda_operands(q, k0, v0)
    cum_q, cum_k, rng_state, unused = aux
    max_q, max_k = aux_ints
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse.contiguous(),
        cum_q,
        cum_k,
        max_q,
        max_k,
        0.0,
        True,
        rng_state,
        unused,
        scale=scale,
    )
    return dq, _sum_kv(dk, groups), _sum_kv(dv, groups)


def _efficient_bias(segment_ids: Tensor | None, q: Tensor) -> Tensor | None:
    if segment_ids is None:
        return None
    b, h, t, _ = q.shape
    # Row stride padded to 16 elements (kernel alignment), expanded over heads without a copy.
    return _segment_bias(segment_ids, q.dtype, align=16).expand(b, h, t, t)


def _cuda_efficient_forward(
    q: Tensor, k0: Tensor, v0: Tensor, scale: float, segment_ids: Tensor | None
) -> tuple[Tensor, Tensor, _Aux, tuple[int, ...]]:
    q, k, v, _ = _cuda_operands(q, k0, v0)
    bias = _efficient_bias(segment_ids, q)
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, True, scale=scale
    )
    # The kernel pads lse's query axis (to a multiple of 32 on CUDA); its backward reads the
    # padded layout, so remember the padded length and hand back only the T real entries.
    t = q.shape[2]
    return out, lse[..., :t], (seed, offset), (lse.shape[-1],)


def _cuda_efficient_backward(
    grad_out: Tensor,
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    segment_ids: Tensor | None,
    aux: _Aux,
    aux_ints: tuple[int, ...],
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, groups = _cuda_operands(q, k0, v0)
    bias = _efficient_bias(segment_ids, q)
    seed, offset = aux
    (lse_len,) = aux_ints
    lse_padded = lse.new_zeros(*lse.shape[:-1], lse_len)
    lse_padded[..., : lse.shape[-1]] = lse
    # The kernel reads `out` assuming a [B, T, H, D]-contiguous layout (only its batch and
    # head strides are passed), which is how its forward allocates it; our merged output is
    # [B, H, T, D]-contiguous, so re-lay it out.
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        bias,
        out,
        lse_padded,
        seed,
        offset,
        0.0,
        [True, True, True, False],
        True,
        scale=scale,
    )
    return dq, _sum_kv(dk, groups), _sum_kv(dv, groups)


# --- Pure PyTorch, blocked over queries -------------------------------------------------------


def _block_allowed(segment_ids: Tensor | None, i0: int, i1: int, device: torch.device) -> Tensor:
    """Bool [B or 1, 1, 1, i1 - i0, i1]: query i0..i1-1 may see key 0..i1-1 (causal, segment)."""
    rows = torch.arange(i0, i1, device=device)[:, None]
    cols = torch.arange(i1, device=device)[None, :]
    allowed = (cols <= rows)[None]  # [1, bq, i1]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, i0:i1, None] == segment_ids[:, None, :i1])
    return allowed[:, None, None]


def _chunked_forward(
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    scale: float,
    segment_ids: Tensor | None,
    *,
    block_size: int,
) -> tuple[Tensor, Tensor, _Aux, tuple[int, ...]]:
    b, hq, t, _ = q.shape
    hkv = k0.shape[1]
    groups = hq // hkv
    cdt = _compute_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, t, dtype=cdt, device=q.device)
    out_g = out.unflatten(1, (hkv, groups))  # views [B, Hkv, G, T, *]
    lse_g = lse.unflatten(1, (hkv, groups))
    for i0 in range(0, t, block_size):
        i1 = min(i0 + block_size, t)
        bq = i1 - i0
        # Causality: keys beyond i1 are never visible to this block, so they are not scored.
        qb = q[:, :, i0:i1].unflatten(1, (hkv, groups)).to(cdt)  # [B, Hkv, G, bq, D]
        kb = k0[:, :, :i1].to(cdt)  # [B, Hkv, i1, D]
        vb = v0[:, :, :i1].to(cdt)
        scores = (qb.flatten(2, 3) @ kb.transpose(-1, -2)) * scale  # [B, Hkv, G*bq, i1]
        scores = scores.unflatten(2, (groups, bq))  # [B, Hkv, G, bq, i1]
        scores = scores.masked_fill(~_block_allowed(segment_ids, i0, i1, q.device), -math.inf)
        blk_lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, bq]
        probs = torch.exp(scores - blk_lse[..., None])
        blk_out = probs.flatten(2, 3) @ vb  # [B, Hkv, G*bq, D]
        out_g[:, :, :, i0:i1] = blk_out.unflatten(2, (groups, bq)).to(q.dtype)
        lse_g[:, :, :, i0:i1] = blk_lse
    return out, lse, (), ()


def _chunked_backward(
    grad_out: Tensor,
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    segment_ids: Tensor | None,
    aux: _Aux,
    aux_ints: tuple[int, ...],
    *,
    block_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    # Flash-style backward with the given (possibly merged) out/lse:
    #   P = exp(S - lse), dP = dO v^T, dS = P * (dP - rowsum(dO * out)),
    #   dq = scale dS k, dk = scale dS^T q, dv = P^T dO (summed over a kv head's query heads).
    b, hq, t, d = q.shape
    hkv = k0.shape[1]
    groups = hq // hkv
    cdt = _compute_dtype(q.dtype)
    dq = torch.empty(b, hq, t, d, dtype=cdt, device=q.device)
    dk = torch.zeros(b, hkv, t, d, dtype=cdt, device=q.device)
    dv = torch.zeros(b, hkv, t, d, dtype=cdt, device=q.device)
    dq_g = dq.unflatten(1, (hkv, groups))
    for i0 in range(0, t, block_size):
        i1 = min(i0 + block_size, t)
        bq = i1 - i0
        qb = q[:, :, i0:i1].unflatten(1, (hkv, groups)).to(cdt).flatten(2, 3)  # [B,Hkv,G*bq,D]
        dob = grad_out[:, :, i0:i1].unflatten(1, (hkv, groups)).to(cdt).flatten(2, 3)
        ob = out[:, :, i0:i1].unflatten(1, (hkv, groups)).to(cdt).flatten(2, 3)
        lb = lse[:, :, i0:i1].unflatten(1, (hkv, groups)).flatten(2, 3)  # [B, Hkv, G*bq]
        kb = k0[:, :, :i1].to(cdt)  # [B, Hkv, i1, D]
        vb = v0[:, :, :i1].to(cdt)
        scores = (qb @ kb.transpose(-1, -2)) * scale  # [B, Hkv, G*bq, i1]
        allowed = _block_allowed(segment_ids, i0, i1, q.device)  # [., 1, 1, bq, i1]
        scores = scores.unflatten(2, (groups, bq)).masked_fill(~allowed, -math.inf)
        probs = torch.exp(scores.flatten(2, 3) - lb[..., None])  # [B, Hkv, G*bq, i1]
        delta = (dob * ob).sum(-1, keepdim=True)  # [B, Hkv, G*bq, 1]
        dscores = probs * (dob @ vb.transpose(-1, -2) - delta)
        dq_g[:, :, :, i0:i1] = (scale * (dscores @ kb)).unflatten(2, (groups, bq))
        # Flattening (G, bq) into one axis makes the matmul also sum over the query heads.
        dk[:, :, :i1] += scale * (dscores.transpose(-1, -2) @ qb)
        dv[:, :, :i1] += probs.transpose(-1, -2) @ dob
    return dq.to(q.dtype), dk.to(k0.dtype), dv.to(v0.dtype)


_CPU_FLASH = _Kernel("cpu_flash", _cpu_flash_forward, _cpu_flash_backward)
_CUDA_FLASH = _Kernel("cuda_flash", _cuda_flash_forward, _cuda_flash_backward)
_CUDA_EFFICIENT = _Kernel("cuda_efficient", _cuda_efficient_forward, _cuda_efficient_backward)


def _chunked_kernel(block_size: int) -> _Kernel:
    return _Kernel(
        "chunked",
        partial(_chunked_forward, block_size=block_size),
        partial(_chunked_backward, block_size=block_size),
    )


def _pick_kernel(q: Tensor, segment_ids: Tensor | None) -> _Kernel:
    if q.device.type == "cpu" and q.dtype in _CPU_FUSED_TYPES:
        return _CPU_FLASH
    if q.device.type == "cuda":
        # Ask torch's own dispatcher checks (arch, dtype, head dim, alignment, user toggles
        # such as torch.backends.cuda.enable_flash_sdp) on the equal-head tensors we will pass.
        if segment_ids is None and q.dtype in _HALF_TYPES:
            params = torch.backends.cuda.SDPAParams(q, q, q, None, 0.0, True, False)
            if torch.backends.cuda.can_use_flash_attention(params):
                return _CUDA_FLASH
        # The efficient kernel takes any additive bias; leaving it out of the check avoids
        # building a T x T tensor just to ask.
        params = torch.backends.cuda.SDPAParams(q, q, q, None, 0.0, True, False)
        if torch.backends.cuda.can_use_efficient_attention(params):
            return _CUDA_EFFICIENT
    return _chunked_kernel(128)


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
        kernel: _Kernel,
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
    kernel: _Kernel | None,
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
    kernel = _pick_kernel(q, segment_ids) if kernel is None else kernel
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
    return _run(_chunked_kernel(block_size), q, k0, v0, k_diag, v_diag, scale, segment_ids)
