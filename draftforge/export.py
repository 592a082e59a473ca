"""Export a trained draft in the layouts serving engines load as they are, and load any back.

Three formats, each a key map plus a check of what it is about to write:

- ``sglang``: ``config.json`` for SGLang's ``LlamaForCausalLMEagle3`` and ``model.safetensors``
  with exactly the keys it reads (bf16, no embedding: SGLang shares the target's).
- ``vllm``: the speculators format (``speculators_model_type: eagle3``) that ``vllm serve DIR``
  recognises, with the decoder layer under ``layers.0.`` and, unless left out, the target's own
  embedding (vLLM uses a draft's ``embed_tokens.weight`` when present, so it must be the real one).
- ``hf``: draftforge's own self-contained directory (sglang layout plus the embedding, fp32),
  to reload or to start fine-tuning from.

Conventions that differ between engines and fail silently when mixed up:

- Aux layers: draftforge and SGLang count "output of layer i" (0-based); vLLM and speculators
  count Hugging Face ``hidden_states`` indices, which are one more (index 0 is the embedding).
- ``d2t[i]`` is an offset: ``target_id = i + d2t[i]``; ``t2d`` is a bool mask over the target
  vocabulary.
- RoPE: transformers 5 writes only ``rope_parameters``; SGLang and speculators' converter read
  a top-level ``rope_theta`` and silently use 10000 without it, so both are written.
- vLLM reads a missing ``norm_before_residual`` as True; our residual is the un-normalised
  hidden state, so the flag is always written, as False.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import LlamaConfig

from draftforge import checkpoint
from draftforge.config import ConfigError, TargetConfig, from_dict
from draftforge.models.eagle3 import Eagle3Draft
from draftforge.target import (
    Target,
    TargetError,
    check_aux_layers,
    default_aux_layers,
    resolve_target_path,
)

FORMATS: tuple[str, ...] = ("sglang", "vllm", "hf")
EXPORTABLE_ARCHS: tuple[str, ...] = ("eagle3",)  # draft.arch values these writers understand
SGLANG_ARCH = "LlamaForCausalLMEagle3"
SPECULATORS_ARCH = "Eagle3Speculator"
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose config schema this writes
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "draftforge_export.json"
RUN_CONFIG_FILE = "run_config.yaml"
DEFAULT_SPECULATIVE_TOKENS = 3

# Flags of other EAGLE-3 variants (extra norms, post-norm feedback); our draft has none of them.
# They are never written, and a draft that sets one cannot be loaded into our architecture.
VARIANT_FLAGS: tuple[str, ...] = ("norm_before_fc", "fc_norm", "norm_output")
_LAYER_PREFIX = "midlayer."  # our (and SGLang's) name for the decoder layer
_SPECULATORS_LAYER_PREFIX = "layers.0."  # speculators' and vLLM's name for it
_EMBED = "embed_tokens.weight"


class ExportError(RuntimeError):
    """A draft cannot be exported or loaded; the one-line message says why and what to do."""


# ----------------------------------------------------------------------------- shapes


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
        _EMBED: (d.vocab, d.hidden),
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


def _aux_of(config: LlamaConfig) -> list[int] | None:
    return (getattr(config, "eagle_config", None) or {}).get("eagle_aux_hidden_state_layer_ids")


def draft_config(
    fields: dict,
    *,
    draft_vocab_size: int,
    target_hidden_size: int,
    aux_layers: list[int] | None,
    where: str,
) -> LlamaConfig:
    """Our draft config from a Llama config dict as any trainer writes it (legacy or
    transformers-5 RoPE fields, optional head_dim/kv heads), refusing what our draft lacks."""
    if fields.get("num_hidden_layers", 1) != 1:
        raise ExportError(
            f"{where}: {fields['num_hidden_layers']} decoder layers; draftforge's EAGLE-3 draft has one"
        )
    if fields.get("tie_word_embeddings", False):
        raise ExportError(
            f"{where}: tie_word_embeddings is true (the head would be the embedding); "
            "an EAGLE-3 draft has its own lm_head"
        )
    for bias in ("attention_bias", "mlp_bias"):
        if fields.get(bias, False):
            raise ExportError(f"{where}: {bias} is true; draftforge's draft has no biases")
    # Let transformers standardise the RoPE spelling (rope_theta/rope_scaling or rope_parameters);
    # on a deep copy, as it edits the nested RoPE dicts in place.
    base = LlamaConfig.from_dict(
        copy.deepcopy({k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    )
    return LlamaConfig(
        architectures=[SGLANG_ARCH],
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        head_dim=base.head_dim,
        hidden_act=base.hidden_act,
        rms_norm_eps=base.rms_norm_eps,
        max_position_embeddings=base.max_position_embeddings,
        rope_parameters=dict(base.rope_parameters),
        vocab_size=base.vocab_size,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        draft_vocab_size=draft_vocab_size,
        target_hidden_size=target_hidden_size,
        eagle_config={"eagle_aux_hidden_state_layer_ids": aux_layers},
    )


def llama_fields(config: LlamaConfig, dtype: str) -> dict:
    """The Llama part of an export's config, in the spellings every reader understands."""
    rope = dict(config.rope_parameters)
    fields = {
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        # transformers 5 reads rope_parameters; SGLang, transformers 4 and speculators' converter
        # read rope_theta (+ rope_scaling) and fall back to theta 10000 without a word.
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        # torch_dtype for transformers 4 and speculators' converter, dtype for transformers 5.
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return fields


def parse_sglang_config(cfg: dict, where: str) -> LlamaConfig:
    """An SGLang-layout ``config.json`` (ours or another trainer's) -> our draft config."""
    if SGLANG_ARCH not in (cfg.get("architectures") or []):
        raise ExportError(
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
        raise ExportError(
            f"{where}: speculators_model_type {cfg.get('speculators_model_type')!r}; "
            "only eagle3 drafts load into draftforge"
        )
    layer = cfg.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ExportError(f"{where}: transformer_layer_config is missing or not a mapping")
    if layer.get("model_type", "llama") != "llama":
        raise ExportError(
            f"{where}: a {layer['model_type']!r} decoder layer; draftforge's draft is a Llama layer"
        )
    # vLLM reads a missing flag as True, and True is not our architecture.
    if cfg.get("norm_before_residual", True):
        raise ExportError(
            f"{where}: norm_before_residual is true or missing (vLLM reads missing as true); "
            "draftforge's residual is the un-normalised hidden state"
        )
    for flag in VARIANT_FLAGS:
        if cfg.get(flag):
            raise ExportError(f"{where}: {flag} is set; draftforge's draft has no such variant")
    aux_hf = cfg.get("eagle_aux_hidden_state_layer_ids")
    return draft_config(
        layer,
        draft_vocab_size=cfg.get("draft_vocab_size") or layer["vocab_size"],
        target_hidden_size=cfg.get("target_hidden_size") or layer["hidden_size"],
        aux_layers=[i - 1 for i in aux_hf] if aux_hf else None,
        where=where,
    )


# ----------------------------------------------------------------------------- draft state


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
        return _aux_of(self.config)


@dataclass
class TargetInfo:
    """What an export needs to know about the target, read from its config only."""

    name_or_path: str  # how serving engines should find it
    num_layers: int
    vocab_size: int
    hidden_size: int
    architectures: list[str] = field(default_factory=list)
    trust_remote_code: bool = False


def read_target_info(
    path: str, cache_dir: str = "~/.cache/draftforge", *, trust_remote_code: bool = False
) -> TargetInfo:
    """The target's depth, sizes and architecture, without loading its weights."""
    from transformers import AutoConfig

    resolved = resolve_target_path(path, cache_dir)
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ExportError(
            f"cannot read the target config at {resolved}: {str(err).splitlines()[0]}"
        ) from None
    text = config.get_text_config()
    return TargetInfo(
        name_or_path=resolved,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        architectures=list(getattr(config, "architectures", None) or []),
        trust_remote_code=trust_remote_code,
    )


def _safetensors_files(directory: Path) -> list[Path]:
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
        for file in _safetensors_files(local):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.endswith(_EMBED) and list(f.get_slice(key).get_shape()) == shape:
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
        raise ExportError(
            f"cannot load the target {target.name_or_path} for its embedding: {str(err).splitlines()[0]}"
        ) from None
    return model.get_input_embeddings().weight.detach().float().clone()


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint step directory as is; a run directory (or its ``checkpoints/``) -> its
    newest checkpoint that passes the manifest check."""
    if (path / checkpoint.MANIFEST).is_file():
        return path
    for root in (path / "checkpoints", path):
        if checkpoint.list_checkpoints(root):
            found = checkpoint.latest_valid(root)
            if found is None:
                raise ExportError(f"{root}: no checkpoint passes its manifest check")
            return found
    raise ExportError(
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
        raise ExportError(f"{step_dir}: no readable config.yaml ({err})") from None
    arch = (raw.get("draft") or {}).get("arch", "eagle3")
    if arch not in EXPORTABLE_ARCHS:
        raise ExportError(
            f"{step_dir}: draft.arch {arch!r} cannot be exported; supported: {', '.join(EXPORTABLE_ARCHS)}"
        )
    # Only the target section matters here: a checkpoint written before another section's
    # options changed still exports.
    try:
        target = from_dict({"target": raw.get("target") or {}}).target
    except ConfigError as err:
        raise ExportError(f"{run_file}: {err}") from None
    checkpoint.verify(step_dir)
    try:
        config = LlamaConfig.from_json_file(step_dir / "draft_config.json")
    except (OSError, ValueError) as err:
        raise ExportError(f"{step_dir}: no readable draft_config.json ({err})") from None
    if config.architectures != [SGLANG_ARCH]:
        raise ExportError(
            f"{step_dir}: draft architectures {config.architectures}; only {SGLANG_ARCH} exports"
        )
    weights = load_file(step_dir / checkpoint.WEIGHTS)
    _check_tensors(
        {k: v for k, v in tensor_shapes(Dims.of(config)).items() if k != _EMBED},
        weights,
        str(step_dir),
    )
    return DraftState(config=config, weights=weights), target


# ----------------------------------------------------------------------------- checks


def _check_tensors(
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
        raise ExportError(f"{where}: {'; '.join(problems)}")


def _check_vocab_map(d2t: Tensor, t2d: Tensor, where: str) -> None:
    """d2t offsets land on distinct target ids, and t2d marks exactly those."""
    ids = torch.arange(d2t.numel()) + d2t.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= t2d.numel()):
        raise ExportError(
            f"{where}: d2t maps outside the target vocabulary (target_id = i + d2t[i])"
        )
    if (
        ids.unique().numel() != ids.numel()
        or int(t2d.sum()) != ids.numel()
        or not bool(t2d[ids].all())
    ):
        raise ExportError(
            f"{where}: d2t and t2d disagree (t2d must mark exactly the ids i + d2t[i])"
        )


def check_export(fmt: str, config: dict, tensors: dict[str, Tensor], target: TargetInfo) -> None:
    """Refuse to write an export that its engine would load wrongly; one-line error."""
    where = f"{fmt} export"
    if fmt == "vllm":
        draft = parse_speculators_config(config, where)
        names = speculators_name
        layer = config["transformer_layer_config"]
        float_dtype = torch.bfloat16
        embedding_rule = "optional"
        aux_key_ok = "eagle_aux_hidden_state_layer_ids" in config
        spec = config.get("speculators_config") or {}
        if not (spec.get("proposal_methods") and (spec.get("verifier") or {}).get("name_or_path")):
            raise ExportError(
                f"{where}: speculators_config needs proposal_methods and verifier.name_or_path"
            )
        if config.get("norm_before_residual") is not False:
            raise ExportError(f"{where}: norm_before_residual must be written, as false")
    else:
        draft = parse_sglang_config(config, where)
        names = str  # our names, as they are
        layer = config
        float_dtype = torch.bfloat16 if fmt == "sglang" else torch.float32
        embedding_rule = "never" if fmt == "sglang" else "required"
        aux_key_ok = bool(
            (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        )
        # vLLM reads a top-level list as HF hidden-state indices: here it would be off by one.
        if "eagle_aux_hidden_state_layer_ids" in config:
            raise ExportError(
                f"{where}: a top-level eagle_aux_hidden_state_layer_ids would be read by vLLM one layer off"
            )
    for key in ("rope_theta", "torch_dtype"):
        if key not in layer:
            raise ExportError(
                f"{where}: config lacks {key}; readers would fall back to a wrong default"
            )
    emitted = [f for f in ("norm_before_residual", *VARIANT_FLAGS) if f in config or f in layer]
    allowed = ["norm_before_residual"] if fmt == "vllm" else []
    if [f for f in emitted if f not in allowed]:
        raise ExportError(
            f"{where}: config carries {emitted}; their meaning differs between readers"
        )
    if not aux_key_ok:
        raise ExportError(f"{where}: the aux layer ids are not written")

    dims = Dims.of(draft)
    expected = {names(k): s for k, s in tensor_shapes(dims).items()}
    embed_name = names(_EMBED)
    if embedding_rule == "never" or (embedding_rule == "optional" and embed_name not in tensors):
        del expected[embed_name]
    _check_tensors(expected, tensors, where)
    for name, tensor in tensors.items():
        want = {"d2t": torch.int64, "t2d": torch.bool}.get(name, float_dtype)
        if tensor.dtype != want:
            raise ExportError(f"{where}: {name} is {tensor.dtype}, must be {want}")
    _check_vocab_map(tensors["d2t"], tensors["t2d"], where)
    if (dims.vocab, dims.target_hidden) != (target.vocab_size, target.hidden_size):
        raise ExportError(
            f"{where}: draft vocab/target hidden ({dims.vocab}, {dims.target_hidden}) do not match "
            f"the target {target.name_or_path} ({target.vocab_size}, {target.hidden_size})"
        )
    try:
        check_aux_layers(_aux_of(draft) or [], target.num_layers)
    except TargetError as err:
        raise ExportError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------- writers


def _cast(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Float tensors to ``dtype``; d2t stays int64 and t2d bool."""
    out = {}
    for name, t in tensors.items():
        if name == "d2t":
            out[name] = t.to(torch.int64)
        elif name == "t2d":
            out[name] = t.to(torch.bool)
        else:
            out[name] = t.to(dtype)
        out[name] = out[name].detach().contiguous().cpu()
    return out


def sglang_files(state: DraftState) -> tuple[dict, dict[str, Tensor]]:
    """SGLang's LlamaForCausalLMEagle3: our names, bf16, no embedding."""
    c = state.config
    config = {
        "architectures": [SGLANG_ARCH],
        **llama_fields(c, "bfloat16"),
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        # "output of layer i", the convention SGLang's capture uses (and ours).
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(state.aux_layers or [])},
    }
    return config, _cast(state.weights, torch.bfloat16)


def vllm_files(
    state: DraftState,
    target: TargetInfo,
    *,
    speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
) -> tuple[dict, dict[str, Tensor]]:
    """The speculators eagle3 layout vLLM serves directly; the embedding is included when the
    state carries the target's."""
    c = state.config
    config = {
        "architectures": [SPECULATORS_ARCH],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": llama_fields(c, "bfloat16"),
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "norm_before_residual": False,
        # Hugging Face hidden_states indices: output of layer i is hidden_states[i + 1].
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in state.aux_layers or []],
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": speculative_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {
                "name_or_path": target.name_or_path,
                "architectures": target.architectures,
            },
        },
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }
    tensors = dict(state.weights)
    if state.embedding is not None:
        tensors[_EMBED] = state.embedding
    tensors = {speculators_name(k): v for k, v in tensors.items()}
    return config, _cast(tensors, torch.bfloat16)


