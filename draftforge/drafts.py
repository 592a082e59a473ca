"""Read, load and check EAGLE-3 drafts, whatever wrote them.

A draft is read from a training checkpoint or run directory, from one of the exports
:mod:`draftforge.export` writes (sglang, vllm, draftforge), or from another trainer's
SGLang-layout (``LlamaForCausalLMEagle3``) or speculators eagle3 directory. Reading gives a
:class:`DraftState` in draftforge's own terms; :func:`build_draft_module` turns it into an
:class:`Eagle3Draft`, taking what the format left out from the target.

Conventions that differ between formats, undone on reading:

- Aux layers: draftforge and SGLang count "output of layer i" (0-based); vLLM and speculators
  count Hugging Face ``hidden_states`` indices, which are one more (index 0 is the embedding).
- Names: SGLang accepts a ``model.`` prefix; speculators and vLLM name the decoder layer
  ``layers.0``.
- ``d2t[i]`` is an offset: ``target_id = i + d2t[i]``; ``t2d`` is a bool mask over the target
  vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from transformers import LlamaConfig, PretrainedConfig

from draftforge import checkpoint
from draftforge.config import ConfigError, TargetConfig, from_dict
from draftforge.models.eagle3 import SGLANG_ARCH, DraftShapeError, Eagle3Draft, eagle3_config
from draftforge.target import (
    Target,
    TargetParts,
    aux_problem,
    default_aux_layers,
    safetensors_files,
)

EXPORTABLE_ARCHS: tuple[str, ...] = ("eagle3",)  # draft.arch values read from checkpoints
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RUN_CONFIG_FILE = "run_config.yaml"  # the run's config, as a draftforge export keeps it
# Every export writes it: where it came from, and the size and sha256 of each file beside it.
PROVENANCE_FILE = "draftforge_export.json"
EMBEDDING = "embed_tokens.weight"

# Flags of other EAGLE-3 variants (extra norms, post-norm feedback); our draft has none of them.
# They are never written, and a draft that sets one cannot be loaded into our architecture.
VARIANT_FLAGS: tuple[str, ...] = ("norm_before_fc", "fc_norm", "norm_output")
_LAYER_PREFIX = "midlayer."  # our (and SGLang's) name for the decoder layer
_SPECULATORS_LAYER_PREFIX = "layers.0."  # speculators' and vLLM's name for it


class DraftError(RuntimeError):
    """A draft cannot be read, loaded or exported; the one-line message says why and what to do."""


# ----------------------------------------------------------------------------- shapes and names


@dataclass(frozen=True)
class Dims:
    """Every size a draft's tensors depend on."""

    hidden: int
    target_hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    draft_vocab: int

    @classmethod
    def of(cls, config: LlamaConfig) -> Dims:
        return cls(
            hidden=config.hidden_size,
            target_hidden=config.target_hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            draft_vocab=config.draft_vocab_size,
        )


def tensor_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """Every tensor of an EAGLE-3 draft under our names, embedding included."""
    layer = {
        "input_layernorm.weight": (d.hidden,),
        "hidden_norm.weight": (d.hidden,),
        "self_attn.q_proj.weight": (d.heads * d.head_dim, 2 * d.hidden),
        "self_attn.k_proj.weight": (d.kv_heads * d.head_dim, 2 * d.hidden),
        "self_attn.v_proj.weight": (d.kv_heads * d.head_dim, 2 * d.hidden),
        "self_attn.o_proj.weight": (d.hidden, d.heads * d.head_dim),
        "post_attention_layernorm.weight": (d.hidden,),
        "mlp.gate_proj.weight": (d.intermediate, d.hidden),
        "mlp.up_proj.weight": (d.intermediate, d.hidden),
        "mlp.down_proj.weight": (d.hidden, d.intermediate),
    }
    return {
        EMBEDDING: (d.vocab, d.hidden),
        "fc.weight": (d.hidden, 3 * d.target_hidden),
        **{_LAYER_PREFIX + name: shape for name, shape in layer.items()},
        "norm.weight": (d.hidden,),
        "lm_head.weight": (d.draft_vocab, d.hidden),
        "d2t": (d.draft_vocab,),
        "t2d": (d.vocab,),
    }


