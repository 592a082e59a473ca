"""Kernels for the causal block of the TTT attention (:mod:`draftforge.ttt_attention`): the
step-0 keys ``j <= i`` of each query's own packed segment. Chosen per call by
:func:`pick_kernel`:

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

The fused kernels call private aten ops, whose names and signatures torch may change in any
release. So a fused kernel is used only on a torch in :data:`TESTED_TORCH` and after a tiny
probe (once per process and device type) has matched it to the pure-PyTorch kernel; otherwise
that kernel takes over, with a one-time warning: slower, never wrong numbers.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

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
class Kernel:
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


_CPU_FLASH = Kernel("cpu_flash", _cpu_flash_forward, _cpu_flash_backward)
_CUDA_FLASH = Kernel("cuda_flash", _cuda_flash_forward, _cuda_flash_backward)
_CUDA_EFFICIENT = Kernel("cuda_efficient", _cuda_efficient_forward, _cuda_efficient_backward)


def chunked_kernel(block_size: int) -> Kernel:
    return Kernel(
        "chunked",
        partial(_chunked_forward, block_size=block_size),
        partial(_chunked_backward, block_size=block_size),
    )


def _fused_kernel(q: Tensor, segment_ids: Tensor | None) -> Kernel | None:
    """The fused kernel for this device, dtype and masking, if there is one."""
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
    return None


def pick_kernel(q: Tensor, segment_ids: Tensor | None) -> Kernel:
    fused = _fused_kernel(q, segment_ids)
    if fused is not None and _trusted(fused, q.device):
        return fused
    return chunked_kernel(128)


# --- The guard on the fused kernels -----------------------------------------------------------

# [first, end) of the torch releases (major, minor) the private ops above were checked on: the
# torch range pyproject.toml declares (tests/test_packaging.py keeps the two equal).
TESTED_TORCH = ((2, 9), (2, 15))

# (kernel name, device type) -> whether the kernel may run there; filled by `_trusted`.
_VERDICTS: dict[tuple[str, str], bool] = {}

# The probe's dtype per fused kernel, and whether it passes packed segments (flash has no mask).
_PROBES = {
    _CPU_FLASH.name: (torch.float32, True),
    _CUDA_FLASH.name: (torch.float16, False),
    _CUDA_EFFICIENT.name: (torch.float32, True),
}


def _trusted(kernel: Kernel, device: torch.device) -> bool:
    key = (kernel.name, device.type)
    if key not in _VERDICTS:
        _VERDICTS[key] = _judge(kernel, device)
    return _VERDICTS[key]


@torch.compiler.disable  # runs eagerly once; a compiled caller then sees the stored verdict
def _judge(kernel: Kernel, device: torch.device) -> bool:
    """Whether ``kernel`` may run on ``device``; when not, says why in a warning (once, as
    ``_trusted`` asks once)."""
    release = re.match(r"(\d+)\.(\d+)", torch.__version__)
    version = (int(release[1]), int(release[2])) if release else (0, 0)
    first, end = TESTED_TORCH
    if not first <= version < end:
        problem = (
            f"torch {torch.__version__} is outside the releases its private aten ops were "
            f"tested on ({first[0]}.{first[1]} up to {end[0]}.{end[1]}, not included)"
        )
    else:
        problem = _probe(kernel, device)
    if problem is None:
        return True
    warnings.warn(
        f"draftforge: TTT attention does not use its fused {kernel.name} kernel: {problem}. "
        "It uses the pure-PyTorch chunked kernel instead: same results, slower.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def _probe(kernel: Kernel, device: torch.device) -> str | None:
    """Why ``kernel`` disagrees with the pure-PyTorch kernel on a tiny case, or None.

    Forward (output, lse) and backward on 4 query heads over 2 kv heads, 8 positions in two
    segments and a non-default scale: a renamed op, a changed signature or a changed meaning
    of an argument (mask, head mapping, lse layout, scale) shows up here.
    """
    dtype, packed = _PROBES[kernel.name]
    gen = torch.Generator().manual_seed(0)

    def rnd(heads: int) -> Tensor:
        return torch.randn(1, heads, 8, 16, generator=gen).to(device, dtype)

    q, k0, v0, grad_out = rnd(4), rnd(2), rnd(2), rnd(4)
    segments = torch.tensor([[0] * 3 + [1] * 5], device=device) if packed else None
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            got = _forward_backward(kernel, q, k0, v0, grad_out, segments)
            want = _forward_backward(chunked_kernel(4), q, k0, v0, grad_out, segments)
    except Exception as err:  # a missing op or a changed signature fails in many ways
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    tol = 2e-2 if dtype in _HALF_TYPES else 5e-3  # loose enough for TF32 matmuls on GPUs
    for name, g, w in zip(("output", "lse", "dq", "dk", "dv"), got, want, strict=True):
        if g.shape != w.shape or not torch.allclose(g.float(), w.float(), rtol=tol, atol=tol):
            return f"its {name} differs from the pure-PyTorch kernel's on a probe"
    return None


def _forward_backward(
    kernel: Kernel, q: Tensor, k0: Tensor, v0: Tensor, grad_out: Tensor, segments: Tensor | None
) -> tuple[Tensor, ...]:
    scale = 0.5
    out, lse, aux, aux_ints = kernel.forward(q, k0, v0, scale, segments)
    grads = kernel.backward(grad_out, q, k0, v0, out, lse, scale, segments, aux, aux_ints)
    return (out, lse, *grads)
