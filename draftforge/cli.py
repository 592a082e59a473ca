"""The ``draftforge`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from draftforge.checkpoint import CheckpointError
from draftforge.config import ConfigError, describe_options, dump_config, load_config
from draftforge.data import DataError
from draftforge.demo import DemoSettings, run_demo
from draftforge.export import ExportError
from draftforge.models.eagle3 import DraftShapeError
from draftforge.parallel import CollectiveError
from draftforge.shards import ShardError
from draftforge.spec.commands import add_commands as add_spec_commands
from draftforge.spec.errors import SpecError
from draftforge.target import TargetError
from draftforge.train import TrainingError

# Errors whose message is the whole story: printed as one line, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    TargetError,
    DataError,
    TrainingError,
    CheckpointError,
    ExportError,
    DraftShapeError,
    SpecError,
    ShardError,
    CollectiveError,
    FileNotFoundError,
)


def _options_epilog() -> str:
    lines = ["options (set in the YAML file or as section.key=value overrides):"]
    for key, type_name, default, doc in describe_options():
        lines.append(f"  {key} = {default}  [{type_name}]\n      {doc}")
    return "\n".join(lines)


def _config_parser(
    sub: argparse._SubParsersAction, name: str, options: str, help_text: str
) -> argparse.ArgumentParser:
    """A subcommand that takes a config file and overrides, and lists every option in --help."""
    p = sub.add_parser(
        name, help=help_text, epilog=options, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_config_args(p)
    return p


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (optional: defaults otherwise)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="overrides, e.g. training.lr=3e-4"
    )


def _split_config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    # `draftforge train training.lr=1` has no file: the first positional is an override.
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(*_split_config_args(args))
    print(dump_config(cfg), end="")
    return 0


def cmd_target(args: argparse.Namespace) -> int:
    from draftforge.target import load_target

    cfg = load_config(*_split_config_args(args))
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
    backend: HFBackend | HTTPBackend
    if args.backend == "hf":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        target = load_target(cfg.target, device)
        backend = HFBackend(
            target.model,
            target.tokenizer,
            settings,
            batch_size=args.batch_size,
            chat_template=template,
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


def cmd_train(args: argparse.Namespace) -> int:
    from draftforge.train import train

    cfg = load_config(*_split_config_args(args))
    result = train(cfg)
    if not result.main:
        return 0
    summary = ", ".join(
        f"{k} {result.metrics[k]:.3f}"
        for k in ("loss", "acc_0", "al_estimate")
        if k in result.metrics
    )
    print(f"trained {result.step} steps ({result.skipped} empty batches skipped): {summary}")
    print(f"checkpoints and metrics in {result.run_dir}")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from draftforge.offline import capture

    cfg = load_config(*_split_config_args(args))
    result = capture(cfg, progress=not args.no_progress)
    if result.rank == 0:
        print(result.summary())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from draftforge.export import export_checkpoint

    result = export_checkpoint(
        args.checkpoint,
        args.format,
        args.out,
        force=args.force,
        target=args.target,
        include_embedding=not args.no_embedding,
        speculative_tokens=args.speculative_tokens,
    )
    print(f"exported {result.source} as {result.fmt} to {result.out}")
    print(f"aux layers (output of layer i): {result.aux_layers}")
    for what, command in result.commands:
        print(f"\n# {what}\n{command}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {args.minutes}")
    if args.conversations < 10:
        raise ConfigError(f"--conversations must be at least 10, got {args.conversations}")
    if args.eval_prompts < 1:
        raise ConfigError(f"--eval-prompts must be at least 1, got {args.eval_prompts}")
    settings = DemoSettings(
        minutes=args.minutes,
        out=Path(args.out),
        fresh=args.fresh,
        conversations=args.conversations,
        eval_prompts=args.eval_prompts,
        max_new_tokens=args.max_new_tokens,
        overrides=args.overrides,
    )
    return run_demo(settings)


def cmd_plan(args: argparse.Namespace) -> int:
    from draftforge.plan import format_plan, load_text_config, plan_layouts

    for path in args.configs:
        config = load_text_config(path)
        plans = plan_layouts(config, args.sizes, args.tokens, args.steps, args.draft_vocab)
        print(format_plan(path, config, plans, args.tokens) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftforge",
        description="Train EAGLE-3 speculative-decoding drafts for Hugging Face LLMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    options = _options_epilog()  # built once, shown by every config-taking command's --help
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    _config_parser(
        sub, "config", options, "print the resolved config (defaults + file + overrides) as YAML"
    )
    commands["config"] = cmd_config

    p = sub.add_parser(
        "target",
        help="load the target (converting a GGUF once), describe it, optionally chat with it",
    )
    _add_config_args(p)
    p.add_argument("--prompt", help="a user message to answer with the target's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    commands["target"] = cmd_target

    _config_parser(
        sub,
        "prepare",
        options,
        "read, template, mask and tokenise data.path (cached) and build the draft vocab",
    )
    commands["prepare"] = cmd_prepare

    p = sub.add_parser(
        "regenerate",
        help="rewrite the assistant turns of a dataset with the target (resumable)",
        description="Answer every user turn of INPUT with the target, turn by turn, and "
        "append the conversations to --out (JSONL, messages format). Rerunning the same "
        "command continues where a run stopped and retries the failed conversations. The "
        "config (target.*, data.format, data.split, data.chat_template) selects the model "
        "and how INPUT is read.",
    )
    p.add_argument("input", help="conversations or prompts: a file, a folder or a hub dataset")
    _add_config_args(p)
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
    commands["regenerate"] = cmd_regenerate

    _config_parser(
        sub, "train", options, "train a draft online (the target runs in this process); resumable"
    )
    commands["train"] = cmd_train

    p = sub.add_parser(
        "plan",
        help="per-GPU memory of online training for a target config.json, at several TP/FSDP sizes",
    )
    p.add_argument("configs", nargs="+", help="target config.json files (no weights needed)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="GPUs per layout")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per packed micro-batch")
    p.add_argument("--steps", type=int, default=7, help="TTT steps")
    p.add_argument("--draft-vocab", type=int, default=32000)
    commands["plan"] = cmd_plan

    p = _config_parser(
        sub,
        "capture",
        options,
        "run the target over the prepared data once and store its features for "
        "data.mode=offline (resumable; split over processes under torchrun)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    commands["capture"] = cmd_capture

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a draft SGLang or vLLM serves as it is (or draftforge's own)",
    )
    p.add_argument("checkpoint", help="a checkpoint step_XXXXXXXX/ or a run directory (its newest)")
    p.add_argument("--format", required=True, choices=["sglang", "vllm", "hf"])
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
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
        default=3,
        help="draft tokens per step in the written config and printed commands",
    )
    commands["export"] = cmd_export

    add_spec_commands(sub, commands)  # eval, bench

    defaults = DemoSettings()
    p = sub.add_parser(
        "demo",
        help="train, evaluate and export a draft for SmolLM2-135M-Instruct on this CPU",
        description="The CPU demo: built-in SmolLM2-answered data, offline capture, training "
        "for --minutes, speculative decoding on held-out prompts, SGLang and vLLM exports and "
        "a report (text, JSON, PNG). Caches are reused across runs; an interrupted run "
        "resumes.",
    )
    p.add_argument("--minutes", type=float, default=defaults.minutes, help="training time budget")
    p.add_argument("--out", default=str(defaults.out), help="output folder")
    p.add_argument("--fresh", action="store_true", help="ignore every cache and start over")
    p.add_argument(
        "--conversations",
        type=int,
        default=defaults.conversations,
        help="built-in conversations to train on (the first N)",
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
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="run config overrides, applied after the demo's own (e.g. training.lr=1e-3)",
    )
    commands["demo"] = cmd_demo

    parser.set_defaults(_commands=commands)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting the config file and overrides come after flags.

    argparse fills the positionals of one run of arguments at a time, so in
    `regenerate in.jsonl --out o.jsonl target.path=m` the trailing override would be
    "unrecognized"; such leftovers are the config file and overrides.
    """
    args, extra = parser.parse_known_args(argv)
    flags = [a for a in extra if a.startswith("-")]
    if flags or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra and args.config is None:
        args.config, extra = extra[0], extra[1:]
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return args._commands[args.command](args)
    except USER_ERRORS as err:
        print(f"draftforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"draftforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
