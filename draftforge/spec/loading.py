"""Load a draft for decoding and refuse one that does not fit the target, naming the field."""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml
from transformers import PretrainedConfig

from draftforge.export import (
    RUN_CONFIG_FILE,
    DraftState,
    ExportError,
    build_draft_module,
    read_draft,
    resolve_checkpoint,
)
from draftforge.models.eagle3 import DraftShapeError, Eagle3Draft
from draftforge.target import DEFAULT_TARGET, Target


def draft_aux_layers(config: PretrainedConfig) -> list[int] | None:
    """The aux layers a draft was trained on ("output of layer i"), if its config names them."""
    eagle = getattr(config, "eagle_config", None) or {}
    aux = eagle.get("eagle_aux_hidden_state_layer_ids")
    return list(aux) if aux is not None else None


def check_compatible(config: PretrainedConfig, target: Target) -> None:
    """Raise :class:`DraftShapeError` naming the first field where draft and target disagree."""
    problems = []
    if config.hidden_size != target.hidden_size:
        problems.append(
            f"hidden_size {config.hidden_size} != target hidden_size {target.hidden_size} "
            "(the draft reads the target's token embedding)"
        )
    target_hidden = getattr(config, "target_hidden_size", None) or config.hidden_size
    if target_hidden != target.hidden_size:
        problems.append(
            f"target_hidden_size {target_hidden} != target hidden_size {target.hidden_size} "
            "(fc reads 3 target layers of that width)"
        )
    if config.vocab_size != target.vocab_size:
        problems.append(f"vocab_size {config.vocab_size} != target vocab {target.vocab_size}")
    draft_vocab = getattr(config, "draft_vocab_size", config.vocab_size)
    if draft_vocab > target.vocab_size:
        problems.append(
            f"draft_vocab_size {draft_vocab} exceeds the target vocab {target.vocab_size}"
        )
    aux = aux_problem(draft_aux_layers(config), target.num_layers)
    if aux:
        problems.append(aux)
    if problems:
        raise DraftShapeError(f"the draft does not fit target {target.path}: {'; '.join(problems)}")


def aux_problem(aux: list[int] | None, num_layers: int) -> str | None:
    """Why the draft's aux layers cannot be read from a target this deep, or None."""
    if aux is None:
        return None
    outside = [i for i in aux if not 0 <= i < num_layers]
    if len(aux) == 3 and not outside:
        return None
    return (
        f"aux layers {aux} do not fit the target's {num_layers} layers "
        f"(need 3 ids in 0..{num_layers - 1}; outside: {outside})"
    )


def draft_for(state: DraftState, target: Target) -> Eagle3Draft:
    """The draft of ``state`` (see :func:`draftforge.export.read_draft`), checked against
    ``target`` before its weights are assembled, on the target's device and dtype."""
    check_compatible(state.config, target)
    draft = build_draft_module(state, target)
    return draft.to(device=target.device, dtype=target.model.dtype).eval().requires_grad_(False)


def load_draft_for(path: str | Path, target: Target) -> Eagle3Draft:
    """A draft from a checkpoint, run directory or export, ready to decode with ``target``."""
    return draft_for(read_draft(Path(path)), target)


def target_path_of(draft_path: str | Path) -> str:
    """The target a draft was trained for, from the run config saved beside it; the default
    target when none is recorded."""
    path = Path(draft_path)
    candidates = [path / "config.yaml", path / RUN_CONFIG_FILE]
    # An export directory has no checkpoint: its run config is among the candidates already.
    with contextlib.suppress(ExportError):
        candidates.append(resolve_checkpoint(path) / "config.yaml")
    for file in candidates:
        if file.is_file():
            run = yaml.safe_load(file.read_text()) or {}
            return str((run.get("target") or {}).get("path") or DEFAULT_TARGET)
    return DEFAULT_TARGET
