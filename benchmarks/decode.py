"""Decoding speed: transformers' generate, the engine without drafting on each target path, and
speculative shapes (acceptance length, tokens/s, speedup, measured round cost).

python benchmarks/decode.py [--target tiny|smollm2|PATH] [--draft DIR] [--prompts N]
                            [--max-new-tokens N] [--threads N] [--paths lean,hf] [--compile]
                            [--cpu-clock] [--matmul] [--attention]

tiny (default, no download, seconds): a bigram-like tiny target with the hand-built oracle
draft of draftforge.testing, so paths are long and the engine's bookkeeping shows.
smollm2 or a model directory: an untrained draft unless --draft is given; with AL ~ 1 the
speedup column then measures what drafting and verification cost per round.
--compile adds the lean path with torch.compile'd layers (its compile time is printed).
The first line gives this run's fp32 matmul rate, so runs on different machines compare.
--matmul prints the lean path's cost model with each fast CPU matmul, interleaved, twice: the
few-row kernel (draftforge/decode/skinny.py) and prepacked oneDNN, at verify sizes 1 to 8.
--attention does the same for the lean path's attention: the few-row kernel's and torch's SDPA,
at 128 and 512 cached tokens (chains: causal verifies; the engine's trees pass a mask).
--cpu-clock (with --threads 1) times everything with the thread's CPU clock instead of the
wall clock: on a machine other processes share, their load then does not count (an idle
machine gives about the same numbers either way).
"""

import argparse
import os
import time

import torch

from draftforge.config import TargetConfig
from draftforge.decode.costs import measure_costs
from draftforge.decode.engine import SpecEngine
from draftforge.decode.evaluate import (
    WARMUP_TOKENS,
    Totals,
    encode,
    load_prompts,
    time_generate,
)
from draftforge.decode.sampling import SamplingParams
from draftforge.decode.sweep import sweep
from draftforge.decode.tree import TreeShape
from draftforge.drafts import load_draft_for
from draftforge.machine import matmul_gflops
from draftforge.models import build_draft
from draftforge.target import load_target
from draftforge.testing import as_target, bigram_like_target, oracle_draft

SHAPES = [
    TreeShape(1, 1),
    TreeShape(3, 1),
    TreeShape(5, 1),
    TreeShape(3, 4, 8),
    TreeShape(5, 4, 16),
    TreeShape(6, 8, 32),
]
PATHS = {"lean": True, "hf": False}


