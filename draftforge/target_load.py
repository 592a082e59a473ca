"""Reading a target's checkpoint: its safetensors files, the model class's key conversion,
and sharded loading, where each rank materialises only what it owns.

Sharded loading (:func:`load_sharded_target`) builds the target on the meta device, lays it
out as ``parallel`` says (tensor parallelism by the model's own plan over the tp ranks, then
FSDP2 per decoder layer over the dp ranks, :func:`draftforge.parallel.shard_target`),
allocates each rank's shards only, and fills them from the checkpoint's safetensors files as
lazy slices: every checkpoint tensor is cut to this rank's piece before it is read, so a rank
never holds more than its shards plus the tensor in flight. MoE experts are sharded like every
other weight (FSDP shards a fused expert tensor's dim 0, the experts; a checkpoint with one
tensor per expert is read only for the experts this rank owns).

Checkpoint keys map to parameters by the model class's own key conversion, as
``from_pretrained`` maps them: renamings, and converters such as the per-expert weights merged
into one fused tensor (:class:`KeyMap`). The cut to a rank's piece is transformers' own
shard-on-read, which knows every placement (contiguous, strided, per expert). Non-persistent
buffers (rotary frequencies, embedding scales) are then recomputed by the model's own weight
init, which skips every loaded tensor, and tied weights are tied again.

The layout is checked against ``config.json`` before any weight is read
(:func:`draftforge.parallel.tp_problem`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from draftforge import parallel
from draftforge.config import ConfigError, TargetConfig
from draftforge.parallel import Layout
from draftforge.target import (
    Target,
    TargetError,
    checked_aux_layers,
    decoder_layers,
    decoder_module,
    is_vision_config,
    load_target,
    load_tokenizer,
    pick_dtype,
    read_config,
    read_generation_config,
    resolve_target_path,
)

INDEX = "model.safetensors.index.json"


def local_directory(path: str) -> Path:
    """The folder holding the target's files (a hub id's are fetched, weights as safetensors)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))


def weight_files(directory: Path) -> dict[str, Path]:
    """Each tensor name of the checkpoint and the safetensors file holding it (headers only)."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / file for key, file in weight_map.items()}
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found.update(dict.fromkeys(f.keys(), file))
    return found


def read_tensor(file: Path, key: str, cut: Callable[[Any], Tensor | None] | None = None) -> Any:
    """One tensor of a safetensors file, or ``cut(lazy slice)``; a one-line TargetError naming
    the file if it cannot be read. The file is open (mapped) only during the read."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key) if cut is None else cut(f.get_slice(key))
    except (OSError, SafetensorError) as err:
        raise TargetError(f"{file}: cannot read {key} ({str(err).splitlines()[0]})") from None


