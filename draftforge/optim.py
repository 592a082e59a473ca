"""The draft's optimizers: AdamW, plain SGD, or Muon for its hidden matrices with AdamW beside.

Muon (``torch.optim.Muon``) orthogonalises each 2-D weight's momentum with a Newton-Schulz
iteration. It is meant for hidden matrices only, so under ``training.optimizer=muon`` the
draft's fused-feature projection and its decoder layer's matrices get Muon, and everything
else (the output head, the norms) gets AdamW. Muon's update is scaled to AdamW's RMS
(``adjust_lr_fn="match_rms_adamw"``), so one ``training.lr`` and one schedule serve both.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from draftforge.config import ConfigError, TrainingConfig

# Parameters that are matrices but not hidden ones: Muon is not meant for input and output
# layers (the frozen embedding has no gradient and is never optimised).
NOT_HIDDEN = ("lm_head.", "embed_tokens.")


def build_optimizers(draft: nn.Module, tc: TrainingConfig) -> list[torch.optim.Optimizer]:
    """The optimizers of ``draft``'s trainable parameters, as ``tc.optimizer`` says (one,
    or Muon and AdamW for ``muon``); each covers a fixed set of parameters, in module order."""
    named = [(n, p) for n, p in draft.named_parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        return [torch.optim.SGD([p for _, p in named], lr=tc.lr, weight_decay=tc.weight_decay)]
    adamw = {"lr": tc.lr, "betas": tuple(tc.betas), "weight_decay": tc.weight_decay}
    if tc.optimizer == "adamw":
        return [torch.optim.AdamW([p for _, p in named], **adamw)]
    hidden = {n for n, p in named if p.ndim == 2 and not n.startswith(NOT_HIDDEN)}
    muon = torch.optim.Muon(
        [p for n, p in named if n in hidden],
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        adjust_lr_fn="match_rms_adamw",
    )
    return [muon, torch.optim.AdamW([p for n, p in named if n not in hidden], **adamw)]


def check_same_optimizer(step_dir: Path, tc: TrainingConfig) -> None:
    """Refuse to resume ``step_dir`` with another optimizer: its state would not fit."""
    try:
        saved = yaml.safe_load((step_dir / "config.yaml").read_text())["training"]["optimizer"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return  # no record to hold the run against: loading the state will tell
    if saved != tc.optimizer:
        raise ConfigError(
            f"{step_dir} was trained with training.optimizer={saved} and this run says "
            f"{tc.optimizer}: add training.optimizer={saved} to resume it, or "
            "training.resume=never (or another output.dir) to train a new draft"
        )
