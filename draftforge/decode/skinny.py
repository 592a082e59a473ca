"""Kernels for the few rows of batch-1 decoding on CPU (``skinny.c``), built on first use: a
matmul and attention over a KV cache.

Why: decoding a small model on a CPU is bound by reading its weights, so a verify forward of
n <= 8 tokens should cost about one plain step. Neither of torch's CPU matmuls gets there at a
few rows: MKL's sgemm repacks the weight on every call, and oneDNN with a prepacked weight
(:mod:`draftforge.decode.fastlinear`) runs 2 to 8 rows at 1.5 to 2 times the cost of one row
(``benchmarks/decode.py --matmul`` prints both). The kernel reads each weight row from memory
once and takes its dot products with all the rows while it sits in L1, with enough independent
multiply-adds in flight to keep up with memory even at one row, so its cost grows slowly with
the row count up to ``MAX_ROWS``; each output is summed in the same order for any row count.
Where the CPU converts half floats (x86's F16C), the kernel also takes float16 weights and
widens them as it reads them: half the bytes to stream, for weights whose rounding to float16
does not matter (the draft's: verification keeps decoding exact whatever it proposes).

Attention: torch's CPU flash kernel costs far more than its arithmetic at a few query rows, and
more again once a verify's mask comes with them. SmolLM2's shapes at 300 cached keys on 2 cores:
SDPA took 27, 50 and 65 us a layer for 1, 2 and 3 rows, the kernel 18, 26 and 36
(``benchmarks/decode.py --attention`` prints the step costs with each). The kernel's attention
visits only the keys a row sees, in cache order, so a row's output is bitwise the same whatever
rows and masks share the call; it takes queries in the layout the projection leaves them and
writes the layout the output projection reads.

Building: the C source is compiled once per machine with the system's C compiler (``$CC``, else
``cc``) and OpenMP into ``<cache>/kernels`` (the name hashes the source, the compiler's version
and the CPU's flags, so a changed machine builds its own). It then runs on torch's own OpenMP
threads: torch's Linux wheels ship GNU OpenMP under the soname the compiler links, and the
loader reuses that copy. The kernel is used only after checks, once per process: the build
succeeded, no second OpenMP runtime got loaded (two would fight over the cores), and a probe
matches ``F.linear``. Otherwise decoding keeps the prepacked oneDNN matmuls, with a one-time
warning saying why. ``DRAFTFORGE_SKINNY=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from draftforge.config import cache_root

SOURCE = Path(__file__).with_name("skinny.c")
MAX_ROWS = 8  # rows the kernel serves; above that, F.linear (sgemm) computes faster
MAX_HEAD_DIM = 256  # as in skinny.c
# No implicit contraction of a * b + c into one fused multiply-add: the compiler would choose
# per code path, and a token's sums must not depend on the row count (skinny.c calls the FMA
# explicitly where the CPU has one).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
_OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")
_LIBRARY: list[ctypes.CDLL | None] = []  # filled once by `usable`


def usable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernel may serve weights of this dtype (float32, or float16 where the CPU
    converts half floats) on this device; built on first ask."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.float16):
        return False
    if os.environ.get("DRAFTFORGE_SKINNY", "1") == "0":
        return False
    if not _LIBRARY:
        _LIBRARY.append(_load())
    library = _LIBRARY[0]
    return library is not None and (dtype == torch.float32 or _half_kernel(library) is not None)


def attention_usable(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether the kernel's attention serves float32 heads of ``head_dim`` on this device
    (a multiple of 8 up to ``MAX_HEAD_DIM``); built on first ask."""
    return head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM and usable(dtype, device)


def sdpa_mask(prefix: int, own: Tensor | None, rows: int, device: torch.device) -> Tensor:
    """SDPA's boolean mask [rows, prefix + columns of own] for what :func:`attend` reads from
    ``prefix`` and ``own`` (None: causal among the rows), on ``device``."""
    if own is None:
        own = torch.ones(rows, rows, dtype=torch.bool, device=device).tril()
    own = own.to(device=device, dtype=torch.bool)
    return torch.cat([own.new_ones(rows, prefix), own], dim=1)


def attend(
    q: Tensor, k: Tensor, v: Tensor, prefix: int, own: Tensor | None, scale: float
) -> Tensor:
    """Attention of rows ``q`` [T, Hq, D] over keys and values [Hkv, >= L, D] (their first L
    entries: ``prefix`` keys every row sees, then L - prefix that ``own`` [T, L - prefix] (bool
    or uint8) says which row sees; None: row t sees the first t + 1 of them); [T, Hq * D]. Query
    head h reads key head h // (Hq // Hkv). Callers check :func:`attention_usable`."""
    library = _LIBRARY[0] if _LIBRARY else None
    assert library is not None, "skinny.attend before skinny.usable said yes"
    return _attend(library, q, k, v, prefix, own, scale)


