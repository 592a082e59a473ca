"""ttt_attention against a dense-mask reference: outputs, all gradients, saved-tensor sizes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor

from draftforge import ttt_attention as tta
from draftforge import ttt_kernels
from draftforge.ttt_attention import ttt_attention, ttt_attention_chunked

B, T, D = 2, 37, 16  # T not a multiple of the chunked block sizes below


def reference_ttt_attention(
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    k_diag: list[Tensor],
    v_diag: list[Tensor],
    segment_ids: Tensor | None,
) -> Tensor:
    """Plain softmax attention over the expanded [T, (k+1)*T] key sequence, dense bool mask."""
    b, hq, t, d = q.shape
    groups = hq // k0.shape[1]
    keys = torch.cat([k0, *k_diag], dim=2).repeat_interleave(groups, dim=1)  # [B,Hq,(k+1)T,D]
    values = torch.cat([v0, *v_diag], dim=2).repeat_interleave(groups, dim=1)
    idx = torch.arange(t)
    causal = (idx[None, :] <= idx[:, None]).expand(b, t, t)
    if segment_ids is not None:
        causal = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
    eye = torch.eye(t, dtype=torch.bool).expand(b, t, t)
    mask = torch.cat([causal, *([eye] * len(k_diag))], dim=2)  # [B, T, (k+1)T]
    scores = (q @ keys.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~mask[:, None], -math.inf)
    return torch.softmax(scores, dim=-1) @ values


def packed_segments() -> Tensor:
    """[B, T] ids: row 0 packs 3 samples, row 1 packs 2 samples + right padding (own id)."""
    row0 = [0] * 9 + [1] * 20 + [2] * 8
    row1 = [0] * 15 + [1] * 12 + [2] * 10  # last id = padding
    return torch.tensor([row0, row1])


def make_inputs(
    hq: int, hkv: int, steps: int, dtype: torch.dtype, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(h: int) -> Tensor:
        return torch.randn(B, h, T, D, generator=gen, dtype=torch.float64).to(dtype)

    q, k0, v0 = rnd(hq), rnd(hkv), rnd(hkv)
    k_diag = [rnd(hkv) for _ in range(steps)]
    v_diag = [rnd(hkv) for _ in range(steps)]
    return q, k0, v0, k_diag, v_diag


def outputs_and_grads(fn, inputs, segment_ids, grad_seed: int = 1) -> list[Tensor]:
    q, k0, v0, k_diag, v_diag = (
        [x.detach().clone().requires_grad_() for x in item]
        if isinstance(item, list)
        else item.detach().clone().requires_grad_()
        for item in inputs
    )
    out = fn(q, k0, v0, k_diag, v_diag, segment_ids)
    grad_out = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64
    ).to(out.dtype)
    leaves = [q, k0, v0, *k_diag, *v_diag]
    grads = torch.autograd.grad(out, leaves, grad_out)
    return [out.detach(), *grads]


def fused(q, k0, v0, k_diag, v_diag, segment_ids):
    return ttt_attention(q, k0, v0, k_diag, v_diag, segment_ids=segment_ids)


def chunked(q, k0, v0, k_diag, v_diag, segment_ids):
    return ttt_attention_chunked(q, k0, v0, k_diag, v_diag, segment_ids=segment_ids, block_size=8)


def reference(q, k0, v0, k_diag, v_diag, segment_ids):
    cast = [x.double() for x in (q, k0, v0)]
    return reference_ttt_attention(
        *cast, [k.double() for k in k_diag], [v.double() for v in v_diag], segment_ids
    ).to(q.dtype)


def as_double(inputs):
    return [[x.double() for x in i] if isinstance(i, list) else i.double() for i in inputs]


def assert_all_close(got: list[Tensor], want: list[Tensor], atol: float, rtol: float) -> None:
    names = ["out", "dq", "dk0", "dv0"] + [f"diag{i}" for i in range(len(got) - 4)]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w.to(g.dtype), atol=atol, rtol=rtol, msg=name)


HEADS = [pytest.param(4, 2, id="gqa4x2"), pytest.param(2, 2, id="mha2")]
STEPS = [0, 1, 3, 6]
PACKED = [pytest.param(False, id="causal"), pytest.param(True, id="packed")]


@pytest.mark.parametrize("packed", PACKED)
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("fn", [fused, chunked], ids=["fused", "chunked"])
def test_matches_dense_reference_float64(fn, steps: int, hq: int, hkv: int, packed: bool) -> None:
    inputs = make_inputs(hq, hkv, steps, torch.float64)
    segment_ids = packed_segments() if packed else None
    got = outputs_and_grads(fn, inputs, segment_ids)
    want = outputs_and_grads(reference, inputs, segment_ids)
    assert_all_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fn", [fused, chunked], ids=["fused", "chunked"])
def test_matches_dense_reference_float32(fn) -> None:
    # Training dtype: compare against the float64 reference with an fp32-sized tolerance.
    inputs = make_inputs(4, 2, 6, torch.float32)
    segment_ids = packed_segments()
    got = outputs_and_grads(fn, inputs, segment_ids)
    want = outputs_and_grads(reference, as_double(inputs), segment_ids)
    assert_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_reference() -> None:
    inputs = make_inputs(4, 2, 3, torch.bfloat16)
    segment_ids = packed_segments()
    got = outputs_and_grads(fused, inputs, segment_ids)
    want = outputs_and_grads(reference, as_double(inputs), segment_ids)
    assert_all_close(got, want, atol=3e-2, rtol=3e-2)


def test_right_padding_without_segments_is_finite() -> None:
    # Padded tail, plain causal: pad queries attend real tokens + their diagonal, stay finite,
    # and real positions are unaffected by whatever sits in the padding.
    q, k0, v0, k_diag, v_diag = make_inputs(4, 2, 3, torch.float32)
    out = ttt_attention(q, k0, v0, k_diag, v_diag)
    junk = [x.clone() for x in (q, k0, v0, *k_diag, *v_diag)]
    for x in junk:
        x[:, :, 30:] = 1e3
    out_junk = ttt_attention(junk[0], junk[1], junk[2], junk[3:6], junk[6:])
    assert torch.isfinite(out_junk).all()
    torch.testing.assert_close(out_junk[:, :, :30], out[:, :, :30])


def test_custom_scale() -> None:
    inputs = make_inputs(4, 2, 2, torch.float64)
    q, k0, v0, k_diag, v_diag = inputs
    got = ttt_attention(q, k0, v0, k_diag, v_diag, scale=0.5)
    # Scaling q by 0.5 * sqrt(D) under the default scale 1/sqrt(D) is the same attention.
    want = reference_ttt_attention(q * 0.5 * math.sqrt(D), k0, v0, k_diag, v_diag, None)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fn", [fused, chunked], ids=["fused", "chunked"])
def test_saves_nothing_quadratic(fn) -> None:
    b, hq, hkv, t, d, steps = 1, 4, 2, 256, 16, 3
    q = torch.randn(b, hq, t, d, requires_grad=True)
    k0, v0 = (torch.randn(b, hkv, t, d, requires_grad=True) for _ in range(2))
    k_diag = [torch.randn(b, hkv, t, d, requires_grad=True) for _ in range(steps)]
    v_diag = [torch.randn(b, hkv, t, d, requires_grad=True) for _ in range(steps)]
    segment_ids = torch.tensor([[0] * 100 + [1] * 120 + [2] * 36])

    def saved_numels(f) -> list[int]:
        sizes: list[int] = []

        def pack(x: Tensor) -> Tensor:
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = f(q, k0, v0, k_diag, v_diag, segment_ids)
        out.sum().backward()
        return sizes

    limit = b * hq * t * t
    # The hook sees the reference's probability matrix, so the check below is not vacuous.
    assert max(saved_numels(reference)) >= limit
    sizes = saved_numels(fn)
    assert sizes and max(sizes) < limit
    assert max(sizes) <= b * hq * t * d


def test_cuda_kernel_plumbing_on_meta() -> None:
    # The CUDA kernels cannot run here; their meta implementations check op names, argument
    # order, GQA head expansion/reduction and the padded-lse round trip end to end.
    hq, hkv, t = 4, 2, 40  # efficient attention pads lse to 64 here
    for kernel, dtype, seg in [
        (ttt_kernels._CUDA_FLASH, torch.bfloat16, None),
        (ttt_kernels._CUDA_EFFICIENT, torch.float32, None),
        (ttt_kernels._CUDA_EFFICIENT, torch.float16, torch.zeros(1, t, dtype=torch.long)),
    ]:

        def meta(h: int, dtype: torch.dtype = dtype) -> Tensor:
            return torch.empty(1, h, t, 64, device="meta", dtype=dtype, requires_grad=True)

        q, k0, v0 = meta(hq), meta(hkv), meta(hkv)
        k_diag, v_diag = [meta(hkv), meta(hkv)], [meta(hkv), meta(hkv)]
        seg_meta = None if seg is None else seg.to("meta")
        out = tta._TTTAttention.apply(kernel, 0.125, seg_meta, 2, q, k0, v0, *k_diag, *v_diag)
        grads = torch.autograd.grad(out, [q, k0, v0, *k_diag, *v_diag], torch.ones_like(out))
        assert out.shape == q.shape and out.dtype == dtype
        assert [g.shape for g in grads] == [x.shape for x in (q, k0, v0, *k_diag, *v_diag)]


class _AtenWithout:
    """``torch.ops.aten`` as a torch would show it that lacks the ops named ``missing*``."""

    def __init__(self, missing: str) -> None:
        self.missing = missing

    def __getattr__(self, name: str):
        if name.startswith(self.missing):
            raise AttributeError(f"'_OpNamespace' 'aten' object has no attribute '{name}'")
        return getattr(torch.ops.aten, name)


def test_missing_fused_op_falls_back_to_the_chunked_kernel(monkeypatch) -> None:
    # A torch without the CPU flash op: the probe fails once, with one warning naming it, and
    # every call then runs the pure-PyTorch kernel, whose numbers match the reference.
    monkeypatch.setattr(ttt_kernels, "aten", _AtenWithout("_scaled_dot_product_flash_attention"))
    monkeypatch.setattr(ttt_kernels, "_VERDICTS", {})
    inputs = make_inputs(4, 2, 3, torch.float64)
    segment_ids = packed_segments()
    with pytest.warns(RuntimeWarning, match="_scaled_dot_product_flash_attention_for_cpu"):
        assert ttt_kernels.pick_kernel(inputs[0], segment_ids).name == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is kept: no second probe, no second warning
        got = outputs_and_grads(fused, inputs, segment_ids)
    want = outputs_and_grads(reference, inputs, segment_ids)
    assert_all_close(got, want, atol=1e-10, rtol=1e-10)


def test_fused_op_with_other_numbers_is_not_used(monkeypatch) -> None:
    # An op that still runs but means something else (here: it ignores the segment mask).
    class AtenIgnoringMask:
        def __getattr__(self, name: str):
            op = getattr(torch.ops.aten, name)
            if name == "_scaled_dot_product_flash_attention_for_cpu":
                return lambda *args, attn_mask=None, **kwargs: op(*args, **kwargs)
            return op

    monkeypatch.setattr(ttt_kernels, "aten", AtenIgnoringMask())
    monkeypatch.setattr(ttt_kernels, "_VERDICTS", {})
    q = make_inputs(4, 2, 1, torch.float32)[0]
    with pytest.warns(RuntimeWarning, match="output differs"):
        assert ttt_kernels.pick_kernel(q, packed_segments()).name == "chunked"


def test_torch_outside_the_tested_range_uses_the_chunked_kernel(monkeypatch) -> None:
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    monkeypatch.setattr(ttt_kernels, "_VERDICTS", {})
    q = make_inputs(4, 2, 1, torch.float32)[0]
    with pytest.warns(RuntimeWarning, match="torch 2.99.0 is outside"):
        assert ttt_kernels.pick_kernel(q, None).name == "chunked"


def test_fused_kernel_passes_its_probe_on_this_torch(monkeypatch) -> None:
    monkeypatch.setattr(ttt_kernels, "_VERDICTS", {})
    q = make_inputs(4, 2, 1, torch.float32)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ttt_kernels.pick_kernel(q, packed_segments()).name == "cpu_flash"


def test_rejects_bad_shapes() -> None:
    q, k0, v0, k_diag, v_diag = make_inputs(3, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ttt_attention(q, k0, v0, k_diag, v_diag)
    q, k0, v0, k_diag, v_diag = make_inputs(4, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="v_diag"):
        ttt_attention(q, k0, v0, k_diag, [])
    with pytest.raises(ValueError, match="segment_ids"):
        ttt_attention(q, k0, v0, k_diag, v_diag, segment_ids=torch.zeros(B, T + 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "dtype,packed,tol",
    [
        (torch.bfloat16, False, 3e-2),  # flash
        (torch.bfloat16, True, 3e-2),  # efficient with bias
        (torch.float32, True, 1e-4),  # efficient, fp32
        (torch.float64, True, 1e-10),  # chunked fallback on CUDA
    ],
)
def test_cuda_matches_reference(dtype: torch.dtype, packed: bool, tol: float) -> None:
    inputs = make_inputs(4, 2, 3, dtype)
    segment_ids = packed_segments() if packed else None
    want = outputs_and_grads(reference, as_double(inputs), segment_ids)
    cuda_inputs = [[x.cuda() for x in i] if isinstance(i, list) else i.cuda() for i in inputs]
    seg_cuda = None if segment_ids is None else segment_ids.cuda()
    got = outputs_and_grads(fused, cuda_inputs, seg_cuda)
    assert_all_close([g.cpu() for g in got], want, atol=tol, rtol=tol)
