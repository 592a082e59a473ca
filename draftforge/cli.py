"""The ``draftforge`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from draftforge.checkpoint import CheckpointError
from draftforge.config import ConfigError, describe_options, dump_config, load_config
from draftforge.data import DataError
from draftforge.target import TargetError
from draftforge.train import TrainingError

# Errors whose message is the whole story: printed as one line, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    TargetError,
    DataError,
    TrainingError,
    CheckpointError,
    FileNotFoundError,
)


def _options_epilog() -> str:
    lines = ["options (set in the YAML file or as section.key=value overrides):"]
    for key, type_name, default, doc in describe_options():
        lines.append(f"  {key} = {default}  [{type_name}]\n      {doc}")
    return "\n".join(lines)


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


def cmd_train(args: argparse.Namespace) -> int:
    from draftforge.train import train

    cfg = load_config(*_split_config_args(args))
    result = train(cfg)
    summary = ", ".join(
        f"{k} {result.metrics[k]:.3f}"
        for k in ("loss", "acc_0", "al_estimate")
        if k in result.metrics
    )
    print(f"trained {result.step} steps ({result.skipped} empty batches skipped): {summary}")
    print(f"checkpoints and metrics in {result.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftforge",
        description="Train EAGLE-3 speculative-decoding drafts for Hugging Face LLMs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser(
        "config",
        help="print the resolved config (defaults + file + overrides) as YAML",
        epilog=_options_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    commands["config"] = cmd_config

    p = sub.add_parser(
        "target",
        help="load the target (converting a GGUF once), describe it, optionally chat with it",
    )
    _add_config_args(p)
    p.add_argument("--prompt", help="a user message to answer with the target's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    commands["target"] = cmd_target

    p = sub.add_parser(
        "train",
        help="train a draft online (the target runs in this process); resumable",
        epilog=_options_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    commands["train"] = cmd_train

    parser.set_defaults(_commands=commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
