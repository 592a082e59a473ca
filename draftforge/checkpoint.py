"""Training checkpoints: written atomically, verified on load, rotated.

A checkpoint is a directory ``step_00000123/`` holding the draft weights (safetensors), the
trainer state (optimizer, scheduler, RNG, data position; loaded with ``weights_only=True``)
and ``manifest.json`` with each file's size and sha256. It is written under a temporary
name and renamed into place only when complete, so a killed process never leaves a
checkpoint that looks finished; a file damaged later fails its checksum and is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from draftforge.config import ConfigError

STEP_DIR = re.compile(r"^step_(\d{8})$")
WEIGHTS = "draft.safetensors"
STATE = "trainer_state.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or damaged."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    extra: dict[str, str],
) -> Path:
    """Write ``root/step_{step}`` atomically; ``extra`` maps file names to text contents."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:08d}-", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)
        for name, text in extra.items():
            (tmp / name).write_text(text)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            for name in files
        }
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        for p in tmp.iterdir():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a re-run of the same step replaces it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` unless every file matches the manifest."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        expected = {name: (meta["bytes"], meta["sha256"]) for name, meta in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: no readable {MANIFEST} ({err!r})") from None
    for name, (size, sha256) in expected.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size or sha256_file(file) != sha256:
            raise CheckpointError(
                f"{file}: missing or damaged (size or sha256 differs from {MANIFEST})"
            )


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint directories, oldest first (temporary ones are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint that passes :func:`verify`; damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
        except CheckpointError as err:
            print(f"skipping checkpoint: {err}", flush=True)
            continue
        return path
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verified weights and trainer state of one checkpoint."""
    verify(path)
    return load_file(path / WEIGHTS), torch.load(path / STATE, weights_only=True)


def check_shapes(
    path: Path, weights: dict[str, torch.Tensor], own: dict[str, Any], draft: dict[str, Any]
) -> None:
    """Refuse to resume ``path`` when its weights do not fit this run's draft (``own``: its
    state dict; ``draft``: this run's draft settings): name the first misfit and the draft
    settings the checkpoint was trained with that differ (its ``config.yaml``)."""
    misfits = [
        (name, list(w.shape), list(own[name].shape))
        for name, w in weights.items()
        if name in own and w.shape != own[name].shape
    ]
    if not misfits:
        return
    name, saved, here = misfits[0]
    hint = ""
    try:
        was = yaml.safe_load((path / "config.yaml").read_text())["draft"]
        hint = " ".join(f"draft.{k}={v}" for k, v in was.items() if draft.get(k) != v)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        pass
    raise ConfigError(
        f"{path} holds a draft of another shape ({name} is {saved} there and {here} in this "
        f"run): resume it with the settings it was trained with{f' ({hint})' if hint else ''}, "
        "or training.resume=never (or another output.dir) to train a new draft"
    )


def rotate(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and stale temporary directories."""
    for stale in root.glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
