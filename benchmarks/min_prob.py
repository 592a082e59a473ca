"""The demo's min_prob: its settings at several floors, decoded side by side.

Decodes held-out prompts the demo's evaluation does not use (by default the 13th to the 36th)
greedily with a trained draft (the demo's run by default): the demo's chains and tree at each
floor, interleaved prompt by prompt with the engine without a draft
(:func:`draftforge.decode.sweep.sweep`), and prints the table with this run's fp32 matmul
rate. A floor of 0 drafts every setting's whole shape.

    python benchmarks/min_prob.py [--draft runs/demo/run] [--min-prob 0,0.1,0.2,0.3]
        [--prompts 12:36] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse

import torch

from draftforge.config import load_config
from draftforge.decode.sampling import SamplingParams
from draftforge.decode.sweep import sweep
from draftforge.demo import DemoSettings, heldout_span
from draftforge.drafts import load_draft_for
from draftforge.machine import matmul_gflops
from draftforge.target import load_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", default="runs/demo/run", help="a run directory")
    parser.add_argument("--min-prob", default="0,0.1,0.2,0.3", help="floors, comma-separated")
    parser.add_argument("--prompts", default="12:36", help="held-out prompts, FIRST:END")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    floors = [float(x) for x in args.min_prob.split(",")]
    cfg = load_config(f"{args.draft}/config.yaml", [])
    target = load_target(cfg.target, "cpu")
    draft = load_draft_for(args.draft, target)
    shapes = [shape for floor in floors for shape in DemoSettings(min_prob=floor).shapes()]
    print(f"fp32 matmul {matmul_gflops():.0f} GFLOP/s, {torch.get_num_threads()} threads")
    print(f"held-out prompts {args.prompts}, {args.max_new_tokens} tokens, temperature 0")
    sweep(
        target,
        draft,
        heldout_span(args.prompts),
        shapes,
        SamplingParams(temperature=0.0),
        args.max_new_tokens,
    )


if __name__ == "__main__":
    main()
