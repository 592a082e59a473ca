"""The ``draftforge eval`` and ``bench`` subcommands: their arguments and what they run
(:mod:`draftforge.cli` registers them)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch

from draftforge import require_extra
from draftforge.config import TargetConfig
from draftforge.decode.errors import DecodeError
from draftforge.decode.evaluate import Prompt, evaluate, load_prompts
from draftforge.decode.sampling import SamplingParams
from draftforge.decode.sweep import plot_sweep, shapes_to_sweep, sweep
from draftforge.decode.tree import TreeShape
from draftforge.drafts import draft_aux_layers, draft_for, read_draft, target_path_of
from draftforge.models.eagle3 import DraftShapeError, Eagle3Draft
from draftforge.parallel import default_device
from draftforge.target import Target, aux_problem, load_target, read_target_info

T = TypeVar("T")


def _list_of(convert: Callable[[str], T], what: str) -> Callable[[str], list[T]]:
    """An argparse type for comma-separated values (``what`` names them in the error)."""

    def parse(text: str) -> list[T]:
        try:
            return [convert(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


_int_list = _list_of(int, "integers")
_prob_list = _list_of(float, "probabilities")


MIN_PROB_HELP = (
    "draft a node only while its cumulative draft probability is at least this (0: the "
    "whole shape; draftforge's own, SGLang and vLLM always draft the whole shape)"
)


def _decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The draft, target, prompts and sampling flags ``eval`` and ``bench`` share."""
    p.add_argument(
        "--draft", required=True, help="a training checkpoint or run directory, or an export"
    )
    p.add_argument(
        "--target",
        help="the target (default: the one recorded in the draft's run config)",
    )
    p.add_argument("--prompts", help="JSONL: messages, turns, prompt or LLaVA rows (images)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir",
        default="",
        help="converted-target cache (default: $DRAFTFORGE_CACHE, else "
        "$XDG_CACHE_HOME/draftforge, else ~/.cache/draftforge)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; 1 is often fastest for batch-1 "
        "decoding on a busy machine)",
    )
    p.add_argument(
        "--engine",
        choices=["auto", "lean", "hf"],
        default="auto",
        help="target path: the lean static-cache forward (auto: when the target allows it) "
        "or transformers' own forward",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the lean forward's layers (minutes to compile; off by default "
        "because on small CPUs it does not pay: benchmarks/decode.py)",
    )


def eval_arguments(p: argparse.ArgumentParser) -> None:
    _decoding_arguments(p)
    p.add_argument("--num-steps", type=int, default=3, help="draft steps (tree depth) per round")
    p.add_argument("--topk", type=int, default=1, help="children per node; 1 = chain")
    p.add_argument("--num-draft-tokens", type=int, help="tree nodes verified, root included")
    p.add_argument("--min-prob", type=float, default=0.0, help=MIN_PROB_HELP)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--no-baseline", action="store_true", help="skip the no-drafting baseline")
    p.add_argument("--no-generate", action="store_true", help="skip HF generate")
    p.add_argument("--out", help="write the JSON report here")


def bench_arguments(p: argparse.ArgumentParser) -> None:
    _decoding_arguments(p)
    p.add_argument("--num-steps", type=_int_list, default=[1, 2, 3, 4, 5], help="e.g. 1,2,3")
    p.add_argument("--topk", type=_int_list, default=[1], help="e.g. 1,4")
    p.add_argument("--num-draft-tokens", type=_int_list, help="tree sizes, e.g. 8,16")
    p.add_argument(
        "--min-prob", type=_prob_list, default=[0.0], help=f"e.g. 0,0.2: {MIN_PROB_HELP}"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=8, help="prompts used (the first N)")
    p.add_argument("--out-dir", default="bench", help="where bench.json and bench.png go")


