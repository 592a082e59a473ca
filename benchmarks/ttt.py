"""TTT training step of a SmolLM2-shaped EAGLE-3 draft: throughput and peak memory.

Compares, for one forward+backward of the K-step unroll at batch 1, fp32:
  (a) draftforge's path: fused attention with log-sum-exp merge of the diagonal terms;
  (b) the cache-concatenation eager baseline existing trainers use: scores against step-0
      keys plus an additive causal mask, diagonal scores concatenated as extra columns, an
      fp32 softmax over the whole [B, H, T, T+k] row, all kept by autograd for backward;
  (c) the naive expanded reference: keys of all steps in one (k+1)*T sequence, dense mask.
Also prints the efficient path's achieved GFLOP/s against a measured fp32 matmul rate.

Each (path, T) runs in a fresh subprocess so its peak RSS is its own.

    python benchmarks/ttt.py [--seqs 512 1024 2048 4096] [--steps 7] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import Tensor

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, DRAFT_VOCAB, VOCAB = 576, 9, 3, 64, 1536, 8192, 49152


def concat_baseline(
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    k_diag: list[Tensor],
    v_diag: list[Tensor],
    *,
    segment_ids: Tensor | None = None,
) -> Tensor:
    g = q.shape[1] // k0.shape[1]
    t = q.shape[2]
    scale = q.shape[-1] ** -0.5
    scores = q @ k0.repeat_interleave(g, 1).transpose(-1, -2) * scale  # [B, H, T, T]
    causal = torch.full((t, t), float("-inf")).triu(1)
    cols = [scores + causal]
    cols += [(q * kj.repeat_interleave(g, 1)).sum(-1, keepdim=True) * scale for kj in k_diag]
    probs = torch.softmax(torch.cat(cols, dim=-1).float(), dim=-1)  # [B, H, T, T + k]
    out = probs[..., :t] @ v0.repeat_interleave(g, 1)
    for j, vj in enumerate(v_diag):
        out = out + probs[..., t + j : t + j + 1] * vj.repeat_interleave(g, 1)
    return out


def naive_expanded(
    q: Tensor,
    k0: Tensor,
    v0: Tensor,
    k_diag: list[Tensor],
    v_diag: list[Tensor],
    *,
    segment_ids: Tensor | None = None,
) -> Tensor:
    g = q.shape[1] // k0.shape[1]
    t = q.shape[2]
    keys = torch.cat([k0, *k_diag], dim=2).repeat_interleave(g, 1)  # [B, H, (k+1)T, D]
    values = torch.cat([v0, *v_diag], dim=2).repeat_interleave(g, 1)
    allowed = torch.zeros(t, (len(k_diag) + 1) * t, dtype=torch.bool)
    allowed[:, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    eye = torch.eye(t, dtype=torch.bool)
    for j in range(1, len(k_diag) + 1):
        allowed[:, j * t : (j + 1) * t] = eye
    scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ values


def step_flops(t: int, steps: int) -> float:
    """Forward+backward FLOPs of the unroll (matmuls; backward counted as twice forward)."""
    qkv = 2 * t * 2 * HIDDEN * (HEADS + 2 * KV_HEADS) * HEAD_DIM
    o = 2 * t * HEADS * HEAD_DIM * HIDDEN
    mlp = 3 * 2 * t * HIDDEN * INTER
    head = 2 * t * HIDDEN * DRAFT_VOCAB
    attn = 2 * 2 * HEADS * HEAD_DIM * t * (t + 1) / 2  # causal QK^T and PV
    fc = 2 * t * 3 * HIDDEN * HIDDEN
    return 3 * (fc + steps * (qkv + o + mlp + head + attn))


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        a @ b
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def run_one(path: str, t: int, steps: int, repeats: int) -> dict[str, float]:
    """In this process: build the draft and inputs, time fwd+bwd, report the peak RSS rise."""
    from transformers import LlamaConfig

    from draftforge import ttt
    from draftforge.models import build_draft
    from draftforge.ttt_attention import ttt_attention

    torch.manual_seed(0)
    target_cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
    )
    draft = build_draft("eagle3", target_cfg, [1, 14, 26], DRAFT_VOCAB)
    aux = torch.randn(1, t, 3 * HIDDEN)
    ids = torch.randint(0, VOCAB, (1, t))
    pos = torch.arange(t)[None]
    mask = torch.ones(1, t, dtype=torch.bool)
    probs = torch.softmax(torch.randn(1, t, DRAFT_VOCAB), dim=-1)
    argmax = draft.draft_ids()[probs.argmax(-1)]
    norms = ttt.step_counts(mask, None, steps).float()
    attention = {"efficient": ttt_attention, "concat": concat_baseline, "naive": naive_expanded}[
        path
    ]

    def once() -> None:
        out = draft(
            aux, ids, pos, mask, probs, argmax, norms, None, steps=steps, attention=attention
        )
        out.loss.backward()
        draft.zero_grad(set_to_none=True)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    once()  # warm-up; also sets the peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    seconds = (time.perf_counter() - start) / repeats
    return {
        "seconds": seconds,
        "tokens_per_s": t / seconds,
        "peak_mib": (peak - before) / 1024,
        "gflops": step_flops(t, steps) / seconds / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--paths", nargs="+", default=["efficient", "concat", "naive"])
    parser.add_argument(
        "--naive-max-t", type=int, default=1024, help="skip the naive path above this T"
    )
    parser.add_argument("--one", nargs=2, metavar=("PATH", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps, args.repeats)))
        return

    print(f"threads {torch.get_num_threads()}, fp32 matmul {matmul_gflops():.1f} GFLOP/s (2048^3)")
    print(
        f"draft: hidden {HIDDEN}, heads {HEADS}/{KV_HEADS}, inter {INTER}, draft vocab {DRAFT_VOCAB}, K={args.steps}, batch 1, fp32"
    )
    header = f"{'T':>6} {'path':>10} {'tok/s':>9} {'s/step':>8} {'peak MiB':>9} {'GFLOP/s':>8}"
    print(header)
    print("-" * len(header))
    for t in args.seqs:
        for path in args.paths:
            if path == "naive" and t > args.naive_max_t:
                print(f"{t:>6} {path:>10} {'skipped: (K*T)^2 mask does not fit':>38}")
                continue
            cmd = [
                sys.executable,
                __file__,
                "--one",
                path,
                str(t),
                "--steps",
                str(args.steps),
                "--repeats",
                str(args.repeats),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{t:>6} {path:>10} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{t:>6} {path:>10} {r['tokens_per_s']:>9.1f} {r['seconds']:>8.2f} {r['peak_mib']:>9.0f} {r['gflops']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
