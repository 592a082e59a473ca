"""What training and capture use of a vision-language target besides its feature sources:
its conversations with images prepared through its processor, a sample's features from one
forward with its images, and a capture's stored position ids on the dataset's rows.

Training from a capture loads the target's head only (:mod:`draftforge.target_head`), so its
data is prepared without the model: the processor comes from the checkpoint's files and the
position ids from the model class on the meta device (Qwen-VL's ``get_rope_index`` reads
the config only). The draft then rotates by the positions the capture stored, those the
language model used in the captured forward (:class:`CapturedPositions`), as online training
gives it the positions of the prepared rows. The feature sources themselves, online and
offline: :mod:`draftforge.features`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from draftforge.config import Config, ConfigError, cache_root
from draftforge.shards import ShardReader
from draftforge.target import Target, is_vision_config
from draftforge.vision_target import (
    VisionFeatures,
    sample_positions,
    vision_batch,
    vision_features,
)

if TYPE_CHECKING:
    from draftforge.data import PrepareResult
    from draftforge.data.vision import VisionSample


class TargetFiles(Protocol):
    """What preparing conversations with images reads of a target: a loaded one
    (:class:`~draftforge.target.TargetParts`) or what ``draftforge check`` reads of its
    files."""

    path: str
    tokenizer: Any
    model_config: Any
    vocab_size: int


def prepare_vision_data(cfg: Config, target: TargetFiles) -> PrepareResult:
    """``data.path``'s conversations with images, through a VL target's processor, with
    the position ids its language model computes for each sample, and the draft vocabulary
    (what :func:`prepare_data` is for text conversations).

    The loaded target's processor and model are used; for training from a capture, which
    loads the target's head only, and for ``draftforge check``, which loads no weights, the
    processor is built from the checkpoint's files and the
    positions come from the model class on the meta device (its ``get_rope_index`` reads
    the config only), though training then rotates by the positions the capture stored.
    """
    from draftforge.data.vision import VisionProcessor
    from draftforge.data.vision_prepare import prepare_vision
    from draftforge.target_load import meta_model

    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at a conversations file or directory")
    if not is_vision_config(target.model_config):
        raise ConfigError(f"{target.path} is no vision-language target: use prepare_data")
    if isinstance(target, Target) and target.processor is not None:
        processor, model, device = target.processor, target.model, target.device
    else:
        processor = VisionProcessor.from_checkpoint(target.path, target.tokenizer)
        model, device = meta_model(target.model_config), torch.device("cpu")

    def positions(sample: VisionSample) -> Tensor:
        batch = {k: v.to(device) for k, v in vision_batch([sample]).items()}
        return sample_positions(model, batch)

    # The draft vocabulary's folder, one per data, target, length and template variables
    # (the samples stay in memory: nothing else is cached yet); its name is the dataset's
    # key in a capture's settings.
    kwargs = json.dumps(cfg.data.chat_template_kwargs or {}, sort_keys=True)
    key = f"{Path(cfg.data.path).resolve()}|{target.path}|{cfg.data.max_length}|{kwargs}"
    folder = f"vision-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return prepare_vision(
        cfg.data.path,
        processor,
        positions,
        cache_root(cfg.target.cache_dir) / "datasets" / folder,
        max_length=cfg.data.max_length,
        strict=cfg.data.strict,
        chat_template_kwargs=cfg.data.chat_template_kwargs,
        draft_vocab_size=cfg.draft.draft_vocab_size,
        target_vocab_size=target.vocab_size,
    )


class CapturedPositions:
    """A prepared dataset whose rows' position ids are read from a capture (the ids the
    target's language model used in the captured forward); all else is the dataset's."""

    def __init__(self, dataset: Any, reader: ShardReader) -> None:
        self.dataset, self.reader = dataset, reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "position_ids": self.reader.positions(i)}


def vision_states(target: Target, sample: VisionSample) -> VisionFeatures:
    """A VL target's features of one sample, from one forward with its images: online
    training and capture both run each sample alone this way."""
    batch = {k: v.to(target.device) for k, v in vision_batch([sample]).items()}
    return vision_features(target.model, target.aux_layers, batch)