def meta_model(
    config: Any,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    *,
    tied: bool = True,
) -> nn.Module:
    """The target's model class built on the meta device: names, shapes and dtypes, no data.
    ``tied=False`` leaves tied weights apart (as ``from_pretrained`` builds a model to load
    into), so that tensor parallelism shards each by its own rule before they are tied."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.initialization import no_tie_weights

    kwargs = {"dtype": dtype} if dtype is not None else {}
    auto = AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM
    with torch.device("meta"), nullcontext() if tied else no_tie_weights():
        return auto.from_config(config, trust_remote_code=trust_remote_code, **kwargs)


@dataclass
class KeyMap:
    """How ``from_pretrained`` maps a model class's checkpoint keys to its parameter names."""

    renamings: list[Any]  # transformers WeightRenaming rules
    converters: list[Any]  # transformers WeightConverter rules (merge, split, fuse)
    prefix: str  # the base model prefix, added or stripped as the model's names need
    names: dict[str, Any]  # the model's state dict on the meta device

    @classmethod
    def of(cls, model: nn.Module) -> KeyMap:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        transforms = get_model_conversion_mapping(model)
        return cls(
            renamings=[t for t in transforms if not isinstance(t, WeightConverter)],
            converters=[t for t in transforms if isinstance(t, WeightConverter)],
            prefix=model.base_model_prefix,
            names=model.state_dict(),
        )

    def rename(self, key: str) -> tuple[str, str | None]:
        """A checkpoint key's parameter name, and the source pattern of the converter that
        merges it with other keys (None for a plain rename)."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(key, self.renamings, self.converters, self.prefix, self.names)

    def converter(self, pattern: str) -> Any:
        """A fresh copy of the converter owning the source ``pattern`` (one per parameter)."""
        return deepcopy(next(c for c in self.converters if pattern in c.source_patterns))


def load_sharded_target(cfg: TargetConfig, layout: Layout, *, fsdp: bool) -> Target:
    """The target with this rank's shards only: tensor parallel over the tp ranks, and FSDP2
    over the dp ranks when ``fsdp``; a layout that shards nothing reads it whole, the same way
    (one tensor in flight, where ``from_pretrained`` holds about twice the target at its peak
    on CPU), or with :func:`~draftforge.target.load_target` when the checkpoint has no
    safetensors files. A layout that cannot split this target is a :class:`ConfigError`
    before any weight is read."""
    path = resolve_target_path(cfg.path, cfg.cache_dir)
    config = read_config(path, cfg.trust_remote_code)
    problem = parallel.tp_problem(config.get_text_config(), layout.tp, layout.world)
    if problem:
        raise ConfigError(problem)
    if is_vision_config(config):
        if layout.tp > 1 or (fsdp and layout.dp > 1):
            raise ConfigError("a vision-language target loads whole: use parallel.tp=1, no FSDP")
        return load_target(cfg, layout.device)
    directory = local_directory(path)
    files = weight_files(directory)
    if not files:
        if layout.tp == 1 and not (fsdp and layout.dp > 1):
            return load_target(cfg, layout.device)  # nothing to shard: from_pretrained reads it
        raise TargetError(
            f"{directory} has no .safetensors files, which sharded loading reads: save the model "
            "with save_pretrained (safetensors), or use parallel.tp=1 and parallel.fsdp none or draft"
        )
    model = meta_model(
        config, pick_dtype(cfg.dtype, layout.device), cfg.trust_remote_code, tied=False
    )
    if layout.tp > 1:
        _tensor_parallel(model, layout)
    if fsdp:
        parallel.shard_target(model, layout, decoder_module(model), decoder_layers(model))
    model.to_empty(device=layout.device)
    model.tie_weights()
    with torch.no_grad():
        _fill(model, files, KeyMap.of(model), directory)
        _init_buffers(model)
    generation = read_generation_config(path)
    if generation is not None:
        model.generation_config = generation
    model.eval().requires_grad_(False)
    aux = checked_aux_layers(cfg, config.get_text_config().num_hidden_layers)
    return Target(
        model=model,
        tokenizer=load_tokenizer(path, cfg.trust_remote_code),
        aux_layers=aux,
        path=path,
    )


def target_for_layout(
    cfg: TargetConfig, target: Target | None, layout: Layout, *, fsdp: bool
) -> Target:
    """The target as this rank runs it: read with its shards only
    (:func:`load_sharded_target`) unless given; a given, whole target is FSDP-sharded after
    the fact when ``fsdp``, and cannot be tensor-parallel."""
    if target is None:
        return load_sharded_target(cfg, layout, fsdp=fsdp)
    if layout.tp > 1:
        raise ConfigError(
            f"parallel.tp={layout.tp} needs the target read by draftforge, each rank its "
            "pieces: pass no loaded target"
        )
    if fsdp:
        model = target.model
        parallel.shard_target(model, layout, decoder_module(model), decoder_layers(model))
    return target


def _tensor_parallel(model: nn.Module, layout: Layout) -> None:
    """Shard the meta model over the tp ranks by its own tensor-parallel plan, with the
    forward hooks that plan installs (as ``from_pretrained(tp_plan="auto")`` does)."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    plan, _, _ = model._resolve_parallel_plans(DistributedConfig(tp_size=layout.tp, tp_plan="auto"))
    apply_tensor_parallelism(model, layout.tp_mesh(), plan)


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and persistent buffer by each of its names (tied ones under both)."""
    found = dict(model.named_parameters(remove_duplicate=False))
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found[f"{module_name}.{name}" if module_name else name] = buffer
    return found


def _local(t: Tensor) -> Tensor:
    """This rank's piece of a possibly sharded tensor (a view: writing it fills the shard)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _cut(target: Tensor, index: int | None) -> Callable[[Any], Tensor | None]:
    """Cut a lazy checkpoint slice to this rank's piece of ``target`` in its dtype: a DTensor's
    local shard (None for an expert this rank does not own, when the checkpoint stores one
    tensor per expert and ``index`` says which), or all of a plain tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        return lambda lazy: lazy[...].to(dtype=target.dtype)
    from transformers.distributed.sharding_utils import DtensorShardOperation

    shard = DtensorShardOperation(target)
    return lambda lazy: shard.shard_tensor(lazy, tensor_idx=index, dtype=target.dtype)


def _fill(model: nn.Module, files: dict[str, Path], keys: KeyMap, directory: Path) -> None:
    """Fill every parameter and persistent buffer's local piece from the checkpoint, one
    parameter at a time; a TargetError naming the checkpoint if one is missing or misfits."""
    from transformers.core_model_loading import WeightRenaming, dot_natural_key

    tensors = _tensors(model)
    transforms: dict[str, Any] = {}
    for key in sorted(files, key=dot_natural_key):
        name, pattern = keys.rename(key)
        if name not in tensors:
            continue  # not a weight of this class (an old rotary buffer, say), as from_pretrained
        if pattern is None:
            transform, pattern, index = (
                transforms.setdefault(name, WeightRenaming(key, name)),
                key,
                None,
            )
        else:
            transform = transforms.setdefault(name, keys.converter(pattern))
            index = len(transform.collected_tensors.get(pattern, []))
        cut = _cut(tensors[name], index)
        transform.add_tensor(
            name, key, pattern, lambda f=files[key], k=key, c=cut: read_tensor(f, k, c)
        )
    filled: set[int] = set()
    for name, transform in transforms.items():
        for target, value in transform.convert(name, model=model, config=model.config).items():
            value = value[0] if isinstance(value, list) else value
            local = _local(tensors[target])
            if value.shape != local.shape:
                raise TargetError(
                    f"{directory}: {target} is {tuple(value.shape)} in this rank's piece of the "
                    f"checkpoint but {tuple(local.shape)} in the model; does config.json match?"
                )
            local.copy_(value)
            tensors[target]._is_hf_initialized = True  # the model's init leaves it alone
            filled.add(id(tensors[target]))
    missing = sorted(n for n, t in tensors.items() if id(t) not in filled)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise TargetError(f"{directory}: the checkpoint has no {shown}; is it complete?")


def _init_buffers(model: nn.Module) -> None:
    """Recompute the non-persistent buffers (rotary frequencies and the like), which no
    checkpoint holds, by the model's own weight init; loaded tensors are marked and skipped."""
    model.initialize_weights()
