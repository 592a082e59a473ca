"""``draftforge eval`` and ``draftforge bench``: argument parsing and the two commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from draftforge.config import TargetConfig
from draftforge.export import read_draft, read_target_info
from draftforge.models.eagle3 import DraftShapeError, Eagle3Draft
from draftforge.spec.errors import SpecError
from draftforge.spec.evaluate import (
    Prompt,
    evaluate,
    load_prompts,
    plot_sweep,
    shapes_to_sweep,
    sweep,
)
from draftforge.spec.loading import aux_problem, draft_aux_layers, draft_for, target_path_of
from draftforge.spec.sampling import SamplingParams
from draftforge.spec.tree import TreeShape
from draftforge.target import Target, load_target


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--draft", required=True, help="a training checkpoint or run directory, or an export"
    )
    p.add_argument(
        "--target",
        help="the target (default: the one recorded in the draft's run config, else smollm2)",
    )
    p.add_argument("--prompts", help="JSONL prompts: messages, MT-Bench turns or prompt rows")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=TargetConfig.cache_dir, help="converted-target cache")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice; 1 is often fastest for batch-1 "
        "decoding on a busy machine)",
    )


def _load(args: argparse.Namespace) -> tuple[Target, Eagle3Draft]:
    if args.threads:
        torch.set_num_threads(args.threads)
    state = read_draft(Path(args.draft))
    path = args.target or target_path_of(args.draft)
    aux = draft_aux_layers(state.config)
    # The target captures the draft's own aux layers; check they exist before loading weights.
    problem = aux_problem(aux, read_target_info(path, args.cache_dir).num_layers)
    if problem:
        raise DraftShapeError(f"the draft does not fit target {path}: {problem}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = load_target(TargetConfig(path=path, aux_layers=aux, cache_dir=args.cache_dir), device)
    return target, draft_for(state, target)


def _prompts(args: argparse.Namespace) -> list[Prompt]:
    prompts = load_prompts(args.prompts)[: args.limit]
    if not prompts:
        raise SpecError(f"--limit {args.limit} leaves no prompts to run")
    return prompts


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)


def cmd_eval(args: argparse.Namespace) -> int:
    shape = TreeShape(args.num_steps, args.topk, args.num_draft_tokens)
    prompts = _prompts(args)
    target, draft = _load(args)
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
    )
    report["draft"] = str(args.draft)
    spec = report["speculative"]
    al = report["acceptance_length"]
    print(f"acceptance length {al:.3f}" if al is not None else "acceptance length: no rounds")
    rates = ", ".join("-" if r is None else f"{r:.3f}" for r in report["accept_rate_per_position"])
    print(f"accept rate per position: [{rates}]")
    print(f"speculative: {spec['tokens_per_s']:.2f} tok/s")
    for name in ("baseline", "generate"):
        if name in report:
            speedup = report[f"speedup_vs_{name}"]
            print(f"{name}: {report[name]['tokens_per_s']:.2f} tok/s (speedup {speedup or 0:.2f}x)")
    for name, same in report.get("greedy_identical_prompts", {}).items():
        print(f"greedy output identical to {name} on {same}/{len(prompts)} prompts")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"report written to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    shapes = shapes_to_sweep(args.num_steps, args.topk, args.num_draft_tokens or [None])
    if not shapes:
        raise SpecError("no valid (num_steps, topk, num_draft_tokens) combination to run")
    prompts = _prompts(args)
    target, draft = _load(args)
    base, rows = sweep(
        target, draft, prompts, shapes, _sampling(args), args.max_new_tokens, seed=args.seed
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


def add_commands(
    sub: argparse._SubParsersAction, commands: dict[str, Callable[[argparse.Namespace], int]]
) -> None:
    """Register ``eval`` and ``bench`` on the main parser's subcommands."""
    p = sub.add_parser(
        "eval",
        help="speculative decoding on a prompt set: acceptance length, per-position acceptance, "
        "tokens/s against no drafting and HF generate; JSON report",
    )
    _add_common(p)
    p.add_argument("--num-steps", type=int, default=3, help="draft steps (tree depth) per round")
    p.add_argument("--topk", type=int, default=1, help="children per node; 1 = chain")
    p.add_argument("--num-draft-tokens", type=int, help="tree nodes verified, root included")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--no-baseline", action="store_true", help="skip the no-drafting baseline")
    p.add_argument("--no-generate", action="store_true", help="skip HF generate")
    p.add_argument("--out", help="write the JSON report here")
    commands["eval"] = cmd_eval

    p = sub.add_parser(
        "bench",
        help="sweep num_steps (and topk / num_draft_tokens): table, JSON and a PNG plot",
    )
    _add_common(p)
    p.add_argument("--num-steps", type=_int_list, default=[1, 2, 3, 4, 5], help="e.g. 1,2,3")
    p.add_argument("--topk", type=_int_list, default=[1], help="e.g. 1,4")
    p.add_argument("--num-draft-tokens", type=_int_list, help="tree sizes, e.g. 8,16")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=8, help="prompts used (the first N)")
    p.add_argument("--out-dir", default="bench", help="where bench.json and bench.png go")
    commands["bench"] = cmd_bench
