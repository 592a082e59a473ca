"""Write a trained draft in the layouts serving engines load as they are.

Three formats, each a key map plus a check of what it is about to write:

- ``sglang``: ``config.json`` for SGLang's ``LlamaForCausalLMEagle3`` and ``model.safetensors``
  with exactly the keys it reads (bf16, no embedding: SGLang shares the target's).
- ``vllm``: the speculators format (``speculators_model_type: eagle3``) that ``vllm serve DIR``
  recognises, with the decoder layer under ``layers.0.`` and, unless left out, the target's own
  embedding (vLLM uses a draft's ``embed_tokens.weight`` when present, so it must be the real one).
- ``draftforge``: draftforge's own self-contained directory (sglang layout plus the embedding,
  fp32, and the run config), to reload with :func:`draftforge.drafts.load_draft` or to start
  fine-tuning from (``draft.init_from``); not a transformers Auto-class model.

Every export loads back with :func:`draftforge.drafts.load_draft`. Conventions that differ
between engines and fail silently when mixed up:

- Aux layers: draftforge and SGLang count "output of layer i" (0-based); vLLM and speculators
  count Hugging Face ``hidden_states`` indices, which are one more (index 0 is the embedding).
- ``d2t[i]`` is an offset: ``target_id = i + d2t[i]``; ``t2d`` is a bool mask over the target
  vocabulary.
- RoPE: transformers 5 writes only ``rope_parameters``; SGLang and speculators' converter read
  a top-level ``rope_theta`` and silently use 10000 without it, so both are written.
- vLLM reads a missing ``norm_before_residual`` as True; our residual is the un-normalised
  hidden state, so the flag is always written, as False.
- M-RoPE (a draft for a vision-language target such as Qwen2.5-VL): SGLang switches its draft
  to the target's 3-row positions only when ``rope_scaling`` holds ``mrope_section``; vLLM
  reads ``rope_parameters``, which under transformers 4 a ``rope_scaling`` replaces. So a
  draft that rotates by M-RoPE writes its sections (and ``mrope_interleaved``, explicitly) in
  both, with equal contents and ``rope_type`` default, the one type SGLang uses for it.
  The sources behind each field are in docs/architecture.md ("Exports for vision-language
  targets").
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import LlamaConfig

from draftforge import locks
from draftforge.checkpoint import sha256_file
from draftforge.drafts import (
    CONFIG_FILE,
    EMBEDDING,
    PROVENANCE_FILE,
    RUN_CONFIG_FILE,
    VARIANT_FLAGS,
    WEIGHTS_FILE,
    Dims,
    DraftError,
    DraftState,
    check_tensors,
    check_vocab_map,
    draft_aux_layers,
    parse_sglang_config,
    parse_speculators_config,
    read_checkpoint,
    resolve_checkpoint,
    speculators_name,
    tensor_shapes,
)
from draftforge.models.eagle3 import SGLANG_ARCH
from draftforge.shards import FORMAT, MANIFEST
from draftforge.target import (
    TargetInfo,
    aux_problem,
    read_config,
    read_target_embedding,
    read_target_info,
)

FORMATS: tuple[str, ...] = ("sglang", "vllm", "draftforge")
SPECULATORS_ARCH = "Eagle3Speculator"
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose config schema this writes
DEFAULT_SPECULATIVE_TOKENS = 3
# M-RoPE keys of a RoPE dict, as transformers, SGLang and vLLM spell them.
MROPE_SECTION = "mrope_section"
MROPE_INTERLEAVED = "mrope_interleaved"


# ----------------------------------------------------------------------------- configs


def llama_fields(config: LlamaConfig, dtype: str) -> dict:
    """The Llama part of an export's config, in the spellings every reader understands."""
    rope = dict(config.rope_parameters)
    if MROPE_SECTION in rope:
        # Both engines read a missing flag as false; written, no reader has to guess.
        rope[MROPE_INTERLEAVED] = bool(rope.get(MROPE_INTERLEAVED, False))
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
    if rope.get("rope_type", "default") != "default" or MROPE_SECTION in rope:
        fields["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return fields


def target_mrope_section(target: TargetInfo) -> list[int] | None:
    """The M-RoPE sections the target's language model rotates by, or ``None`` (1-D RoPE)."""
    text = read_config(target.name_or_path, target.trust_remote_code).get_text_config()
    rope = getattr(text, "rope_parameters", None) or {}
    section = rope.get(MROPE_SECTION)
    return list(section) if section is not None else None


def mrope_problem(layer: dict, target_section: list[int] | None) -> str | None:
    """Why the RoPE fields of an export's Llama ``layer`` would rotate a draft otherwise than it
    was trained, under SGLang, vLLM or the target's positions; ``None`` when they are right."""
    rope = layer.get("rope_parameters") or {}
    section = rope.get(MROPE_SECTION)
    if section != target_section:
        return (
            f"the draft rotates by mrope_section {section}, the target's language model by "
            f"{target_section}: train the draft for this target"
        )
    if section is None:
        return None
    if rope.get("rope_type", "default") != "default":
        return (
            f"an M-RoPE draft with rope_type {rope['rope_type']!r}: SGLang rotates M-RoPE drafts "
            "with rope_type default, so it would not rotate as the draft was trained"
        )
    scaling = layer.get("rope_scaling") or {}
    expected = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling != expected:
        return (
            f"rope_scaling {scaling} is not the draft's M-RoPE {expected}: SGLang reads M-RoPE "
            "from rope_scaling alone (vLLM under transformers 4 prefers it to rope_parameters), "
            "so it would rotate by 1-D positions"
        )
    return None


# ----------------------------------------------------------------------------- checks


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
        speculators = config.get("speculators_config") or {}
        if not (
            speculators.get("proposal_methods")
            and (speculators.get("verifier") or {}).get("name_or_path")
        ):
            raise DraftError(
                f"{where}: speculators_config needs proposal_methods and verifier.name_or_path"
            )
        if config.get("norm_before_residual") is not False:
            raise DraftError(f"{where}: norm_before_residual must be written, as false")
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
            raise DraftError(
                f"{where}: a top-level eagle_aux_hidden_state_layer_ids would be read by vLLM one layer off"
            )
    for key in ("rope_theta", "torch_dtype"):
        if key not in layer:
            raise DraftError(
                f"{where}: config lacks {key}; readers would fall back to a wrong default"
            )
    emitted = [f for f in ("norm_before_residual", *VARIANT_FLAGS) if f in config or f in layer]
    allowed = ["norm_before_residual"] if fmt == "vllm" else []
    if [f for f in emitted if f not in allowed]:
        raise DraftError(
            f"{where}: config carries {emitted}; their meaning differs between readers"
        )
    if not aux_key_ok:
        raise DraftError(f"{where}: the aux layer ids are not written")
    rope_problem = mrope_problem(layer, target_mrope_section(target))
    if rope_problem:
        raise DraftError(f"{where}: {rope_problem}")

    dims = Dims.of(draft)
    expected = {names(k): s for k, s in tensor_shapes(dims).items()}
    embed_name = names(EMBEDDING)
    if embedding_rule == "never" or (embedding_rule == "optional" and embed_name not in tensors):
        del expected[embed_name]
    check_tensors(expected, tensors, where)
    for name, tensor in tensors.items():
        want = {"d2t": torch.int64, "t2d": torch.bool}.get(name, float_dtype)
        if tensor.dtype != want:
            raise DraftError(f"{where}: {name} is {tensor.dtype}, must be {want}")
    check_vocab_map(tensors["d2t"], tensors["t2d"], where)
    if (dims.vocab, dims.target_hidden) != (target.vocab_size, target.hidden_size):
        raise DraftError(
            f"{where}: draft vocab/target hidden ({dims.vocab}, {dims.target_hidden}) do not match "
            f"the target {target.name_or_path} ({target.vocab_size}, {target.hidden_size})"
        )
    problem = aux_problem(draft_aux_layers(draft) or [], target.num_layers)
    if problem:
        raise DraftError(f"{where}: {problem}")


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
        tensors[EMBEDDING] = state.embedding
    tensors = {speculators_name(k): v for k, v in tensors.items()}
    return config, _cast(tensors, torch.bfloat16)


def draftforge_files(state: DraftState) -> tuple[dict, dict[str, Tensor]]:
    """draftforge's own directory: the sglang layout plus the embedding, in fp32."""
    if state.embedding is None:
        raise DraftError("the draftforge format holds the embedding: the target's is needed")
    config, _ = sglang_files(state)
    config.update(torch_dtype="float32", dtype="float32")
    return config, _cast({**state.weights, EMBEDDING: state.embedding}, torch.float32)


# ----------------------------------------------------------------------------- writing


def _refuse_overlap(out: Path, source: Path) -> None:
    """Refuse an ``out`` that is, contains or lies inside the run or checkpoint exported."""
    where, exported = out.resolve(), source.resolve()
    if where == exported:
        relation = "is the run or checkpoint being exported"
    elif exported in where.parents:
        relation = f"lies inside {source}, the run or checkpoint being exported"
    elif where in exported.parents:
        relation = f"contains {source}, the run or checkpoint being exported"
    else:
        return
    raise DraftError(f"--out {out} {relation}; choose a directory outside it")


def _holds(out: Path) -> str | None:
    """What the folder ``out`` holds that is not an export: a training run, a capture, or
    ``None``."""
    if (out / "checkpoints").is_dir() or all(
        (out / name).is_file() for name in ("config.yaml", "metrics.jsonl")
    ):
        return "a training run"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
        return "captured features"
    return None


def _refuse_to_replace(out: Path, force: bool) -> None:
    """Refuse an ``out`` that is not a new or empty folder, or a previous export with ``force``.

    An export is recognised by the provenance file every export writes; a run, a capture or
    any other folder is never replaced, ``force`` or not.
    """
    if out.exists() and not out.is_dir():
        raise DraftError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    held = _holds(out)
    if held is not None:
        raise DraftError(
            f"--out {out} holds {held}, which an export never replaces; choose another directory"
        )
    if not (out / PROVENANCE_FILE).is_file():
        raise DraftError(
            f"--out {out} is not empty and holds no draftforge export (no {PROVENANCE_FILE}); "
            "choose another directory: --force replaces only a previous export"
        )
    if not force:
        raise DraftError(
            f"--out {out} holds a previous export: choose another directory or pass --force "
            "to replace it"
        )


def write_dir(
    out: Path,
    config: dict,
    tensors: dict[str, Tensor],
    extra: dict[str, str],
    provenance: dict[str, Any],
    force: bool,
) -> None:
    """Write into a temporary sibling, then rename into place: a failure leaves ``out`` as it was.

    The provenance file is written last and records the size and sha256 of every other file,
    which readers check (:func:`draftforge.drafts.check_export_files`). ``out`` must be new,
    empty, or with ``force`` a previous export (see :func:`_refuse_to_replace`).
    """
    _refuse_to_replace(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    old: Path | None = None
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in extra.items():
            (tmp / name).write_text(text)
        files = {
            f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(tmp.iterdir())
        }
        text = json.dumps({**provenance, "files": files}, indent=2) + "\n"
        (tmp / PROVENANCE_FILE).write_text(text)
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
    fmt: str,
    out: Path,
    target: str,
    aux_layers: list[int],
    speculative_tokens: int,
    tree: tuple[int, int] | None = None,
) -> list[tuple[str, str]]:
    """(what, command) pairs that serve this export as it is. ``tree`` = (topk, draft tokens)
    drafts a tree of ``speculative_tokens`` levels in SGLang; vLLM's commands keep a chain of
    that many steps."""
    q_out, q_target = shlex.quote(str(out)), shlex.quote(target)
    if fmt == "sglang":
        kwargs = json.dumps({"eagle_aux_hidden_state_layer_ids": [i + 1 for i in aux_layers]})
        topk, draft_tokens = tree or (1, speculative_tokens + 1)
        return [
            (
                "SGLang",
                f"python -m sglang.launch_server --model-path {q_target} "
                f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {q_out} "
                f"--speculative-num-steps {speculative_tokens} --speculative-eagle-topk {topk} "
                f"--speculative-num-draft-tokens {draft_tokens}",
            ),
            (
                "vLLM (convert with speculators; the aux ids must be passed, shifted by one)",
                f"speculators convert {q_out} --algorithm eagle3 --verifier {q_target} "
                f"--output-path {shlex.quote(str(out) + '-speculators')} "
                f"--algorithm-kwargs {shlex.quote(kwargs)}",
            ),
        ]
    if fmt == "vllm":
        speculative_config = json.dumps(
            {"method": "eagle3", "model": str(out), "num_speculative_tokens": speculative_tokens}
        )
        return [
            ("vLLM (the target is read from the export)", f"vllm serve {q_out}"),
            (
                "vLLM (naming the target)",
                f"vllm serve {q_target} --speculative-config {shlex.quote(speculative_config)}",
            ),
        ]
    return [
        (
            "draftforge (reload in Python)",
            f'python -c "from draftforge.drafts import load_draft; print(load_draft({str(out)!r}))"',
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
    tree: tuple[int, int] | None = None,
) -> ExportResult:
    """Export a checkpoint (or a run's newest valid one) to ``out`` in ``fmt``.

    ``target`` overrides the run config's ``target.path`` (e.g. the hub id the serving machine
    knows it by); ``include_embedding=False`` leaves the embedding out of a vllm export;
    ``speculative_tokens`` and ``tree`` go into the config and the commands printed
    (:func:`serving_commands`). Everything is checked before anything is written.
    """
    if fmt not in FORMATS:
        raise DraftError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not include_embedding and fmt != "vllm":
        raise DraftError(f"leaving the embedding out applies to the vllm format only, not {fmt}")
    if speculative_tokens < 1:
        raise DraftError(f"speculative tokens must be at least 1, got {speculative_tokens}")
    if tree is not None and not (tree[0] >= 1 and 2 <= tree[1] <= tree[0] * speculative_tokens + 1):
        raise DraftError(
            f"a tree of topk {tree[0]} and {speculative_tokens} steps verifies 2 to "
            f"{tree[0] * speculative_tokens + 1} draft tokens (the root included), not {tree[1]}"
        )
    out = Path(out)
    _refuse_overlap(out, Path(path))
    where = out.resolve()  # the lock file lies beside ``out``, which write_dir replaces whole
    lock = where.parent / f".{where.name}{locks.LOCK_FILE}"
    with locks.hold(out, "draftforge export", DraftError, "choose another --out", lock_file=lock):
        _refuse_to_replace(out, force)  # fail before the slow part
        step_dir = resolve_checkpoint(Path(path))
        state, run_target = read_checkpoint(step_dir)
        info = read_target_info(
            target or run_target.path,
            run_target.cache_dir,
            trust_remote_code=run_target.trust_remote_code,
        )
        if fmt == "draftforge" or (fmt == "vllm" and include_embedding):
            state.embedding = read_target_embedding(info)
        if fmt == "sglang":
            config, tensors = sglang_files(state)
        elif fmt == "vllm":
            config, tensors = vllm_files(state, info, speculative_tokens=speculative_tokens)
        else:
            config, tensors = draftforge_files(state)
        check_export(fmt, config, tensors, info)
        aux = list(state.aux_layers or [])
        provenance = {
            "format": fmt,
            "source": str(step_dir.resolve()),
            "target": info.name_or_path,
            "aux_layers_output_of_layer": aux,
            "aux_layers_hf_hidden_states": [i + 1 for i in aux],
            "embedding": "target" if any(k.endswith(EMBEDDING) for k in tensors) else "none",
        }
        extra = {}
        if fmt == "draftforge":
            extra[RUN_CONFIG_FILE] = (step_dir / "config.yaml").read_text()
        write_dir(out, config, tensors, extra, provenance, force)
    return ExportResult(
        out=out,
        fmt=fmt,
        source=step_dir,
        aux_layers=aux,
        commands=serving_commands(fmt, out, info.name_or_path, aux, speculative_tokens, tree),
    )
