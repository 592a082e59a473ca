"""What each ``draftforge`` subcommand does: the arguments it takes and the function it runs.

:mod:`draftforge.cli` registers them (name, help, order) and dispatches to them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from draftforge import require_extra
from draftforge.config import ConfigError, dump_config, load_config
from draftforge.decode.commands import MIN_PROB_HELP
from draftforge.demo import DEMO_CONVERSATIONS, DemoSettings, run_demo
from draftforge.export import DEFAULT_SPECULATIVE_TOKENS, FORMATS, export_checkpoint
from draftforge.parallel import default_device

# ----------------------------------------------------------------------------- run config


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (optional: defaults otherwise)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="overrides, e.g. training.lr=3e-4"
    )
    parser.add_argument(
        "--config", dest="config_file", metavar="FILE", help="YAML config file (as CONFIG)"
    )


def _split_config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config file, given as the first positional or as ``--config``, and the overrides."""
    # `draftforge train training.lr=1` has no file: the first positional is an override.
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    if args.config_file is not None:
        if config is not None:
            raise ConfigError(
                f"two config files, {config} and --config {args.config_file}: give one"
            )
        config = args.config_file
    return config, overrides


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(*_split_config_args(args))
    print(dump_config(cfg), end="")
    return 0


# ----------------------------------------------------------------------------- target


