"""Batched target forwards on SmolLM2-135M: online training and capture tokens/s with one
sample per target forward (``target.batch_tokens=1``, as before batching) and with forwards of
up to each ``--batch-tokens`` padded tokens, side by side in one run.

The data is the first ``--samples`` conversations of the demo's built-in set. Wall-clock rates
swing with the load of a shared machine, so the settings run interleaved, ``--runs`` times
each: training reports the median and the best per-step tokens/s the trainer logs (leaving
out the first ``--skip`` steps, warm-up) over all runs, capture the best run. The fp32 matmul
rate at the start and the end says how fast the machine was meanwhile.

    python benchmarks/target_forward.py [--samples 256] [--steps 10] [--runs 2]
        [--tokens-per-batch 2048] [--batch-tokens 1024,8192]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
from pathlib import Path

import torch

from draftforge.config import load_config
from draftforge.demo import DEMO_DATA
from draftforge.machine import matmul_gflops
from draftforge.offline import capture
from draftforge.target import load_target
from draftforge.train import train


def write_data(path: Path, samples: int) -> None:
    with gzip.open(DEMO_DATA, "rt") as src, path.open("w") as out:
        for _, line in zip(range(samples), src, strict=False):
            out.write(line)


def step_rates(run: Path, skip: int) -> list[float]:
    """Per-step training tokens/s after the first ``skip`` steps."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows if r["split"] == "train"][skip:]


def measure(
    args: argparse.Namespace, settings: dict[str, int]
) -> tuple[dict[str, list[float]], dict[str, float], int]:
    """Per-step training tokens/s and the best capture tokens/s of each setting, and the
    captured tokens."""
    target = load_target(load_config(None, ["target.path=smollm2"]).target)  # SmolLM2-135M
    train_rates: dict[str, list[float]] = {name: [] for name in settings}
    capture_rates: dict[str, float] = dict.fromkeys(settings, 0.0)
    tokens = 0
    with tempfile.TemporaryDirectory(prefix="draftforge-target-forward-") as tmp:
        root = Path(tmp)
        write_data(root / "data.jsonl", args.samples)
        base = [
            "target.path=smollm2",
            f"data.path={root / 'data.jsonl'}",
            "data.max_length=512",
            "data.eval_fraction=0",
            f"training.tokens_per_batch={args.tokens_per_batch}",
            f"draft.draft_vocab_size={args.draft_vocab}",
            f"training.max_steps={args.steps}",
            "training.log_every=1",
            "training.save_every=0",
            f"target.cache_dir={root / 'cache'}",
        ]
        for run in range(args.runs):
            for name, budget in settings.items():  # interleaved: load bursts hit both alike
                out = root / f"run_{run}_{budget}"
                cfg = load_config(
                    None, [*base, f"target.batch_tokens={budget}", f"output.dir={out}"]
                )
                train(cfg, target)
                train_rates[name] += step_rates(out, args.skip)
                cfg.data.features_dir = str(root / f"features_{run}_{budget}")
                result = capture(cfg, target, progress=False)
                assert result.manifest is not None
                tokens = result.manifest["tokens"]
                capture_rates[name] = max(capture_rates[name], result.tokens / result.seconds)
    return train_rates, capture_rates, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="interleaved runs of each setting")
    parser.add_argument("--tokens-per-batch", type=int, default=2048)
    parser.add_argument(
        "--batch-tokens",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1024, 8192],
        help="the batched settings, comma-separated",
    )
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"1 (one sample)": 1, **{str(b): b for b in args.batch_tokens}}
    gflops_start = matmul_gflops()
    train_rates, capture_rates, tokens = measure(args, settings)
    gflops_end = matmul_gflops()

    print(
        f"\nSmolLM2-135M fp32, {args.samples} demo conversations ({tokens:,} tokens, max 512 "
        f"each), {torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(
        f"fp32 1024^3 matmul: {gflops_start:.0f} GFLOP/s at the start, {gflops_end:.0f} at the end"
    )
    print(
        f"\nonline training: {args.tokens_per_batch} tokens per step, draft vocab "
        f"{args.draft_vocab}, steps {args.skip + 1}..{args.steps} of {args.runs} runs each"
    )
    header = (
        f"{'target forwards':<28} {'median tok/s':>13} {'best tok/s':>11} {'median vs one':>14}"
    )
    print(header)
    print("-" * len(header))
    one = statistics.median(train_rates["1 (one sample)"])
    for name in settings:
        median = statistics.median(train_rates[name])
        label = f"batch_tokens={name}"
        print(
            f"{label:<28} {median:>13,.0f} {max(train_rates[name]):>11,.0f} {median / one:>13.2f}x"
        )
    print(f"\ncapture: best of {args.runs} runs")
    header = f"{'target forwards':<28} {'tok/s':>13} {'vs one':>11}"
    print(header)
    print("-" * len(header))
    for name in settings:
        rate = capture_rates[name]
        label = f"batch_tokens={name}"
        print(f"{label:<28} {rate:>13,.0f} {rate / capture_rates['1 (one sample)']:>10.2f}x")


if __name__ == "__main__":
    main()
