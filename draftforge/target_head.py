"""The target without its decoder layers, for training from captured features.

Training from a capture needs of the target only its output head (+ final logit softcap) for
the teacher, and what the draft is built from: config, tokenizer, input embedding. This reads
just those tensors from the checkpoint's safetensors files, so the memory of offline training
does not grow with the target's depth.

The tensors' names come from the model class itself: the model is built on the meta device,
its output and input embeddings' parameter names are taken (a tied head shares the
embedding's), and each checkpoint key is mapped to a parameter name by the checkpoint's own
key conversion, as ``from_pretrained`` maps it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from draftforge.config import TargetConfig
from draftforge.target import (
    TargetError,
    TargetParts,
    checked_aux_layers,
    load_target,
    load_tokenizer,
    pick_dtype,
    read_config,
    read_generation_config,
    resolve_target_path,
)
from draftforge.target_load import (
    INDEX,
    KeyMap,
    local_directory,
    meta_model,
    read_tensor,
    weight_files,
)

Rename = Callable[[str], "str | None"]


@dataclass
class HeadTarget(TargetParts):
    """The target's config, tokenizer, output head and input embedding; no decoder layers."""

    tokenizer: object
    aux_layers: list[int]
    path: str
    model_config: Any
    generation_config: Any
    dtype: torch.dtype
    device: torch.device
    head: tuple[Tensor, Tensor | None]
    embedding: Tensor

    @property
    def vocab_size(self) -> int:
        return self.head[0].shape[0]

    def embed_weight(self) -> Tensor:
        return self.embedding

    def lm_head(self) -> tuple[Tensor, Tensor | None]:
        return self.head


def load_target_head(cfg: TargetConfig, device: torch.device | str = "cpu") -> TargetParts:
    """The target's head and embedding read from its safetensors (in ``pick_dtype``'s dtype,
    on ``device``), with its config and tokenizer; a checkpoint without safetensors files is
    loaded whole (:func:`~draftforge.target.load_target`)."""
    device = torch.device(device)
    path = resolve_target_path(cfg.path, cfg.cache_dir)
    directory = local_directory(path)
    files = weight_files(directory)
    if not files:
        return load_target(cfg, device)
    config = read_config(path, cfg.trust_remote_code)
    generation = read_generation_config(path)
    keys = _checkpoint_keys(directory, files, *_parameter_names(config, cfg.trust_remote_code))
    dtype = pick_dtype(cfg.dtype, device)
    read: dict[str, Tensor] = {}

    def tensor(part: str) -> Tensor:
        if keys[part] not in read:
            read[keys[part]] = read_tensor(files[keys[part]], keys[part]).to(
                device=device, dtype=dtype
            )
        return read[keys[part]]

    bias = tensor("head.bias") if "head.bias" in keys else None
    return HeadTarget(
        tokenizer=load_tokenizer(path, cfg.trust_remote_code),
        aux_layers=checked_aux_layers(cfg, config.get_text_config().num_hidden_layers),
        path=path,
        model_config=config,
        generation_config=generation,
        dtype=dtype,
        device=device,
        head=(tensor("head.weight"), bias),
        embedding=tensor("embedding"),
    )


def _parameter_names(config: Any, trust_remote_code: bool) -> tuple[dict[str, set[str]], Rename]:
    """Every name of the output head's weight (and bias) and of the input embedding in the
    model class, built on the meta device (``head.weight``, ``head.bias`` when the head has
    one, ``embedding``; a tied head shares the embedding's names), and the checkpoint's key
    conversion: a checkpoint key to the parameter name ``from_pretrained`` loads it into, or
    None when a converter merges it with others."""
    model = meta_model(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    parts: dict[str, nn.Parameter] = {
        "head.weight": head.weight,
        "embedding": model.get_input_embeddings().weight,
    }
    if getattr(head, "bias", None) is not None:
        parts["head.bias"] = head.bias
    named = list(model.named_parameters(remove_duplicate=False))
    names = {part: {n for n, p in named if p is param} for part, param in parts.items()}
    keys = KeyMap.of(model)

    def rename(key: str) -> str | None:
        name, merged = keys.rename(key)
        return None if merged is not None else name

    return names, rename


def _checkpoint_keys(
    directory: Path, files: dict[str, Path], names: dict[str, set[str]], rename: Rename
) -> dict[str, str]:
    """The checkpoint key of each part; a one-line TargetError naming the checkpoint when the
    head or the embedding is not in it."""
    keys: dict[str, str] = {}
    for key in files:
        name = rename(key)
        for part, part_names in names.items():
            if name in part_names and part not in keys:
                keys[part] = key
    for part, part_names in names.items():
        if part not in keys:
            where = directory / INDEX if (directory / INDEX).is_file() else directory
            what = "output head" if part.startswith("head") else "input embedding"
            raise TargetError(
                f"{where}: the target's {what} ({' or '.join(sorted(part_names))}) is not in "
                "the checkpoint; is it complete?"
            )
    return keys