def _attend(
    library: ctypes.CDLL,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix: int,
    own: Tensor | None,
    scale: float,
) -> Tensor:
    rows, heads, dim = q.shape
    keys = prefix + (rows if own is None else own.shape[1])
    assert q.stride(2) == 1 and q.stride(1) == dim, "queries' heads must be contiguous rows"
    assert k.stride()[1:] == (dim, 1) and k.stride() == v.stride(), "keys' layout"
    assert k.shape[1] >= keys and q.dtype == k.dtype == v.dtype == torch.float32
    mask = None if own is None else own.to(torch.uint8).contiguous()
    out = q.new_empty(rows, heads * dim)
    failed = library.skinny_attend(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        None if mask is None else mask.data_ptr(),
        out.data_ptr(),
        rows,
        heads,
        k.shape[0],
        dim,
        keys,
        prefix,
        q.stride(0),
        k.stride(0),
        scale,
    )
    if failed:
        raise MemoryError(f"the attention kernel found no memory for {keys} keys' scores")
    return out


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight.float(), bias)`` by the kernel; ``weight`` [out, in] and ``bias``
    contiguous on CPU, ``x`` and ``bias`` float32 (callers check :func:`usable` for the
    weight's dtype)."""
    library = _LIBRARY[0] if _LIBRARY else None
    assert library is not None, "skinny.linear before skinny.usable said yes"
    return _run(library, x, weight, bias)


def _run(library: ctypes.CDLL, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = flat.new_empty(flat.shape[0], weight.shape[0])
    kernel = library.skinny_linear if weight.dtype == torch.float32 else _half_kernel(library)
    assert kernel is not None, f"no skinny kernel for {weight.dtype} weights"
    kernel(
        flat.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        *flat.shape,
        weight.shape[0],
    )
    return out.view(*x.shape[:-1], weight.shape[0])


def _half_kernel(library: ctypes.CDLL) -> Any:
    """The float16-weight kernel, or None where the CPU has no half-float conversion."""
    return getattr(library, "skinny_linear_half", None)


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def library_path(compiler: str) -> Path:
    """Where this machine's build of the kernel lives: keyed by source, flags, compiler and
    CPU."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    key = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(FLAGS).encode(),
        version.encode(),
        _cpu_flags().encode(),
    ):
        key.update(hashlib.sha256(part).digest())
    return cache_root() / "kernels" / f"skinny-{platform.machine()}-{key.hexdigest()[:16]}.so"


def build(compiler: str, target: Path) -> None:
    """Compile the kernel into ``target``, atomically (ranks may build at the same time)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *FLAGS]
        done = subprocess.run(
            [*command, str(SOURCE), "-o", str(built)], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime files mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    files = {line.split()[-1] for line in maps if "/" in line}
    return {f for f in files if Path(f).name.startswith(_OPENMP_RUNTIMES)}


def _load() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found ($CC, else cc)")
        path = library_path(compiler)
        if not path.exists():
            build(compiler, path)
        before = _openmp_runtimes()
        library = ctypes.CDLL(str(path))
        extra = _openmp_runtimes() - before
        if before and extra:
            raise RuntimeError(f"it loaded a second OpenMP runtime ({', '.join(sorted(extra))})")
        for kernel in (library.skinny_linear, _half_kernel(library)):
            if kernel is not None:
                kernel.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
                kernel.restype = None
        library.skinny_attend.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 8
        library.skinny_attend.argtypes += [ctypes.c_float]
        library.skinny_attend.restype = ctypes.c_int
        problem = _probe(library)
        if problem:
            raise RuntimeError(problem)
        return library
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"draftforge: decoding does not use its few-row matmul kernel ({err}). It uses "
            "prepacked oneDNN matmuls instead: same results, verify forwards slower.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _probe(library: ctypes.CDLL) -> str | None:
    """Why the kernels disagree with torch on small cases, or None. Matmul against F.linear:
    row counts below, at and above one pass, an input width that is no multiple of 8, with and
    without bias, float32 weights and (where built) float16 ones. Attention against SDPA:
    grouped heads, a head size of two vector blocks and one, causal rows and a tree mask."""
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32] + ([torch.float16] if _half_kernel(library) else [])
    for rows, width, bias in ((1, 40, False), (8, 37, True), (11, 19, True)):
        weight = torch.randn(29, width, generator=gen)
        b = torch.randn(29, generator=gen) if bias else None
        x = torch.randn(1, rows, width, generator=gen)
        for dtype in dtypes:
            stored = weight.to(dtype)
            got, want = _run(library, x, stored, b), F.linear(x, stored.float(), b)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                return f"its output differs from F.linear's on a probe of {rows} rows ({dtype})"
    for rows, dim, tree in ((2, 16, False), (4, 8, True)):
        cache = torch.randn(2, 2, 21, dim, generator=gen)  # [k/v, Hkv, capacity, D]
        q = torch.randn(rows, 6, dim, generator=gen)
        own = torch.ones(rows, rows, dtype=torch.bool).tril()
        if tree:
            own[-1, 1] = False
        got = _attend(library, q, cache[0], cache[1], 9, own if tree else None, 0.3)
        mask = sdpa_mask(9, own, rows, q.device)
        keys = 9 + rows
        want = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            cache[None, 0, :, :keys],
            cache[None, 1, :, :keys],
            attn_mask=mask,
            scale=0.3,
            enable_gqa=True,
        )[0].transpose(0, 1)
        if not torch.allclose(got, want.reshape(rows, -1), rtol=1e-4, atol=1e-5):
            return f"its attention differs from SDPA's on a probe of {rows} rows"
    return None
