"""Offline mode on SmolLM2-135M: capture speed and disk bytes per token for each storage
dtype, then training throughput from those captures against online training.

The data is the packaged smoke conversations, repeated ``--repeat`` times (under new ids) so
the runs are long enough to time. On a machine shared with other work, wall-clock rates
swing with the load: each capture runs ``--runs`` times and the fastest counts, and training
shows the median and the best of the per-step tokens/s the trainer logs, leaving out the
first ``--skip`` steps (warm-up).

    python benchmarks/offline.py [--repeat 4] [--runs 2] [--steps 12] [--tokens-per-batch 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from draftforge.config import load_config
from draftforge.offline import capture
from draftforge.target import load_target
from draftforge.train import train

ASSET = Path(__file__).parents[1] / "draftforge" / "assets" / "smoke_conversations.jsonl"
DTYPES = ["float32", "bfloat16", "float16"]


def write_data(path: Path, repeat: int) -> None:
    rows = [json.loads(line) for line in ASSET.read_text().splitlines() if line.strip()]
    with path.open("w") as f:
        for r in range(repeat):
            for row in rows:
                f.write(json.dumps({**row, "id": f"{row['id']}-{r}"}) + "\n")


def step_rates(run: Path, skip: int) -> tuple[float, float]:
    """Median and best per-step training tokens/s."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r["split"] == "train"][skip:]
    return statistics.median(rates), max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2, help="captures per dtype; the best counts")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--tokens-per-batch", type=int, default=512)
    parser.add_argument("--draft-vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    target = load_target(load_config(None, ["target.path=smollm2"]).target)  # SmolLM2-135M
    with tempfile.TemporaryDirectory(prefix="draftforge-offline-") as tmp:
        root = Path(tmp)
        write_data(root / "data.jsonl", args.repeat)
        base = [
            f"data.path={root / 'data.jsonl'}",
            f"data.max_length={args.tokens_per_batch}",
            "data.eval_fraction=0",
            f"training.tokens_per_batch={args.tokens_per_batch}",
            f"draft.draft_vocab_size={args.draft_vocab}",
            f"training.max_steps={args.steps}",
            "training.log_every=1",
            "training.save_every=0",
            f"target.cache_dir={root / 'cache'}",
        ]

        def config(*extra: str):
            return load_config(None, [*base, *extra])

        captures: dict[str, tuple[dict, float]] = {}
        for run in range(args.runs):
            for dtype in DTYPES:  # interleaved, so a burst of load hits every dtype alike
                where = root / f"{dtype}_{run}"
                cfg = config(f"data.storage_dtype={dtype}", f"data.features_dir={where}")
                start = time.perf_counter()
                result = capture(cfg, target, progress=False)
                seconds = time.perf_counter() - start
                if dtype not in captures or seconds < captures[dtype][1]:
                    captures[dtype] = (result.manifest, seconds)

        rates = {}
        train(config(f"output.dir={root / 'online'}"), target)
        rates["online"] = step_rates(root / "online", args.skip)
        for dtype in DTYPES:
            out = root / f"offline_{dtype}"
            extra = [f"data.storage_dtype={dtype}", f"data.features_dir={root / f'{dtype}_0'}"]
            train(config(*extra, "data.mode=offline", f"output.dir={out}"), target)
            rates[f"offline {dtype}"] = step_rates(out, args.skip)

    manifest = captures["float32"][0]
    print(
        f"\nSmolLM2-135M (hidden {target.hidden_size}), {manifest['samples']} samples, "
        f"{manifest['tokens']:,} tokens, {torch.get_num_threads()} threads, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}\n"
    )
    header = f"{'capture dtype':<16} {'tokens/s':>10} {'bytes/token':>12} {'on disk':>10}"
    print(f"capture: best of {args.runs} runs")
    print(header)
    print("-" * len(header))
    for dtype, (m, seconds) in captures.items():
        per_token = m["bytes"] / m["tokens"]
        print(
            f"{dtype:<16} {m['tokens'] / seconds:>10,.0f} {per_token:>12,.0f} "
            f"{m['bytes'] / 1e6:>8.1f} MB"
        )
    print(
        f"\ntraining: draft vocab {args.draft_vocab}, {args.tokens_per_batch} tokens per step, "
        f"steps {args.skip + 1}..{args.steps}"
    )
    header = f"{'features':<16} {'median tok/s':>13} {'best tok/s':>11} {'best vs online':>15}"
    print(header)
    print("-" * len(header))
    for name, (median, best) in rates.items():
        print(f"{name:<16} {median:>13,.0f} {best:>11,.0f} {best / rates['online'][1]:>14.2f}x")


if __name__ == "__main__":
    main()