def speculators_name(ours: str) -> str:
    """Our tensor name -> speculators'/vLLM's (the decoder layer is ``layers.0``)."""
    if ours.startswith(_LAYER_PREFIX):
        return _SPECULATORS_LAYER_PREFIX + ours.removeprefix(_LAYER_PREFIX)
    return ours


def our_name(name: str) -> str:
    """Any known spelling -> ours: SGLang accepts a ``model.`` prefix, speculators and vLLM
    name the decoder layer ``layers.0``."""
    name = name.removeprefix("model.")
    if name.startswith(_SPECULATORS_LAYER_PREFIX):
        return _LAYER_PREFIX + name.removeprefix(_SPECULATORS_LAYER_PREFIX)
    return name


# ----------------------------------------------------------------------------- configs


def draft_aux_layers(config: PretrainedConfig) -> list[int] | None:
    """The aux layers a draft was trained on ("output of layer i"), if its config names them."""
    eagle = getattr(config, "eagle_config", None) or {}
    aux = eagle.get("eagle_aux_hidden_state_layer_ids")
    return list(aux) if aux is not None else None


def draft_config(
    fields: dict,
    *,
    draft_vocab_size: int,
    target_hidden_size: int,
    aux_layers: list[int] | None,
    where: str,
) -> LlamaConfig:
    """Our draft config from a Llama config dict as any trainer writes it (rope_theta and
    rope_scaling or transformers-5 rope_parameters, optional head_dim/kv heads), refusing what
    our draft lacks."""
    if fields.get("num_hidden_layers", 1) != 1:
        raise DraftError(
            f"{where}: {fields['num_hidden_layers']} decoder layers; draftforge's EAGLE-3 draft has one"
        )
    if fields.get("tie_word_embeddings", False):
        raise DraftError(
            f"{where}: tie_word_embeddings is true (the head would be the embedding); "
            "an EAGLE-3 draft has its own lm_head"
        )
    for bias in ("attention_bias", "mlp_bias"):
        if fields.get(bias, False):
            raise DraftError(f"{where}: {bias} is true; draftforge's draft has no biases")
    # Let transformers standardise the RoPE spelling (rope_theta/rope_scaling or rope_parameters);
    # on a deep copy, as it edits the nested RoPE dicts in place.
    layer = LlamaConfig.from_dict(
        copy.deepcopy({k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    )
    return eagle3_config(
        layer,
        draft_vocab_size=draft_vocab_size,
        target_hidden_size=target_hidden_size,
        aux_layers=aux_layers,
    )


def parse_sglang_config(cfg: dict, where: str) -> LlamaConfig:
    """An SGLang-layout ``config.json`` (ours or another trainer's) -> our draft config."""
    if SGLANG_ARCH not in (cfg.get("architectures") or []):
        raise DraftError(
            f"{where}: architectures {cfg.get('architectures')} do not include {SGLANG_ARCH}; "
            "not an EAGLE-3 draft"
        )
    aux = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    return draft_config(
        cfg,
        # SGLang reads a missing draft_vocab_size as the full vocabulary.
        draft_vocab_size=cfg.get("draft_vocab_size") or cfg["vocab_size"],
        target_hidden_size=cfg.get("target_hidden_size") or cfg["hidden_size"],
        aux_layers=list(aux) if aux else None,
        where=where,
    )


def parse_speculators_config(cfg: dict, where: str) -> LlamaConfig:
    """A speculators ``config.json`` (eagle3) -> our draft config (aux ids shifted back by 1)."""
    if cfg.get("speculators_model_type") != "eagle3":
        raise DraftError(
            f"{where}: speculators_model_type {cfg.get('speculators_model_type')!r}; "
            "only eagle3 drafts load into draftforge"
        )
    layer = cfg.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise DraftError(f"{where}: transformer_layer_config is missing or not a mapping")
    if layer.get("model_type", "llama") != "llama":
        raise DraftError(
            f"{where}: a {layer['model_type']!r} decoder layer; draftforge's draft is a Llama layer"
        )
    # vLLM reads a missing flag as True, and True is not our architecture.
    if cfg.get("norm_before_residual", True):
        raise DraftError(
            f"{where}: norm_before_residual is true or missing (vLLM reads missing as true); "
            "draftforge's residual is the un-normalised hidden state"
        )
    for flag in VARIANT_FLAGS:
        if cfg.get(flag):
            raise DraftError(f"{where}: {flag} is set; draftforge's draft has no such variant")
    aux_hf = cfg.get("eagle_aux_hidden_state_layer_ids")
    return draft_config(
        layer,
        draft_vocab_size=cfg.get("draft_vocab_size") or layer["vocab_size"],
        target_hidden_size=cfg.get("target_hidden_size") or layer["hidden_size"],
        aux_layers=[i - 1 for i in aux_hf] if aux_hf else None,
        where=where,
    )


# ----------------------------------------------------------------------------- checks


def check_tensors(
    expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor], where: str
) -> None:
    """Exactly the expected names (no stray prefixes, none missing), each of its shape."""
    missing = sorted(set(expected) - set(tensors))
    stray = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k} {list(tensors[k].shape)} != {list(shape)}"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if stray:
        problems.append(f"unexpected {stray}")
    if wrong:
        problems.append(f"wrong shapes: {', '.join(wrong)}")
    if problems:
        raise DraftError(f"{where}: {'; '.join(problems)}")


