"""Training metrics: per-step sums, the summaries logged from them, and where they go.

Every figure is computed from summed counters (supervised positions, correct predictions,
cross-entropy per TTT step), so a window of steps or a held-out pass over many micro-batches
and ranks gives the same numbers as one big batch would.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from draftforge import ttt
from draftforge.config import Config, ConfigError, to_dict


@dataclass
class StepStats:
    """Sums over one optimizer step (all its micro-batches), as tensors: no host sync."""

    loss: Tensor
    ce_sums: Tensor  # [K]
    correct: Tensor  # [K]
    counts: Tensor  # [K]
    tokens: int
    grad_norm: Tensor = field(default_factory=lambda: torch.zeros(()))


def summarize(loss: float, correct: Tensor, counts: Tensor, ce_sums: Tensor) -> dict[str, float]:
    """Loss, per-step accuracy/CE and the AL estimate from summed counters."""
    acc = correct.double().cpu() / counts.double().clamp(min=1)
    metrics = {"loss": loss, "al_estimate": float(ttt.acceptance_length(acc))}
    for k in range(len(acc)):
        metrics[f"acc_{k}"] = float(acc[k])
        metrics[f"ce_{k}"] = float(ce_sums[k].cpu().double() / counts[k].clamp(min=1))
    return metrics


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """The console line of one held-out evaluation: step, loss, acc_k, AL estimate."""
    accs = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("acc_"))
    return (
        f"eval step {step} loss {metrics['loss']:.4f} {accs} "
        f"al_estimate {metrics['al_estimate']:.3f}"
    )


def window_metrics(
    window: list[StepStats], elapsed: float, lr: float, skipped: int
) -> dict[str, float]:
    loss = float(torch.stack([s.loss for s in window]).mean())
    correct = sum(s.correct for s in window)
    counts = sum(s.counts for s in window)
    ce_sums = sum(s.ce_sums for s in window)
    metrics = summarize(loss, correct, counts, ce_sums)
    metrics["grad_norm"] = float(torch.stack([s.grad_norm for s in window]).mean())
    metrics["lr"] = lr
    metrics["tokens_per_s"] = sum(s.tokens for s in window) / max(elapsed, 1e-9)
    metrics["skipped_batches"] = skipped
    return metrics


WANDB_ID_FILE = "wandb_run_id"


class Trackers:
    """metrics.jsonl always; tensorboard and wandb when asked for (optional extras).
    Only rank 0 writes (``enabled``).

    A run resumed at ``step`` writes only the steps after it, wherever they go: metrics.jsonl
    drops the records after it, tensorboard purges its events after it (``purge_step``), and
    wandb continues the same run, whose id the run directory keeps (``wandb_run_id``; wandb
    ignores, with a warning, steps that an interrupted run had logged after its checkpoint:
    the resumed run computes the same values). A run that starts at step 0 starts a new
    wandb run.
    """

    def __init__(
        self, names: list[str], run_dir: Path, cfg: Config, enabled: bool = True, step: int = 0
    ) -> None:
        path = run_dir / "metrics.jsonl"
        if enabled and path.exists():
            _keep_records_up_to(path, step)
        self.jsonl = path.open("a") if enabled else None
        self.tb = self.wandb = None
        for name in names:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ConfigError(
                        "training.trackers has tensorboard: pip install 'draftforge[tensorboard]'"
                    ) from None
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1)
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise ConfigError(
                        "training.trackers has wandb: pip install 'draftforge[wandb]'"
                    ) from None
                self.wandb = wandb.init(
                    project="draftforge",
                    dir=str(run_dir),
                    config=to_dict(cfg),
                    id=_wandb_id(run_dir, step),
                    resume="allow",
                )

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(f"{split}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path, step: int) -> str:
    """The wandb run id kept in ``run_dir``: the recorded one when resuming, else a new one."""
    path = run_dir / WANDB_ID_FILE
    if step > 0 and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order; lines that are not records are skipped."""
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "split" in record and "step" in record:
            records.append(record)
    return records


def _keep_records(lines: list[bytes], step: int) -> tuple[list[str], int]:
    """The records of steps up to ``step``, and how many lines were not records at all."""
    kept, damaged = [], 0
    for line in lines:
        try:
            record = json.loads(line)
            if record["step"] <= step:
                kept.append(line.decode())
        except (ValueError, KeyError, TypeError):
            damaged += 1
    return kept, damaged


def _keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records a resumed run repeats (those after its checkpoint's ``step``).

    The file is replaced atomically; lines that are not records (a damaged file) are left
    out, and the file as found is kept beside it, so nothing is lost.
    """
    data = path.read_bytes()
    kept, damaged = _keep_records(data.splitlines(), step)
    if damaged:
        aside = path.with_name(f"{path.name}.damaged")
        aside.write_bytes(data)
        print(f"{path}: {damaged} damaged lines left out; the file as found is in {aside}")
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
