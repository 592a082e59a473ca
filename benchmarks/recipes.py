"""The demo's training recipe: candidates compared at a fixed training-time budget.

Every candidate trains on the demo's data and capture (the first ``--conversations`` built-in
conversations), for the number of optimizer steps it runs in ``--minutes`` of training time
on this machine. Each is scored by its held-out split's acc_0 at the end, and by greedy
decoding with chains of 1, 2 and 3 steps on held-out prompts the demo's report does not use
(``--prompts FIRST:END``, by default the 13th to the 36th).

The step budget comes from each candidate's seconds per step, measured side by side in this
run (candidates interleaved, so a busy machine slows them alike) and printed with the run's
fp32 matmul rate; VARIANTS change nothing that costs time and take the steps of the ladder
entry they name. The budgeted runs themselves are step-bounded, not time-bounded, so they can
run ``--parallel`` at a time (threads split between them) without changing their result.

    python benchmarks/recipes.py [--minutes 9] [--parallel 2] [--only 1,3,...] [--out DIR]
        [--prompts 12:36]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from draftforge.config import Config
from draftforge.curves import split_records
from draftforge.demo import DEMO_DATA, DemoSettings, heldout_span, training_config, write_subset
from draftforge.machine import matmul_gflops
from draftforge.metrics import read_records

# The demo's recipe (Muon with 4 micro-batches a step) against the one before it (AdamW, one
# micro-batch a step), each change on its own, then changes to the demo's. Muon's Newton-Schulz
# iterations cost a fixed time per optimizer step (about 0.2 s for the demo's draft on 2 cores,
# near a whole 512-token step), hence the larger steps; the AdamW run at 4 micro-batches tells
# what the batch alone does.
ONE_MICRO_BATCH = "training.micro_batches_per_step=1"
LADDER: list[tuple[str, list[str]]] = [
    ("AdamW (the recipe before)", ["training.optimizer=adamw", ONE_MICRO_BATCH]),
    ("Muon", [ONE_MICRO_BATCH]),
    ("Muon, 4 micro-batches (demo)", []),
    ("AdamW, 4 micro-batches", ["training.optimizer=adamw"]),
    ("Muon, 4 mb, MLP 768", ["draft.intermediate_size=768"]),
    ("Muon, 4 mb, lr 1e-3", ["training.lr=1e-3"]),
    ("Muon, 4 mb, no unroll (TTT 1)", ["training.ttt_steps=1"]),
    ("Muon, 4 mb, TTT 3", ["training.ttt_steps=3"]),
]
# Changes that cost nothing per step: each trains the steps of the ladder entry it names.
VARIANTS: list[tuple[str, list[str], int]] = [
    ("Muon + lr 4e-3", ["training.lr=4e-3"], 2),
]
TIMED_STEPS = (3, 13)  # two short runs; their difference is 10 steps without setup
CHAINS = (1, 2, 3)


def candidate_config(
    root: Path, conversations: int, changes: list[str], out: Path, steps: int
) -> Config:
    """The demo's training config with ``changes``, bounded by ``steps`` instead of time."""
    extra = [
        "training.time_limit_minutes=0",
        f"training.max_steps={steps}",
        f"training.eval_every={steps}",  # once, at the end
        "training.save_every=0",
        f"output.dir={out}",
    ]
    settings = DemoSettings(out=root, conversations=conversations, overrides=changes + extra)
    return training_config(settings, root / "data" / f"train-{conversations}.jsonl")


def train_once(cfg: Config) -> float:
    """Train ``cfg`` in this process; wall seconds of training (target and data loaded first)."""
    from draftforge.features import prepare_data
    from draftforge.target import load_target
    from draftforge.train import train

    target = load_target(cfg.target, "cpu")
    prepared = prepare_data(cfg, target.tokenizer, target.vocab_size)
    start = time.perf_counter()
    train(cfg, target, prepared)
    return time.perf_counter() - start


def evaluate_run(cfg: Config, prompts: str, tokens: int) -> dict[str, float]:
    """Greedy acceptance length of chains of CHAINS steps on the held-out prompts."""
    from draftforge.decode.evaluate import evaluate
    from draftforge.decode.sampling import SamplingParams
    from draftforge.decode.tree import TreeShape
    from draftforge.drafts import load_draft_for
    from draftforge.target import load_target

    target = load_target(cfg.target, "cpu")
    draft = load_draft_for(cfg.output.dir, target)
    result = {}
    for steps in CHAINS:
        report = evaluate(
            target,
            draft,
            heldout_span(prompts),
            TreeShape(steps),
            SamplingParams(temperature=0.0),
            tokens,
            baseline=False,
            generate=False,
            log=lambda _: None,
        )
        result[f"al_chain_{steps}"] = report["acceptance_length"]
    return result