def check_vocab_map(d2t: Tensor, t2d: Tensor, where: str) -> None:
    """d2t offsets land on distinct target ids, and t2d marks exactly those."""
    ids = torch.arange(d2t.numel()) + d2t.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= t2d.numel()):
        raise DraftError(
            f"{where}: d2t maps outside the target vocabulary (target_id = i + d2t[i])"
        )
    if (
        ids.unique().numel() != ids.numel()
        or int(t2d.sum()) != ids.numel()
        or not bool(t2d[ids].all())
    ):
        raise DraftError(
            f"{where}: d2t and t2d disagree (t2d must mark exactly the ids i + d2t[i])"
        )


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
    aux = draft_aux_layers(config)
    aux_reason = None if aux is None else aux_problem(aux, target.num_layers)
    if aux_reason:
        problems.append(aux_reason)
    if problems:
        raise DraftShapeError(f"the draft does not fit target {target.path}: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- reading


@dataclass
class DraftState:
    """A draft in draftforge's own terms, whatever it was read from: the config (aux ids as
    "output of layer i"), tensors under our names without the embedding, and the target's
    embedding when the source carried it."""

    config: LlamaConfig
    weights: dict[str, Tensor]
    embedding: Tensor | None = None

    @property
    def aux_layers(self) -> list[int] | None:
        return draft_aux_layers(self.config)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint step directory as is; a run directory (or its ``checkpoints/``) -> its
    newest checkpoint that passes the manifest check."""
    if (path / checkpoint.MANIFEST).is_file():
        return path
    for root in (path / "checkpoints", path):
        if checkpoint.list_checkpoints(root):
            found = checkpoint.latest_valid(root)
            if found is None:
                raise DraftError(f"{root}: no checkpoint passes its manifest check")
            return found
    raise DraftError(
        f"{path} is neither a checkpoint (step_XXXXXXXX/ with {checkpoint.MANIFEST}) "
        "nor a run directory holding checkpoints"
    )


def read_checkpoint(step_dir: Path) -> tuple[DraftState, TargetConfig]:
    """A verified training checkpoint -> its draft (no embedding: it is the target's) and the
    run's target section."""
    run_file = step_dir / "config.yaml"
    try:
        raw = yaml.safe_load(run_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DraftError(f"{step_dir}: no readable config.yaml ({err})") from None
    arch = (raw.get("draft") or {}).get("arch", "eagle3")
    if arch not in EXPORTABLE_ARCHS:
        raise DraftError(
            f"{step_dir}: draft.arch {arch!r} cannot be exported; supported: {', '.join(EXPORTABLE_ARCHS)}"
        )
    # Only the target section matters here: a checkpoint written before another section's
    # options changed still exports.
    try:
        target = from_dict({"target": raw.get("target") or {}}).target
    except ConfigError as err:
        raise DraftError(f"{run_file}: {err}") from None
    checkpoint.verify(step_dir)
    try:
        config = LlamaConfig.from_json_file(step_dir / "draft_config.json")
    except (OSError, ValueError) as err:
        raise DraftError(f"{step_dir}: no readable draft_config.json ({err})") from None
    if config.architectures != [SGLANG_ARCH]:
        raise DraftError(
            f"{step_dir}: draft architectures {config.architectures}; only {SGLANG_ARCH} exports"
        )
    weights = load_file(step_dir / checkpoint.WEIGHTS)
    check_tensors(
        {k: v for k, v in tensor_shapes(Dims.of(config)).items() if k != EMBEDDING},
        weights,
        str(step_dir),
    )
    return DraftState(config=config, weights=weights), target


def _read_weights(directory: Path) -> dict[str, Tensor]:
    files = safetensors_files(directory)
    if files:
        weights: dict[str, Tensor] = {}
        for file in files:
            try:
                weights.update(load_file(file))
            except (SafetensorError, OSError) as err:
                raise DraftError(
                    f"{file}: not a readable safetensors file ({err}); the draft is damaged: "
                    "export or download it again"
                ) from None
        return weights
    pickled = directory / "pytorch_model.bin"
    if pickled.is_file():
        # Published EAGLE-3 drafts from the original repository ship a pickle; weights_only
        # refuses anything but tensors. torch's own refusal goes on to suggest turning that
        # check off, which is the one thing not to do with a file of unknown origin.
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise DraftError(
                f"{pickled}: refused: this pickle holds more than tensors, and loading it could "
                "run code from the file; get the draft's weights as safetensors instead"
            ) from None
    raise DraftError(f"{directory}: no *.safetensors and no pytorch_model.bin")


def _state_from_dir(directory: Path, config: LlamaConfig) -> DraftState:
    """Weights of an exported or published draft, renamed to ours and checked."""
    weights: dict[str, Tensor] = {}
    embedding = None
    for key, value in _read_weights(directory).items():
        name = our_name(key)
        if name == EMBEDDING:
            embedding = value.float()
        elif name == "d2t":
            weights[name] = value.long()
        elif name == "t2d":
            weights[name] = value.bool()
        else:
            weights[name] = value.float()
    expected = {k: v for k, v in tensor_shapes(Dims.of(config)).items() if k != EMBEDDING}
    # A draft over the full vocabulary may omit d2t/t2d; SGLang then takes lm_head from the target.
    full_vocab = config.draft_vocab_size == config.vocab_size
    optional = {"d2t", "t2d", "lm_head.weight"} if full_vocab else {"t2d"}
    check_tensors(
        {k: v for k, v in expected.items() if k in weights or k not in optional},
        weights,
        str(directory),
    )
    if embedding is not None and tuple(embedding.shape) != (config.vocab_size, config.hidden_size):
        raise DraftError(
            f"{directory}: embed_tokens.weight {list(embedding.shape)} does not fit the config"
        )
    return DraftState(config=config, weights=weights, embedding=embedding)


def check_export_files(path: Path) -> None:
    """The files a draftforge export lists in its provenance file, with the recorded sizes and
    sha256; a draft from elsewhere (no provenance file) is only checked as it is read."""
    try:
        files = json.loads((path / PROVENANCE_FILE).read_text()).get("files", {})
        expected = {name: (meta["bytes"], meta["sha256"]) for name, meta in files.items()}
    except FileNotFoundError:
        return
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise DraftError(
            f"{path / PROVENANCE_FILE}: not readable ({err!r}); export again"
        ) from None
    for name, (size, sha256) in expected.items():
        file = path / name
        if (
            not file.is_file()
            or file.stat().st_size != size
            or checkpoint.sha256_file(file) != sha256
        ):
            raise DraftError(
                f"{file}: missing or damaged (size or sha256 differs from {PROVENANCE_FILE}); "
                "export or download the draft again"
            )


def read_draft(path: Path) -> DraftState:
    """Any draft draftforge knows -> its state: a checkpoint or run directory, one of the three
    exports, or an SGLang-layout (LlamaForCausalLMEagle3) or speculators eagle3 draft from
    another trainer."""
    if not path.is_dir():
        raise DraftError(f"{path} is not a directory")
    check_export_files(path)
    if (path / CONFIG_FILE).is_file():
        try:
            cfg = json.loads((path / CONFIG_FILE).read_text())
        except ValueError as err:  # not UTF-8, or not JSON
            raise DraftError(f"{path / CONFIG_FILE}: not JSON ({err})") from None
        if "speculators_model_type" in cfg:
            config = parse_speculators_config(cfg, str(path))
        else:
            config = parse_sglang_config(cfg, str(path))
        return _state_from_dir(path, config)
    state, _ = read_checkpoint(resolve_checkpoint(path))
    return state


def target_path_of(draft_path: str | Path) -> str:
    """The target a draft was trained for, from the run config saved beside it; a
    :class:`DraftError` when none is recorded."""
    path = Path(draft_path)
    candidates = [path / "config.yaml", path / RUN_CONFIG_FILE]
    # An export directory has no checkpoint: its run config is among the candidates already.
    with contextlib.suppress(DraftError):
        candidates.append(resolve_checkpoint(path) / "config.yaml")
    for file in candidates:
        if file.is_file():
            run = yaml.safe_load(file.read_text()) or {}
            recorded = (run.get("target") or {}).get("path")
            if recorded:
                return str(recorded)
    raise DraftError(f"{path} records no target (no run config names one): pass --target")


# ----------------------------------------------------------------------------- loading


def build_draft_module(state: DraftState, target: TargetParts | None = None) -> Eagle3Draft:
    """An :class:`Eagle3Draft` from a state; what the state lacks (embedding, a full-vocabulary
    head, aux ids) comes from ``target``, which must then be given."""
    config = copy.deepcopy(state.config)
    weights = dict(state.weights)
    aux = draft_aux_layers(config)
    if aux is None:
        if target is None:
            raise DraftError(
                "the draft does not name its aux layers: pass the target to use its defaults"
            )
        aux = default_aux_layers(target.num_layers)
        config.eagle_config = {"eagle_aux_hidden_state_layer_ids": aux}
    if target is not None:
        problem = aux_problem(aux, target.num_layers)
        if problem:
            raise DraftError(problem)
    if "lm_head.weight" not in weights:
        if target is None:
            raise DraftError("the draft has no lm_head (it shares the target's): pass the target")
        weight, bias = target.lm_head()
        if bias is not None:
            raise DraftError("the target's lm_head has a bias; an EAGLE-3 draft head has none")
        weights["lm_head.weight"] = weight.detach().float()
    if "d2t" not in weights:  # a full-vocabulary draft: the identity map
        weights["d2t"] = torch.zeros(config.draft_vocab_size, dtype=torch.long)
    if "t2d" not in weights:
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[torch.arange(config.draft_vocab_size) + weights["d2t"]] = True
        weights["t2d"] = t2d
    embedding = state.embedding
    if embedding is None:
        if target is None:
            raise DraftError("this format holds no embedding (it is the target's): pass the target")
        embedding = target.embed_weight().detach().float()
    if tuple(embedding.shape) != (config.vocab_size, config.hidden_size):
        raise DraftError(
            f"the embedding is {list(embedding.shape)}, the draft needs "
            f"[{config.vocab_size}, {config.hidden_size}]: is this the draft's target?"
        )
    check_vocab_map(weights["d2t"], weights["t2d"], "draft")
    draft = Eagle3Draft(config)
    draft.load_state_dict({**weights, EMBEDDING: embedding}, strict=True)
    return draft.eval()


def load_draft(path: str | Path, target: TargetParts | None = None) -> Eagle3Draft:
    """Load a draft from a checkpoint, a run directory, any export format, or an EAGLE-3 draft
    made by another trainer. Formats without the embedding (checkpoints, sglang, vllm without
    it) take it from ``target``."""
    return build_draft_module(read_draft(Path(path)), target)


def draft_for(state: DraftState, target: Target) -> Eagle3Draft:
    """The draft of ``state`` (see :func:`read_draft`), checked against ``target`` before its
    weights are assembled, on the target's device and dtype."""
    check_compatible(state.config, target)
    draft = build_draft_module(state, target)
    return draft.to(device=target.device, dtype=target.model.dtype).eval().requires_grad_(False)


def load_draft_for(path: str | Path, target: Target) -> Eagle3Draft:
    """A draft from a checkpoint, run directory or export, ready to decode with ``target``."""
    return draft_for(read_draft(Path(path)), target)