def hf_files(state: DraftState) -> tuple[dict, dict[str, Tensor]]:
    """draftforge's own directory: the sglang layout plus the embedding, in fp32."""
    if state.embedding is None:
        raise ExportError("the hf format holds the embedding: the target's is needed")
    config, _ = sglang_files(state)
    config.update(torch_dtype="float32", dtype="float32")
    return config, _cast({**state.weights, _EMBED: state.embedding}, torch.float32)


# ----------------------------------------------------------------------------- writing


def _refuse_nonempty(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(
            f"--out {out} is not empty: choose another directory or pass --force to replace it"
        )


def write_dir(
    out: Path, config: dict, tensors: dict[str, Tensor], extra: dict[str, str], force: bool
) -> None:
    """Write into a temporary sibling, then rename into place: a failure leaves ``out`` as it was."""
    _refuse_nonempty(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    old: Path | None = None
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in extra.items():
            (tmp / name).write_text(text)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, old / "dir")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old / "dir", out)  # put the replaced export back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- serving


def serving_commands(
    fmt: str, out: Path, target: str, aux_layers: list[int], speculative_tokens: int
) -> list[tuple[str, str]]:
    """(what, command) pairs that serve this export as it is."""
    q_out, q_target = shlex.quote(str(out)), shlex.quote(target)
    if fmt == "sglang":
        kwargs = json.dumps({"eagle_aux_hidden_state_layer_ids": [i + 1 for i in aux_layers]})
        return [
            (
                "SGLang",
                f"python -m sglang.launch_server --model-path {q_target} "
                f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {q_out} "
                f"--speculative-num-steps {speculative_tokens} --speculative-eagle-topk 1 "
                f"--speculative-num-draft-tokens {speculative_tokens + 1}",
            ),
            (
                "vLLM (convert with speculators; the aux ids must be passed, shifted by one)",
                f"speculators convert {q_out} --algorithm eagle3 --verifier {q_target} "
                f"--output-path {shlex.quote(str(out) + '-speculators')} "
                f"--algorithm-kwargs {shlex.quote(kwargs)}",
            ),
        ]
    if fmt == "vllm":
        spec = json.dumps(
            {"method": "eagle3", "model": str(out), "num_speculative_tokens": speculative_tokens}
        )
        return [
            ("vLLM (the target is read from the export)", f"vllm serve {q_out}"),
            (
                "vLLM (naming the target)",
                f"vllm serve {q_target} --speculative-config {shlex.quote(spec)}",
            ),
        ]
    return [
        (
            "draftforge (reload in Python)",
            f'python -c "from draftforge.export import load_draft; print(load_draft({str(out)!r}))"',
        )
    ]


