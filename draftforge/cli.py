"""The ``draftforge`` command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from draftforge import MissingExtraError, __version__, commands
from draftforge.checkpoint import CheckpointError
from draftforge.config import ConfigError, describe_options
from draftforge.data import DataError
from draftforge.decode import commands as decode_commands
from draftforge.decode.errors import DecodeError
from draftforge.drafts import DraftError
from draftforge.models.eagle3 import DraftShapeError
from draftforge.parallel import CollectiveError
from draftforge.shards import ShardError
from draftforge.target import TargetError
from draftforge.train import Terminated, TrainingError

# Errors whose message is the whole story: printed as one line, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    TargetError,
    DataError,
    TrainingError,
    CheckpointError,
    DraftError,
    DraftShapeError,
    DecodeError,
    ShardError,
    CollectiveError,
    MissingExtraError,
    FileNotFoundError,
)


def version_line() -> str:
    """What ``draftforge --version`` prints: this package's version and the torch and
    transformers it runs with."""
    transformers = importlib.metadata.version("transformers")
    return f"draftforge {__version__} (torch {torch.__version__}, transformers {transformers})"


def _options_epilog() -> str:
    lines = ["options (set in the YAML file or as section.key=value overrides):"]
    for key, type_name, default, doc in describe_options():
        lines.append(f"  {key} = {default}  [{type_name}]\n      {doc}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """A subcommand: its name and help, the arguments it takes, and what it runs."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    lists_options: bool = False  # --help ends with every run config option


# In the order `draftforge --help` lists them.
COMMANDS: tuple[Command, ...] = (
    Command(
        "config",
        "print the resolved config (defaults + file + overrides) as YAML",
        commands.config_arguments,
        commands.cmd_config,
        lists_options=True,
    ),
    Command(
        "target",
        "load the target (converting a GGUF once), describe it, optionally chat with it",
        commands.target_arguments,
        commands.cmd_target,
    ),
    Command(
        "prepare",
        "read, template, mask and tokenise data.path (cached) and build the draft vocab",
        commands.config_arguments,
        commands.cmd_prepare,
        lists_options=True,
    ),
    Command(
        "regenerate",
        "rewrite the assistant turns of a dataset with the target (resumable)",
        commands.regenerate_arguments,
        commands.cmd_regenerate,
        description="Answer every user turn of INPUT with the target, turn by turn, and "
        "append the conversations to --out (JSONL, messages format). Rerunning the same "
        "command continues where a run stopped and retries the failed conversations. The "
        "config (target.*, data.format, data.split, data.chat_template) selects the model "
        "and how INPUT is read.",
    ),
    Command(
        "train",
        "train a draft online (the target runs in this process); resumable",
        commands.config_arguments,
        commands.cmd_train,
        lists_options=True,
    ),
    Command(
        "plan",
        "per-GPU memory of online training for a target config.json, at several TP/FSDP sizes",
        commands.plan_arguments,
        commands.cmd_plan,
    ),
    Command(
        "check",
        "preflight a run config: aux layers, chat template, end-of-turn token, draft "
        "vocabulary, memory and disk; one line per finding (no weights loaded)",
        commands.check_arguments,
        commands.cmd_check,
        lists_options=True,
    ),
    Command(
        "capture",
        "run the target over the prepared data once and store its features for "
        "data.mode=offline (resumable; split over processes under torchrun)",
        commands.capture_arguments,
        commands.cmd_capture,
        lists_options=True,
    ),
    Command(
        "export",
        "write a checkpoint as a draft SGLang or vLLM serves as it is (or draftforge's own)",
        commands.export_arguments,
        commands.cmd_export,
    ),
    Command(
        "report",
        "draw a run's loss, acc_k and AL-estimate curves (train and held out) to report.png",
        commands.report_arguments,
        commands.cmd_report,
        description="Read RUN_DIR/metrics.jsonl and draw its loss, acc_k and acceptance-length "
        "estimate curves, train and held out, to RUN_DIR/report.png (needs the plot extra).",
    ),
    Command(
        "eval",
        "speculative decoding on a prompt set: acceptance length, per-position acceptance, "
        "tokens/s against no drafting and HF generate; JSON report",
        decode_commands.eval_arguments,
        decode_commands.cmd_eval,
    ),
    Command(
        "bench",
        "sweep num_steps (and topk / num_draft_tokens): table, JSON and a PNG plot",
        decode_commands.bench_arguments,
        decode_commands.cmd_bench,
    ),
    Command(
        "demo",
        "train, evaluate and export a draft for SmolLM2-135M-Instruct on this CPU",
        commands.demo_arguments,
        commands.cmd_demo,
        description="The CPU demo: built-in SmolLM2-answered data, offline capture, training "
        "for --minutes, speculative decoding on held-out prompts, SGLang and vLLM exports and "
        "a report (text, JSON, PNG). Caches are reused across runs; an interrupted run "
        "resumes.",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftforge",
        description="Train EAGLE-3 speculative-decoding drafts for Hugging Face LLMs.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    options = _options_epilog()  # built once, shown by every config-taking command's --help
    for command in COMMANDS:
        listing = {"epilog": options, "formatter_class": argparse.RawDescriptionHelpFormatter}
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            **(listing if command.lists_options else {}),
        )
        command.arguments(p)
        p.set_defaults(_run=command.run)
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
    code = _dispatch(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose work is done (process groups destroyed, files closed) leaves
        # without the interpreter's and C++'s teardown: there, a communication thread still
        # alive aborted the process now and then ("terminate called without an active
        # exception", no Python frame left), failing a run that had finished.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return args._run(args)
    except USER_ERRORS as err:
        print(f"draftforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"draftforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as err:
        print(f"draftforge {args.command}: {err}", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a scheduler expects of a job it asked to stop


if __name__ == "__main__":
    sys.exit(main())