def target_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument("--prompt", help="a user message to answer with the target's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)


def cmd_target(args: argparse.Namespace) -> int:
    from draftforge.target import load_target

    cfg = load_config(*_split_config_args(args))
    cfg.validate()
    start = time.perf_counter()
    target = load_target(cfg.target)
    print(
        f"target {target.path}: {type(target.model).__name__}, {target.num_layers} layers, "
        f"hidden {target.hidden_size}, vocab {target.vocab_size}, aux layers {target.aux_layers} "
        f"(loaded in {time.perf_counter() - start:.1f} s)"
    )
    if args.prompt:
        tok = target.tokenizer
        ids = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        out = target.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


# ----------------------------------------------------------------------------- data


def cmd_prepare(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from draftforge.features import prepare_data
    from draftforge.target import load_tokenizer, resolve_target_path

    cfg = load_config(*_split_config_args(args))
    cfg.validate()
    path = resolve_target_path(cfg.target.path, cfg.target.cache_dir)
    tokenizer = load_tokenizer(path, cfg.target.trust_remote_code)
    # The vocabulary size from config.json, without loading the weights.
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.target.trust_remote_code)
    result = prepare_data(cfg, tokenizer, model_config.get_text_config().vocab_size)
    print(result.summary())
    return 0


def regenerate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="conversations or prompts: a file, a folder or a hub dataset")
    config_arguments(p)
    p.add_argument("--out", required=True, help="output JSONL; appended to, never rewritten")
    p.add_argument("--backend", choices=("hf", "http"), default="hf")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible API base")
    p.add_argument("--model", help="model name the server serves (needed with --backend http)")
    p.add_argument("--api-key", help="sent as a bearer token, for servers that ask for one")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-prompt-tokens", type=int, help="skip conversations whose prompt grows longer"
    )
    p.add_argument("--batch-size", type=int, default=8, help="hf backend: rows per generate")
    p.add_argument("--concurrency", type=int, default=8, help="http backend: requests in flight")
    p.add_argument("--timeout", type=float, default=300.0, help="http backend: seconds a request")
    p.add_argument("--retries", type=int, default=5, help="http backend: tries after the first")
    p.add_argument(
        "--backoff", type=float, default=1.0, help="http backend: first retry delay, doubling"
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first row that cannot be answered"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_regenerate(args: argparse.Namespace) -> int:
    from draftforge.data import GenerationSettings, HFBackend, HTTPBackend, regenerate
    from draftforge.data.template import load_template
    from draftforge.target import load_target, load_tokenizer, resolve_target_path

    cfg = load_config(*_split_config_args(args))
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    template = load_template(cfg.data.chat_template)
    if args.backend == "hf" or args.max_prompt_tokens is not None:
        cfg.validate()  # the target (or its tokenizer) is needed
    backend: HFBackend | HTTPBackend
    if args.backend == "hf":
        target = load_target(cfg.target, default_device(requested=cfg.parallel.device))
        backend = HFBackend(
            target.model,
            target.tokenizer,
            settings,
            batch_size=args.batch_size,
            chat_template=template,
            chat_template_kwargs=cfg.data.chat_template_kwargs,
        )
    else:
        if not args.model:
            raise ConfigError("--backend http needs --model: the model name the server serves")
        tokenizer = None
        if args.max_prompt_tokens is not None:  # counting prompt tokens needs the tokenizer
            path = resolve_target_path(cfg.target.path, cfg.target.cache_dir)
            tokenizer = load_tokenizer(path, cfg.target.trust_remote_code)
        backend = HTTPBackend(
            args.url,
            args.model,
            settings,
            concurrency=args.concurrency,
            timeout=args.timeout,
            retries=args.retries,
            backoff=args.backoff,
            api_key=args.api_key,
            tokenizer=tokenizer,
            chat_template=template,
            chat_template_kwargs=cfg.data.chat_template_kwargs,
        )
    result = regenerate(
        args.input,
        args.out,
        backend,
        split=cfg.data.split,
        fmt=cfg.data.format,
        strict=args.strict or cfg.data.strict,
        progress=not args.no_progress,
    )
    print(result.summary())
    if isinstance(backend, HTTPBackend):
        print(f"requests retried: {backend.retried}")
    # Failed conversations are not in the output; a nonzero status tells scripts to rerun.
    return 1 if result.failed else 0


# ----------------------------------------------------------------------------- training


def cmd_train(args: argparse.Namespace) -> int:
    from draftforge.train import train

    cfg = load_config(*_split_config_args(args))
    result = train(cfg)
    if not result.main:
        return 0
    if result.step == result.first_step:
        print(
            f"nothing to train: {result.run_dir} is already at step {result.step} (its "
            "training.max_steps, epochs or time limit); raise it to train on, or use another "
            "output.dir"
        )
        return 0
    summary = ", ".join(
        f"{k} {result.metrics[k]:.3f}"
        for k in ("loss", "acc_0", "al_estimate")
        if k in result.metrics
    )
    trained = result.step - result.first_step
    resumed = f", resumed at step {result.first_step}" if result.first_step else ""
    print(f"trained {trained} steps{resumed} ({result.skipped} empty batches skipped): {summary}")
    print(f"checkpoints and metrics in {result.run_dir}")
    return 0


def plan_arguments(p: argparse.ArgumentParser) -> None:
    from draftforge.plan_table import add_arguments

    add_arguments(p)


def cmd_plan(args: argparse.Namespace) -> int:
    from draftforge.plan_table import print_tables

    print_tables(args)
    return 0


def check_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument(
        "--world-size",
        type=int,
        help="processes the run will use (torchrun's world size); default: one per GPU here, "
        "else 1",
    )


def cmd_check(args: argparse.Namespace) -> int:
    from draftforge.check import check_config

    cfg = load_config(*_split_config_args(args))
    cfg.validate()
    findings = check_config(cfg, args.world_size)
    for finding in findings:
        print(finding)
    errors = sum(f.error for f in findings)
    print(f"check: {errors} error(s), {len(findings) - errors} warning(s)")
    return 1 if errors else 0


def capture_arguments(p: argparse.ArgumentParser) -> None:
    config_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_capture(args: argparse.Namespace) -> int:
    from draftforge.offline import capture

    cfg = load_config(*_split_config_args(args))
    result = capture(cfg, progress=not args.no_progress)
    if result.rank == 0:
        print(result.summary())
    return 0


# ----------------------------------------------------------------------------- export


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint step_XXXXXXXX/ or a run directory (its newest)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument(
        "--force", action="store_true", help="replace a previous export in --out (nothing else)"
    )
    p.add_argument(
        "--target",
        help="the target as the serving machine finds it (default: the run's target.path)",
    )
    p.add_argument(
        "--no-embedding",
        action="store_true",
        help="vllm: leave the target's embedding out (vLLM then shares the target's)",
    )
    p.add_argument(
        "--speculative-tokens",
        type=int,
        default=DEFAULT_SPECULATIVE_TOKENS,
        help="draft tokens per step in the written config and printed commands",
    )
    p.add_argument(
        "--tree",
        type=int,
        nargs=2,
        metavar=("TOPK", "DRAFT_TOKENS"),
        help="sglang: a draft tree of --speculative-tokens levels, TOPK children per node, "
        "DRAFT_TOKENS verified (root included) in the printed command; default: a chain",
    )


def cmd_export(args: argparse.Namespace) -> int:
    result = export_checkpoint(
        args.checkpoint,
        args.format,
        args.out,
        force=args.force,
        target=args.target,
        include_embedding=not args.no_embedding,
        speculative_tokens=args.speculative_tokens,
        tree=tuple(args.tree) if args.tree else None,
    )
    print(f"exported {result.source} as {result.fmt} to {result.out}")
    print(f"aux layers (output of layer i): {result.aux_layers}")
    for what, command in result.commands:
        print(f"\n# {what}\n{command}")
    return 0


# ----------------------------------------------------------------------------- report


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (output.dir) with its metrics.jsonl")


def cmd_report(args: argparse.Namespace) -> int:
    from draftforge.curves import plot_run

    path, train, held_out = plot_run(Path(args.run_dir))
    print(
        f"loss, acc_k and AL estimate of {len(train)} train and {len(held_out)} held-out records: {path}"
    )
    return 0


# ----------------------------------------------------------------------------- demo


def demo_arguments(p: argparse.ArgumentParser) -> None:
    defaults = DemoSettings()
    p.add_argument("--minutes", type=float, default=defaults.minutes, help="training time budget")
    p.add_argument("--out", default=str(defaults.out), help="output folder")
    p.add_argument("--fresh", action="store_true", help="ignore every cache and start over")
    p.add_argument(
        "--conversations",
        type=int,
        default=defaults.conversations,
        help=f"built-in conversations to train on (the first N, at most {DEMO_CONVERSATIONS})",
    )
    p.add_argument(
        "--eval-prompts",
        type=int,
        default=defaults.eval_prompts,
        help="held-out prompts decoded per setting",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help="tokens generated per held-out prompt",
    )
    p.add_argument(
        "--min-prob",
        type=float,
        default=defaults.min_prob,
        help="every evaluated setting's min_prob: " + MIN_PROB_HELP,
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="run config overrides, applied after the demo's own (e.g. training.lr=1e-3)",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    require_extra("matplotlib", "plot", "the demo's report (report.png)")  # checked up front
    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {args.minutes}")
    if not 10 <= args.conversations <= DEMO_CONVERSATIONS:
        raise ConfigError(
            f"--conversations must be from 10 to {DEMO_CONVERSATIONS} (the built-in set's "
            f"size), got {args.conversations}"
        )
    if args.eval_prompts < 1:
        raise ConfigError(f"--eval-prompts must be at least 1, got {args.eval_prompts}")
    if not 0 <= args.min_prob < 1:
        raise ConfigError(f"--min-prob must be in [0, 1), got {args.min_prob}")
    settings = DemoSettings(
        minutes=args.minutes,
        out=Path(args.out),
        fresh=args.fresh,
        conversations=args.conversations,
        eval_prompts=args.eval_prompts,
        max_new_tokens=args.max_new_tokens,
        min_prob=args.min_prob,
        overrides=args.overrides,
    )
    return run_demo(settings)