@dataclass
class ExportResult:
    """Where an export went, what it came from, and the commands that serve it."""

    out: Path
    fmt: str
    source: Path
    aux_layers: list[int]
    commands: list[tuple[str, str]]


def export_checkpoint(
    path: str | Path,
    fmt: str,
    out: str | Path,
    *,
    force: bool = False,
    target: str | None = None,
    include_embedding: bool = True,
    speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
) -> ExportResult:
    """Export a checkpoint (or a run's newest valid one) to ``out`` in ``fmt``.

    ``target`` overrides the run config's ``target.path`` (e.g. the hub id the serving machine
    knows it by); ``include_embedding=False`` leaves the embedding out of a vllm export.
    Everything is checked before anything is written.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not include_embedding and fmt != "vllm":
        raise ExportError(f"leaving the embedding out applies to the vllm format only, not {fmt}")
    if speculative_tokens < 1:
        raise ExportError(f"speculative tokens must be at least 1, got {speculative_tokens}")
    out = Path(out)
    _refuse_nonempty(out, force)  # fail before the slow part
    step_dir = resolve_checkpoint(Path(path))
    state, run_target = read_checkpoint(step_dir)
    info = read_target_info(
        target or run_target.path,
        run_target.cache_dir,
        trust_remote_code=run_target.trust_remote_code,
    )
    if fmt == "hf" or (fmt == "vllm" and include_embedding):
        state.embedding = read_target_embedding(info)
    if fmt == "sglang":
        config, tensors = sglang_files(state)
    elif fmt == "vllm":
        config, tensors = vllm_files(state, info, speculative_tokens=speculative_tokens)
    else:
        config, tensors = hf_files(state)
    check_export(fmt, config, tensors, info)
    aux = list(state.aux_layers or [])
    provenance = {
        "format": fmt,
        "source": str(step_dir.resolve()),
        "target": info.name_or_path,
        "aux_layers_output_of_layer": aux,
        "aux_layers_hf_hidden_states": [i + 1 for i in aux],
        "embedding": "target" if any(k.endswith(_EMBED) for k in tensors) else "none",
    }
    extra = {PROVENANCE_FILE: json.dumps(provenance, indent=2) + "\n"}
    if fmt == "hf":
        extra[RUN_CONFIG_FILE] = (step_dir / "config.yaml").read_text()
    write_dir(out, config, tensors, extra, force)
    return ExportResult(
        out=out,
        fmt=fmt,
        source=step_dir,
        aux_layers=aux,
        commands=serving_commands(fmt, out, info.name_or_path, aux, speculative_tokens),
    )


# ----------------------------------------------------------------------------- loading


def _read_weights(directory: Path) -> dict[str, Tensor]:
    files = _safetensors_files(directory)
    if files:
        weights: dict[str, Tensor] = {}
        for file in files:
            weights.update(load_file(file))
        return weights
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        # Published EAGLE-3 drafts from the original repository ship a pickle; weights_only
        # refuses anything but tensors.
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ExportError(f"{directory}: no *.safetensors and no pytorch_model.bin")


def _state_from_dir(directory: Path, config: LlamaConfig) -> DraftState:
    """Weights of an exported or published draft, renamed to ours and checked."""
    weights: dict[str, Tensor] = {}
    embedding = None
    for key, value in _read_weights(directory).items():
        name = our_name(key)
        if name == _EMBED:
            embedding = value.float()
        elif name == "d2t":
            weights[name] = value.long()
        elif name == "t2d":
            weights[name] = value.bool()
        else:
            weights[name] = value.float()
    expected = {k: v for k, v in tensor_shapes(Dims.of(config)).items() if k != _EMBED}
    # A draft over the full vocabulary may omit d2t/t2d; SGLang then takes lm_head from the target.
    full_vocab = config.draft_vocab_size == config.vocab_size
    optional = {"d2t", "t2d", "lm_head.weight"} if full_vocab else {"t2d"}
    _check_tensors(
        {k: v for k, v in expected.items() if k in weights or k not in optional},
        weights,
        str(directory),
    )
    if embedding is not None and tuple(embedding.shape) != (config.vocab_size, config.hidden_size):
        raise ExportError(
            f"{directory}: embed_tokens.weight {list(embedding.shape)} does not fit the config"
        )
    return DraftState(config=config, weights=weights, embedding=embedding)


def read_draft(path: Path) -> DraftState:
    """Any draft draftforge knows -> its state: a checkpoint or run directory, one of the three
    exports, or an SGLang-layout (LlamaForCausalLMEagle3) or speculators eagle3 draft from
    another trainer."""
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory")
    if (path / CONFIG_FILE).is_file():
        try:
            cfg = json.loads((path / CONFIG_FILE).read_text())
        except json.JSONDecodeError as err:
            raise ExportError(f"{path / CONFIG_FILE}: not JSON ({err})") from None
        if "speculators_model_type" in cfg:
            config = parse_speculators_config(cfg, str(path))
        else:
            config = parse_sglang_config(cfg, str(path))
        return _state_from_dir(path, config)
    state, _ = read_checkpoint(resolve_checkpoint(path))
    return state


def build_draft_module(state: DraftState, target: Target | None = None) -> Eagle3Draft:
    """An :class:`Eagle3Draft` from a state; what the state lacks (embedding, a full-vocabulary
    head, aux ids) comes from ``target``, which must then be given."""
    config = copy.deepcopy(state.config)
    weights = dict(state.weights)
    aux = _aux_of(config)
    if aux is None:
        if target is None:
            raise ExportError(
                "the draft does not name its aux layers: pass the target to use its defaults"
            )
        aux = default_aux_layers(target.num_layers)
        config.eagle_config = {"eagle_aux_hidden_state_layer_ids": aux}
    if target is not None:
        try:
            check_aux_layers(aux, target.num_layers)
        except TargetError as err:
            raise ExportError(str(err)) from None
    if "lm_head.weight" not in weights:
        if target is None:
            raise ExportError("the draft has no lm_head (it shares the target's): pass the target")
        weight, bias = target.lm_head()
        if bias is not None:
            raise ExportError("the target's lm_head has a bias; an EAGLE-3 draft head has none")
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
            raise ExportError(
                "this format holds no embedding (it is the target's): pass the target"
            )
        embedding = target.embed_weight().detach().float()
    if tuple(embedding.shape) != (config.vocab_size, config.hidden_size):
        raise ExportError(
            f"the embedding is {list(embedding.shape)}, the draft needs "
            f"[{config.vocab_size}, {config.hidden_size}]: is this the draft's target?"
        )
    _check_vocab_map(weights["d2t"], weights["t2d"], "draft")
    draft = Eagle3Draft(config)
    draft.load_state_dict({**weights, _EMBED: embedding}, strict=True)
    return draft.eval()


def load_draft(path: str | Path, target: Target | None = None) -> Eagle3Draft:
    """Load a draft from a checkpoint, a run directory, any export format, or an EAGLE-3 draft
    made by another trainer. Formats without the embedding (checkpoints, sglang, vllm without
    it) take it from ``target``."""
    return build_draft_module(read_draft(Path(path)), target)