def worker(path: Path) -> None:
    """One budgeted candidate: train, evaluate, write result.json next to its run."""
    spec = json.loads(path.read_text())
    out = Path(spec["out"])
    cfg = candidate_config(
        Path(spec["root"]), spec["conversations"], spec["changes"], out / "run", spec["steps"]
    )
    seconds = train_once(cfg)
    train, held_out = split_records(read_records(out / "run" / "metrics.jsonl"))
    result = {
        "train_seconds": seconds,
        "loss": train[-1]["loss"],
        "acc_0": train[-1]["acc_0"],
        "eval_acc_0": held_out[-1]["acc_0"],
    }
    result.update(evaluate_run(cfg, spec["prompts"], spec["tokens"]))
    (out / "result.json").write_text(json.dumps(result, indent=1))


def prepare(root: Path, conversations: int) -> None:
    """The demo's data and capture, made (or found in the cache)."""
    from draftforge.features import prepare_data
    from draftforge.offline import capture
    from draftforge.target import load_target

    write_subset(DEMO_DATA, conversations, root / "data" / f"train-{conversations}.jsonl")
    cfg = candidate_config(root, conversations, [], root / "unused", 1)
    target = load_target(cfg.target, "cpu")
    capture(cfg, target, prepared=prepare_data(cfg, target.tokenizer, target.vocab_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=DemoSettings.minutes)
    parser.add_argument("--conversations", type=int, default=DemoSettings.conversations)
    parser.add_argument("--prompts", default="12:36", help="held-out prompts, FIRST:END")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--only", help="comma-separated candidate numbers (1-based)")
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return
    ladder = LADDER
    if args.only:
        ladder = [LADDER[int(i) - 1] for i in args.only.split(",")]
    prepare(args.out, args.conversations)
    print(f"fp32 matmul {matmul_gflops():.0f} GFLOP/s, {torch.get_num_threads()} threads")

    step_s = {}
    for name, changes in ladder:  # one candidate after another, alike in what the machine does
        shutil.rmtree(args.out / "timing", ignore_errors=True)
        times = [
            train_once(
                candidate_config(
                    args.out, args.conversations, changes, args.out / "timing" / f"{n}", n
                )
            )
            for n in TIMED_STEPS
        ]
        step_s[name] = (times[1] - times[0]) / (TIMED_STEPS[1] - TIMED_STEPS[0])
        print(f"{name}: {step_s[name]:.3f} s per step", flush=True)

    runs = [(name, changes, step_s[name]) for name, changes in ladder]
    for name, changes, like in VARIANTS if not args.only else []:
        base_name, base_changes = LADDER[like - 1]
        runs.append((name, base_changes + changes, step_s[base_name]))
        step_s[name] = step_s[base_name]
    procs: list[subprocess.Popen] = []
    specs = []
    threads = max(1, torch.get_num_threads() // args.parallel)
    for i, (name, changes, seconds) in enumerate(runs):
        steps = round(args.minutes * 60 / seconds)
        out = args.out / f"candidate-{i + 1}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: neither resumed nor reported stale
        out.mkdir(parents=True)
        spec = {
            "name": name,
            "steps": steps,
            "out": str(out),
            "root": str(args.out),
            "conversations": args.conversations,
            "changes": changes,
            "prompts": args.prompts,
            "tokens": args.max_new_tokens,
        }
        (out / "spec.json").write_text(json.dumps(spec, indent=1))
        specs.append(spec)
        while len([p for p in procs if p.poll() is None]) >= args.parallel:
            time.sleep(5)
        env_cmd = [sys.executable, __file__, "--worker", str(out / "spec.json")]
        procs.append(
            subprocess.Popen(
                env_cmd,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                stdout=(out / "log.txt").open("w"),
                stderr=subprocess.STDOUT,
            )
        )
    for p in procs:
        p.wait()

    print(f"\n{'candidate':<30} {'s/step':>7} {'steps':>6} {'loss':>7} {'acc_0':>6}", end="")
    print(f" {'eval acc_0':>10}", end="")
    print("".join(f" {'AL ch' + str(c):>8}" for c in CHAINS))
    for spec in specs:
        path = Path(spec["out"]) / "result.json"
        if not path.is_file():
            print(f"{spec['name']:<30} failed: see {Path(spec['out']) / 'log.txt'}")
            continue
        r = json.loads(path.read_text())
        print(
            f"{spec['name']:<30} {step_s[spec['name']]:>7.3f} {spec['steps']:>6} "
            f"{r['loss']:>7.3f} {r['acc_0']:>6.3f} {r['eval_acc_0']:>10.3f}"
            + "".join(f" {r[f'al_chain_{c}']:>8.3f}" for c in CHAINS)
        )


if __name__ == "__main__":
    main()
