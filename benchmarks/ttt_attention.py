"""TTT attention: fused/merged `ttt_attention` vs the eager cache-concatenation baseline.

SmolLM2-like attention (9 query heads, 3 kv heads, head dim 64), B=1, fp32, K=7 unroll steps:
step k calls the attention with the keys/values of steps 1..k as diagonal, the 7 outputs are
summed and back-propagated. Each (method, T) runs in a fresh subprocess so that the RSS
high-water mark (``resource.getrusage``) is that configuration's own peak. The peak is taken
in a separate child with a fixed glibc mmap threshold, so that freed tensors leave the RSS
instead of lingering in the heap and the peak tracks live tensor memory; timing runs use the
default allocator.

    python benchmarks/ttt_attention.py [--seq 512 1024 2048 4096] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
from torch import Tensor

from draftforge.ttt_attention import ttt_attention

HQ, HKV, HEAD_DIM, BATCH, STEPS = 9, 3, 64, 1, 7
METHODS = ("eager_concat", "ttt_attention", "ttt_attention_packed")


def eager_concat_step(q, k0, v0, k_diag, v_diag, causal_bias: Tensor) -> Tensor:
    """What existing trainers do: one [B, H, T, T+k] score matrix kept alive for backward."""
    groups = q.shape[1] // k0.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    k0r, v0r = k0.repeat_interleave(groups, 1), v0.repeat_interleave(groups, 1)
    scores = q @ k0r.transpose(-1, -2) * scale + causal_bias  # [B, H, T, T]
    diag = [(q * k.repeat_interleave(groups, 1)).sum(-1, keepdim=True) * scale for k in k_diag]
    probs = torch.softmax(torch.cat([scores, *diag], dim=-1).float(), dim=-1)  # [B,H,T,T+k]
    t = q.shape[2]
    out = probs[..., :t] @ v0r
    for j, v in enumerate(v_diag):
        out = out + probs[..., t + j : t + j + 1] * v.repeat_interleave(groups, 1)
    return out


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(method: str, seq: int, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)

    def leaf(heads: int, t: int) -> Tensor:
        x = torch.randn(BATCH, heads, t, HEAD_DIM, generator=gen)
        return x.requires_grad_()

    def unroll(t: int) -> None:
        qs = [leaf(HQ, t) for _ in range(STEPS)]
        k0, v0 = leaf(HKV, t), leaf(HKV, t)
        ks = [leaf(HKV, t) for _ in range(STEPS - 1)]
        vs = [leaf(HKV, t) for _ in range(STEPS - 1)]
        # Packed: 4 samples of uneven length in the row.
        bounds = torch.tensor([0, t // 8, t // 2, (3 * t) // 4])
        segment_ids = (torch.arange(t)[None, :, None] >= bounds).sum(-1) - 1  # [1, T]
        causal_bias = torch.full((t, t), -math.inf).triu(1)[None, None]  # shared by all steps
        total = None
        for k in range(STEPS):
            if method == "eager_concat":
                out = eager_concat_step(qs[k], k0, v0, ks[:k], vs[:k], causal_bias)
            else:
                seg = segment_ids if method == "ttt_attention_packed" else None
                out = ttt_attention(qs[k], k0, v0, ks[:k], vs[:k], segment_ids=seg)
            total = out if total is None else total + out
        assert total is not None
        total.sum().backward()

    unroll(128)  # warm-up: kernels, thread pool, allocator
    base = current_rss_bytes()
    seconds = math.inf
    for _ in range(repeats):  # best of `repeats`: the machine is shared
        start = time.perf_counter()
        unroll(seq)
        seconds = min(seconds, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": seconds, "peak_mib": max(peak - base, 0) / 2**20}


def child(
    method: str, seq: int, repeats: int, threads: int, env: dict[str, str]
) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", method, str(seq), "--repeats", str(repeats)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs, best is shown")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads"
    )
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.repeats)))
        return

    print(
        f"TTT attention, Hq={HQ} Hkv={HKV} D={HEAD_DIM} B={BATCH} fp32, K={STEPS} steps "
        f"fwd+bwd, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    header = f"{'T':>5}  {'method':<22}{'fwd+bwd s':>10}{'tokens/s':>10}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    for seq in args.seq:
        for method in args.methods:
            try:
                # Time with the default allocator (a low mmap threshold costs page faults);
                # measure the peak in a second child where freed memory leaves the RSS.
                seconds = child(method, seq, args.repeats, args.threads, {})["seconds"]
                peak = child(
                    method, seq, 1, args.threads, {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
                )
            except RuntimeError as err:
                print(f"{seq:>5}  {method:<22}failed: {err}")
                continue
            tok_s = BATCH * seq / seconds
            print(f"{seq:>5}  {method:<22}{seconds:>10.3f}{tok_s:>10.0f}{peak['peak_mib']:>10.0f}")


if __name__ == "__main__":
    main()