def _load(args: argparse.Namespace) -> tuple[Target, Eagle3Draft]:
    if args.threads:
        torch.set_num_threads(args.threads)
    state = read_draft(Path(args.draft))
    path = args.target or target_path_of(args.draft)
    aux = draft_aux_layers(state.config)
    # The target captures the draft's own aux layers; check they exist before loading weights.
    num_layers = read_target_info(path, args.cache_dir).num_layers
    problem = None if aux is None else aux_problem(aux, num_layers)
    if problem:
        raise DraftShapeError(f"the draft does not fit target {path}: {problem}")
    config = TargetConfig(path=path, aux_layers=aux, cache_dir=args.cache_dir)
    target = load_target(config, default_device())
    return target, draft_for(state, target)


def _prompts(args: argparse.Namespace, images: bool = False) -> list[Prompt]:
    """--prompts, else the built-in prompts (with images for a vision-language target)."""
    prompts = load_prompts(args.prompts, images=images)[: args.limit]
    if not prompts:
        raise DecodeError(f"--limit {args.limit} leaves no prompts to run")
    return prompts


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)


def _lean(args: argparse.Namespace) -> bool | None:
    """--engine as SpecEngine's ``lean``."""
    return {"auto": None, "lean": True, "hf": False}[args.engine]


def cmd_eval(args: argparse.Namespace) -> int:
    shape = TreeShape(args.num_steps, args.topk, args.num_draft_tokens, args.min_prob)
    prompts = _prompts(args) if args.prompts else []  # a bad prompt file stops before loading
    target, draft = _load(args)
    prompts = prompts or _prompts(args, images=target.processor is not None)
    report = evaluate(
        target,
        draft,
        prompts,
        shape,
        _sampling(args),
        args.max_new_tokens,
        seed=args.seed,
        baseline=not args.no_baseline,
        generate=not args.no_generate,
        lean=_lean(args),
        compile=args.compile,
    )
    report["draft"] = str(args.draft)
    speculative = report["speculative"]
    al = report["acceptance_length"]
    print(f"acceptance length {al:.3f}" if al is not None else "acceptance length: no rounds")
    rates = ", ".join("-" if r is None else f"{r:.3f}" for r in report["accept_rate_per_position"])
    print(f"accept rate per position: [{rates}]")
    print(
        f"speculative: {speculative['tokens_per_s']:.2f} tok/s "
        f"({speculative['decode_tokens_per_s']:.2f} after each prompt's first token)"
    )
    for name in ("baseline", "generate"):
        if name in report:
            speedup = report[f"speedup_vs_{name}"]
            print(f"{name}: {report[name]['tokens_per_s']:.2f} tok/s (speedup {speedup or 0:.2f}x)")
    if "decode_speedup_vs_baseline" in report:
        decode = report["decode_speedup_vs_baseline"] or 0
        print(f"decoding phase alone (the prefill left out): speedup {decode:.2f}x the baseline")
    for name, same in report.get("greedy_identical_prompts", {}).items():
        print(f"greedy output identical to {name} on {same}/{len(prompts)} prompts")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"report written to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    require_extra("matplotlib", "plot", "the bench plot (bench.png)")  # checked before the sweep
    shapes = shapes_to_sweep(
        args.num_steps, args.topk, args.num_draft_tokens or [None], args.min_prob
    )
    if not shapes:
        raise DecodeError("no valid (num_steps, topk, num_draft_tokens) combination to run")
    prompts = _prompts(args) if args.prompts else []
    target, draft = _load(args)
    prompts = prompts or _prompts(args, images=target.processor is not None)
    base, rows = sweep(
        target,
        draft,
        prompts,
        shapes,
        _sampling(args),
        args.max_new_tokens,
        seed=args.seed,
        lean=_lean(args),
        compile=args.compile,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "target": target.path,
        "draft": str(args.draft),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "sampling": asdict(_sampling(args)),
        "baseline_tokens_per_s": base,
        "rows": [r.as_dict() for r in rows],
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    plot = plot_sweep(rows, out / "bench.png", f"{Path(target.path).name}, {len(prompts)} prompts")
    print(f"table in {out / 'bench.json'}, plot in {plot}")
    return 0
