"""Projections for batch-1 decoding on CPU in float32: the few-row kernel of
:mod:`draftforge.decode.skinny` where it built, else weights prepacked once for oneDNN.

At one to a few rows per matmul, MKL's sgemm (``F.linear``) spends more time packing the weight
than multiplying; oneDNN with a weight packed once (``weight.to_mkldnn()``) skips that work
and runs SmolLM2's 211 matrices at one row in about 60% of the time. The op that takes a
packed weight, ``torch.ops.mkldnn._linear_pointwise``, is private, so it is used only on CPU in
float32 with oneDNN built in, on a torch in the tested range, and after a probe (once per
process) has matched it to ``F.linear``; anywhere else :class:`Projection` runs ``F.linear``
on the model's own weights, with a one-time warning when the probe or the range said no.

oneDNN's cost still grows with the row count (2 to 8 rows cost 1.5 to 2 times one row), which
makes verify forwards dear; the skinny kernel's hardly grows, so it is preferred when usable.

A :class:`Projection` may join several linears that read the same input (q/k/v, gate/up):
on a fast path they run as one matmul over the concatenated weight (the only copy made);
with ``F.linear`` each weight is used as it is and the outputs are concatenated.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftforge.decode import skinny
from draftforge.ttt_kernels import TESTED_TORCH

_VERDICT: list[bool] = []  # filled once by `onednn_usable`


def onednn_usable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether prepacked oneDNN matmuls may serve weights of this dtype on this device."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    if not _VERDICT:
        _VERDICT.append(_judge())
    return _VERDICT[0]


def fast_matmul(dtype: torch.dtype, device: torch.device) -> str | None:
    """The fast CPU matmul for weights of this dtype on this device: ``"skinny"`` (the few-row
    kernel), ``"onednn"`` (prepacked weights) or None (``F.linear`` serves)."""
    if skinny.usable(dtype, device):
        return "skinny"
    return "onednn" if onednn_usable(dtype, device) else None


def _packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.compiler.disable  # runs eagerly once; compiled callers see the stored verdict
def _judge() -> bool:
    release = re.match(r"(\d+)\.(\d+)", torch.__version__)
    version = (int(release[1]), int(release[2])) if release else (0, 0)
    first, end = TESTED_TORCH
    if not first <= version < end:
        problem = (
            f"torch {torch.__version__} is outside the releases its private op was tested on "
            f"({first[0]}.{first[1]} up to {end[0]}.{end[1]}, not included)"
        )
    else:
        problem = _probe()
    if problem is None:
        return True
    warnings.warn(
        f"draftforge: decoding does not prepack weights for oneDNN: {problem}. It uses "
        "F.linear instead: same results, slower at batch 1.",
        RuntimeWarning,
        stacklevel=3,
    )
    return False


def _probe() -> str | None:
    """Why the packed op disagrees with F.linear on small cases, or None."""
    gen = torch.Generator().manual_seed(0)
    try:
        for rows, bias in ((1, False), (5, True)):
            weight = torch.randn(48, 40, generator=gen)
            b = torch.randn(48, generator=gen) if bias else None
            x = torch.randn(1, rows, 40, generator=gen)
            with torch.no_grad():
                got = _packed_linear(x, weight.to_mkldnn(), b)
            want = F.linear(x, weight, b)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                return "its output differs from F.linear's on a probe"
    except Exception as err:  # a missing op or a changed signature fails in many ways
        return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return None


def _joined_bias(weights: list[Tensor], biases: list[Tensor | None]) -> Tensor | None:
    """The biases of joined linears as one vector (zeros for those without), or None."""
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases, strict=True)]
    )


class Projection:
    """``x @ cat(W_i).T + cat(b_i)`` for one or more linears reading the same input.

    fast: use :func:`fast_matmul` for the weights' dtype and device, kept in ``matmul``:
    ``"skinny"`` (the joined weight serves the few-row kernel up to :data:`skinny.MAX_ROWS`
    rows and ``F.linear`` above) or ``"onednn"`` (prepacked). Otherwise, or when neither is
    usable, the linears' own weights serve ``F.linear`` and nothing is copied.

    half: on the skinny path, keep the joined weight in float16 where the kernel reads it
    (``half`` then says so): half the bytes per call, every path computing with the
    float16-rounded weight (``F.linear`` widens it).
    """

    def __init__(self, linears: Sequence[nn.Linear], fast: bool, half: bool = False) -> None:
        weights = [lin.weight.detach() for lin in linears]
        biases = [None if lin.bias is None else lin.bias.detach() for lin in linears]
        self.sizes = [w.shape[0] for w in weights]
        self.matmul = fast_matmul(weights[0].dtype, weights[0].device) if fast else None
        self.weights = weights
        self.biases = biases
        self.half = (
            half and self.matmul == "skinny" and skinny.usable(torch.float16, weights[0].device)
        )
        if self.matmul is not None:
            joined = torch.cat(weights) if len(weights) > 1 else weights[0].contiguous()
            if self.matmul == "onednn":
                joined = joined.to_mkldnn()
            self.weights = [joined.half() if self.half else joined]
            self.biases = [_joined_bias(weights, biases)]

    def __call__(self, x: Tensor) -> Tensor:
        if self.matmul == "skinny" and x.numel() <= skinny.MAX_ROWS * x.shape[-1]:
            return skinny.linear(x, self.weights[0], self.biases[0])
        if self.matmul == "onednn":
            return _packed_linear(x, self.weights[0], self.biases[0])
        weights = [w.float() for w in self.weights] if self.half else self.weights
        outs = [F.linear(x, w, b) for w, b in zip(weights, self.biases, strict=True)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        """The projection's output cut back into one tensor per linear."""
        return self(x).split(self.sizes, dim=-1)