def plain_speed(target, encoded, max_new_tokens, lean, compile=False):
    """Tokens/s of the engine without drafting, its target step (ms) and its set-up seconds
    (building the path; compiling happens in the warm-up generation)."""
    start = time.perf_counter()
    engine = SpecEngine(target, None, TreeShape(0), lean=lean, compile=compile)
    engine.generate(encoded[0], WARMUP_TOKENS, stop_ids=())
    setup = time.perf_counter() - start
    totals = Totals()
    for ids in encoded:
        totals.add(engine.generate(ids, max_new_tokens, stop_ids=()))
    step = measure_costs(engine, context=len(encoded[0]) + max_new_tokens // 2).target_step_ms
    return totals.tokens_per_s, step, setup, engine


def matmul_costs(target, draft):
    """The lean path's cost model with the few-row kernel and with oneDNN, alternately."""
    sizes = [1, 2, 3, 4, 5, 8]
    for _ in range(2):
        for matmul, switch in (("few-row kernel", "1"), ("oneDNN prepacked", "0")):
            os.environ["DRAFTFORGE_SKINNY"] = switch
            engine = SpecEngine(target, draft, TreeShape(4, 4, 8), lean=True)
            print(f"{matmul} ({engine.path.matmul}):")
            print("\n".join(measure_costs(engine, tree_sizes=sizes).lines()[:3]))
    os.environ.pop("DRAFTFORGE_SKINNY")


def attention_costs(target, draft):
    """The lean path's cost model with the kernel's attention and with SDPA, alternately."""
    sizes = [1, 2, 3, 4, 8]
    for _ in range(2):
        for context in (128, 512):
            for kernel in (True, False):
                engine = SpecEngine(target, draft, TreeShape(3, 1), lean=True)
                if not engine.path.attention_kernel:
                    print("the few-row kernel's attention does not serve this target here")
                    return
                engine.path.attention_kernel = kernel
                if engine.drafter is not None:
                    engine.drafter.attention_kernel = kernel
                costs = measure_costs(engine, tree_sizes=sizes, context=context, repeats=25)
                print(f"{'few-row kernel' if kernel else 'SDPA'} attention:")
                print("\n".join(costs.lines()[:3]))


def load(args):
    if args.target == "tiny":
        target = as_target(bigram_like_target("llama", seed=1, dtype=torch.float32))
        return target, oracle_draft(target)
    target = load_target(TargetConfig(path=args.target))
    if args.draft:
        return target, load_draft_for(args.draft, target)
    draft = build_draft("eagle3", target.config, target.aux_layers, 32000)
    draft.load_target_embedding(target.embed_weight())
    return target, draft.to(target.model.dtype).eval().requires_grad_(False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="tiny")
    parser.add_argument("--draft", help="checkpoint or export directory (default: see above)")
    parser.add_argument("--prompts", type=int, default=4, help="first N built-in prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--paths", default="lean,hf", help="target paths for the shape sweeps")
    parser.add_argument("--compile", action="store_true", help="also time compiled layers")
    parser.add_argument("--cpu-clock", action="store_true", help="CPU time (needs --threads 1)")
    parser.add_argument("--matmul", action="store_true", help="compare the fast CPU matmuls")
    parser.add_argument("--attention", action="store_true", help="kernel attention or SDPA")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_clock:
        if torch.get_num_threads() != 1:
            parser.error("--cpu-clock measures one thread's CPU time: add --threads 1")
        # Every timer in the engine, the cost model and generate's timing reads perf_counter.
        time.perf_counter = time.thread_time
    target, draft = load(args)
    prompts = load_prompts()[: args.prompts]
    encoded = [encode(target, p) for p in prompts]
    sampling = SamplingParams(temperature=args.temperature)
    print(
        f"target {target.path}, {len(prompts)} prompts x {args.max_new_tokens} tokens, "
        f"temperature {args.temperature}, {torch.get_num_threads()} threads, "
        f"fp32 matmul {matmul_gflops():.0f} GFLOP/s" + (", CPU clock" if args.cpu_clock else "")
    )
    if args.matmul:
        matmul_costs(target, draft)
    if args.attention:
        attention_costs(target, draft)
    hf = time_generate(target, encoded, args.max_new_tokens, stop_ids=frozenset())
    print(f"{'HF generate (greedy)':<34} {hf.tokens_per_s:8.2f} tok/s")
    runs = [(name, lean, False) for name, lean in PATHS.items()]
    if args.compile:
        runs.append(("lean, compiled layers", True, True))
    engines = {}
    for name, lean, compile in runs:
        tps, step, setup, engines[name] = plain_speed(
            target, encoded, args.max_new_tokens, lean, compile
        )
        label = f"engine, no draft, {name} path"
        print(
            f"{label:<34} {tps:8.2f} tok/s  target step {step:.1f} ms  "
            f"({tps / hf.tokens_per_s:.2f}x generate; set-up {setup:.1f} s)"
        )
    sizes = [shape.draft_tokens for shape in SHAPES]
    print("\n".join(measure_costs(engines["lean"], tree_sizes=sizes).lines()))
    for name in args.paths.split(","):
        print(f"\nspeculative shapes, {name} path (speedup against the same path without draft)")
        sweep(target, draft, prompts, SHAPES, sampling, args.max_new_tokens, lean=PATHS[name])


if __name__ == "__main__":
    main()
