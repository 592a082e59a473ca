"""Preflight: ``draftforge check CONFIG``, and the same checks at the start of ``train`` and
``capture``.

Every check is cheap: it reads the tokenizer, ``config.json`` and the prepared data (cached),
never the weights. Each finding is one line naming what to change. An error stops ``train``
and ``capture`` before their slow part; a warning is printed and the run goes on.

What is checked:

- aux layers: inside the target and distinct (:func:`draftforge.target.aux_problem`), and not
  the default shifted by one, the mark of ids copied from a vLLM/speculators config (those
  count Hugging Face ``hidden_states`` indices; ``target.aux_layers``, like SGLang's
  ``eagle_aux_hidden_state_layer_ids``, counts "output of layer i");
- the chat template on the first rows of ``data.path``: it must mark assistant tokens to
  supervise (the row is shown when it does not);
- the end-of-turn token the template closes assistant turns with: one token of the tokenizer,
  and one that generation stops on;
- the draft vocabulary: ``d2t`` and ``t2d`` agree, and it covers at least 90% of the
  supervised tokens;
- the layout: ``parallel.tp`` divides the processes and the target's heads and widths, and
  transformers has a tensor-parallel plan for it (:func:`draftforge.parallel.tp_problem`;
  sharded loading checks the same before it reads a weight);
- memory per rank, by :mod:`draftforge.plan`, against the GPU (or, on CPU, the host RAM);
- disk for an offline capture (:func:`draftforge.shards.bytes_per_token`) against free space,
  in ``draftforge check`` (``capture`` checks what is left to capture when it starts).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from draftforge.config import Config, ConfigError, TargetConfig, cache_root
from draftforge.data.conversation import Message, RowError, parse_row
from draftforge.data.readers import Source
from draftforge.data.template import ChatTemplate, load_template
from draftforge.data.vocab import count_supervised
from draftforge.drafts import DraftError, check_vocab_map
from draftforge.features import prepare_data
from draftforge.parallel import default_device, tp_problem
from draftforge.plan import GIB, Plan, count_target_params, layout_plan, target_forward_bytes
from draftforge.shards import MANIFEST, STORAGE_DTYPES, bytes_per_token, size_text
from draftforge.target import (
    TargetParts,
    aux_problem,
    default_aux_layers,
    is_vision_config,
    load_tokenizer,
    pick_dtype,
    read_config,
    read_generation_config,
    resolve_target_path,
)
from draftforge.vision_features import prepare_vision_data

if TYPE_CHECKING:
    from draftforge.data import PrepareResult

# Which command the checks run for: what memory to plan and whether features will be written.
Stage = Literal["check", "train", "capture"]
TEMPLATE_ROWS = 8  # rows of data.path the chat template is tried on
MIN_COVERAGE = 0.90  # share of the supervised tokens the draft vocabulary should cover
_PROBE = [Message("user", "Hi"), Message("assistant", "Hello")]  # finds the end-of-turn text


@dataclass(frozen=True)
class Finding:
    """One problem, in one line that names what to change."""

    error: bool
    message: str

    def __str__(self) -> str:
        return f"{'error' if self.error else 'warning'}: {self.message}"


class PreflightError(ConfigError):
    """``train`` or ``capture`` found errors before starting; one line per error."""


@dataclass
class TargetFacts:
    """What the checks read of the target: its config, tokenizer and stop tokens, no weights."""

    path: str
    config: Any  # the model's PretrainedConfig (composite models too)
    tokenizer: Any
    vocab_size: int  # the length of t2d, as prepare builds it
    stop_ids: set[int]  # token ids generation stops on
    dtype: torch.dtype  # of the target's weights

    @property
    def text(self) -> Any:
        return self.config.get_text_config()

    @property
    def model_config(self) -> Any:
        """The config by the name a loaded target gives it (preparing data with images
        reads it)."""
        return self.config

    @classmethod
    def of(cls, target: TargetParts) -> TargetFacts:
        """From a loaded target (``train``, ``capture``)."""
        config = target.model_config
        stops = _stop_ids(target.tokenizer, config, target.generation_config)
        return cls(target.path, config, target.tokenizer, target.vocab_size, stops, target.dtype)

    @classmethod
    def read(cls, cfg: TargetConfig, device: torch.device) -> TargetFacts:
        """From the target's files, without its weights (``draftforge check``)."""
        path = resolve_target_path(cfg.path, cfg.cache_dir)
        tokenizer = load_tokenizer(path, cfg.trust_remote_code)
        config = read_config(path, cfg.trust_remote_code)
        generation = read_generation_config(path)
        vocab = config.get_text_config().vocab_size
        stops = _stop_ids(tokenizer, config, generation)
        return cls(path, config, tokenizer, vocab, stops, pick_dtype(cfg.dtype, device))


def _ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def _stop_ids(tokenizer: Any, config: Any, generation: Any) -> set[int]:
    """The tokenizer's eos and the eos ids of the model and generation configs."""
    stops = _ids(tokenizer.eos_token_id) | _ids(getattr(config, "eos_token_id", None))
    stops |= _ids(getattr(config.get_text_config(), "eos_token_id", None))
    return stops | _ids(getattr(generation, "eos_token_id", None))


# ----------------------------------------------------------------------------- the checks


def aux_findings(aux: list[int] | None, num_layers: int) -> list[Finding]:
    """Aux layers inside the target and distinct, and not the default shifted by one."""
    default = default_aux_layers(num_layers)
    name = "target.aux_layers" if aux is not None else "the default aux layers"
    layers = list(aux) if aux is not None else default
    problem = aux_problem(layers, num_layers, name)
    if problem:
        down = [i - 1 for i in layers]
        hint = (
            f"; if these are Hugging Face hidden_states indices (vLLM/speculators count one "
            f"more), they are {down} here"
            if aux_problem(down, num_layers) is None
            else ""
        )
        return [Finding(True, f"{problem}{hint}; set target.aux_layers to 3 distinct ids")]
    if layers == [i + 1 for i in default]:
        return [
            Finding(
                False,
                f"target.aux_layers {layers} is the default {default} shifted by one: "
                "target.aux_layers counts 'output of layer i' (0-based), as SGLang's "
                "eagle_aux_hidden_state_layer_ids does, while vLLM/speculators configs list "
                f"hidden_states indices (one more); if {layers} came from a vLLM config, set "
                f"target.aux_layers to {default}",
            )
        ]
    return []


def _template(cfg: Config, tokenizer: Any) -> ChatTemplate:
    d = cfg.data
    return ChatTemplate(
        tokenizer,
        load_template(d.chat_template),
        last_turn_only=d.last_turn_only,
        supervise_empty_think=d.supervise_empty_think,
        chat_template_kwargs=d.chat_template_kwargs,
    )


def _first_rows(cfg: Config, count: int) -> list[tuple[str, list[Message]]]:
    """(location, messages) of the first ``count`` rows of data.path with an assistant turn."""
    found = []
    rows = Source.open(cfg.data.path, cfg.data.split).rows()
    for where, row in itertools.islice(rows, 100 * count):
        try:
            if isinstance(row, RowError):
                raise row
            _, messages = parse_row(row, cfg.data.format, require_assistant=True)
        except RowError:
            continue  # prepare reports such rows
        found.append((where, messages))
        if len(found) == count:
            break
    return found


def template_findings(cfg: Config, tokenizer: Any) -> list[Finding]:
    """The chat template marks assistant tokens to supervise on the first rows of data.path;
    the first row where it does not is shown, rendered."""
    if not cfg.data.path:
        return []  # preparing says that data.path is empty
    try:
        template = _template(cfg, tokenizer)
    except (ValueError, OSError) as err:
        return [Finding(True, f"data.chat_template: {err}")]
    rows = _first_rows(cfg, TEMPLATE_ROWS)
    failed = []
    for where, messages in rows:
        try:
            ids, mask = template.encode(messages, cfg.data.max_length)
        except RowError as err:
            failed.append((where, messages, err.detail))
            continue
        if not any(mask):
            failed.append((where, messages, f"no assistant token in the first {len(ids)} tokens"))
    if not failed:
        return []
    where, messages, why = failed[0]
    try:
        shown = template.render(messages)[:300]
    except RowError as err:
        shown = f"(the template fails: {err.detail})"
    every = len(failed) == len(rows)
    fix = (
        "set data.chat_template to a template that writes the assistant turns (or data.format)"
        if every
        else "such rows are skipped; check data.max_length and data.chat_template"
    )
    return [
        Finding(
            every,
            f"{where}: the chat template gives no assistant token to supervise ({why}) in "
            f"{len(failed)} of the first {len(rows)} rows; rendered: {shown!r}; {fix}",
        )
    ]


def _specials(tokenizer: Any) -> set[str]:
    found = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return (found | set(tokenizer.all_special_tokens)) - {""}


def eot_findings(cfg: Config, facts: TargetFacts) -> list[Finding]:
    """The text the template closes an assistant turn with ends in a token of the tokenizer,
    and generation stops on that token."""
    try:
        template = _template(cfg, facts.tokenizer)
        text, spans = template.spans(_PROBE)
    except (ValueError, OSError, RowError):
        return []  # the template check reports a template that cannot mark turns
    start, end = spans[-1]
    content_end = text.rfind(_PROBE[-1].content, start, end) + len(_PROBE[-1].content)
    eot = text[content_end:end].strip()
    tokenizer = facts.tokenizer
    eos = tokenizer.eos_token
    last = next(
        (s for s in sorted(_specials(tokenizer), key=len, reverse=True) if eot.endswith(s)), None
    )
    if last is None:
        pieces = len(tokenizer.encode(eot, add_special_tokens=False)) if eot else 0
        said = f"{eot!r}, which is {pieces} tokens, none of them special" if eot else "nothing"
        return [
            Finding(
                True,
                f"the chat template ends assistant turns with {said}: the model would not learn "
                f"to stop; set data.chat_template to a template whose assistant turns end with "
                f"the tokenizer's end-of-turn token (eos_token {eos!r}), or add it to the "
                "tokenizer as a special token",
            )
        ]
    token_id = tokenizer.convert_tokens_to_ids(last)
    if token_id in facts.stop_ids:
        return []
    stops = sorted(facts.stop_ids)
    return [
        Finding(
            False,
            f"assistant turns end with {last!r} (id {token_id}) but generation stops on ids "
            f"{stops} (eos_token {eos!r}): the served target would not stop after an answer; "
            "add the id to eos_token_id in the target's generation_config.json, or set "
            "data.chat_template to a template that ends turns with the eos token",
        )
    ]


def vocab_findings(cfg: Config, prepared: PrepareResult) -> list[Finding]:
    """d2t and t2d agree, and the draft vocabulary covers at least 90% of the supervised
    tokens (else the size that would)."""
    vocab = prepared.vocab
    try:
        check_vocab_map(vocab.d2t, vocab.t2d, str(prepared.vocab_path))
    except DraftError as err:
        return [Finding(True, f"{err}; delete the file to build it again")]
    if vocab.coverage >= MIN_COVERAGE:
        return []
    data = prepared.dataset
    counts = count_supervised(data.input_ids, data.loss_mask, vocab.t2d.numel())
    cumulative = counts.sort(descending=True).values.cumsum(0)
    enough = int((cumulative < MIN_COVERAGE * int(counts.sum())).sum()) + 1
    return [
        Finding(
            False,
            f"the draft vocabulary (draft.draft_vocab_size={vocab.d2t.numel()}) covers "
            f"{vocab.coverage:.1%} of the supervised tokens (< {MIN_COVERAGE:.0%}): positions "
            f"outside it cannot be accepted; draft.draft_vocab_size={enough} covers "
            f"{MIN_COVERAGE:.0%}",
        )
    ]


def _host_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_findings(
    cfg: Config, facts: TargetFacts, *, world: int, device: torch.device, stage: Stage
) -> list[Finding]:
    """:mod:`draftforge.plan`'s bytes per rank for this layout against the GPU's memory, or on
    CPU, the host RAM that all of this host's ranks share."""
    tp, par = cfg.parallel.tp, cfg.parallel
    if world % tp:
        return []  # layout_findings says why
    try:
        params = count_target_params(facts.config)
    except (ValueError, KeyError) as err:  # a vision-language target's config, for one
        why = str(err).splitlines()[0] if str(err) else repr(err)  # not the list of classes
        return [Finding(False, f"memory not estimated: cannot build the target's shape ({why})")]
    tokens, weight_bytes = cfg.training.tokens_per_batch, facts.dtype.itemsize
    plan = layout_plan(
        facts.config,
        params,
        tp=tp,
        dp=world // tp,
        fsdp=par.fsdp,
        tokens=tokens,
        steps=cfg.training.ttt_steps,
        draft_vocab=cfg.draft.draft_vocab_size,
        weight_bytes=weight_bytes,
    )
    if stage == "capture":  # the rank's share of the target and one batched forward, no draft
        forward = target_forward_bytes(
            facts.text, cfg.target.batch_tokens, cfg.target.teacher_chunk_mb
        )
        plan = Plan("capture", plan.size, plan.target, 0, forward)
    elif cfg.data.mode == "offline":  # of the target only its head and embedding, no forward
        text = facts.text
        tables = 1 if getattr(text, "tie_word_embeddings", False) else 2
        head = weight_bytes * tables * text.vocab_size * text.hidden_size
        ttt = plan.activations - target_forward_bytes(text, tokens)
        plan = Plan("offline", plan.size, head, plan.draft, ttt)
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
        need, where = plan.total, f"the {torch.cuda.get_device_name(device)} has"
    else:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        have, need = _host_bytes(), plan.total * ranks
        where = f"{ranks} rank(s) on this host need it all; its RAM is"
    if need <= have:
        return []
    return [
        Finding(
            False,
            f"memory: about {plan.total / GIB:.1f} GiB per rank (target {plan.target / GIB:.1f}, "
            f"draft and optimizer {plan.draft / GIB:.1f}, activations "
            f"{plan.activations / GIB:.1f}; draftforge plan's estimate for {world} process(es), "
            f"parallel.tp={tp}, parallel.fsdp={par.fsdp}) but {where} {have / GIB:.1f} GiB: use "
            "more GPUs, parallel.fsdp=both, a larger parallel.tp or a smaller "
            "training.tokens_per_batch",
        )
    ]


def layout_findings(cfg: Config, facts: TargetFacts, world: int) -> list[Finding]:
    """Whether ``parallel.tp`` can split this target over ``world`` processes (heads and
    widths divisible, a tensor-parallel plan for its architecture); from config.json only."""
    problem = tp_problem(facts.text, cfg.parallel.tp, world)
    return [Finding(True, problem)] if problem else []


def _captured(folders: list[Path], dataset_key: str) -> bool:
    """Whether one of ``folders`` holds a finished capture of this dataset."""
    for folder in folders:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            continue  # none there, or a damaged one that capture itself reports
        if (
            isinstance(manifest, dict)
            and (manifest.get("settings") or {}).get("dataset_key") == dataset_key
        ):
            return True
    return False


def disk_findings(cfg: Config, facts: TargetFacts, prepared: PrepareResult) -> list[Finding]:
    """Free space for an offline capture of the prepared data where the features will go,
    unless a finished capture of it is there. (``capture`` itself checks again what is left
    to capture when it starts writing.)"""
    if cfg.data.features_dir:
        folder = Path(cfg.data.features_dir).expanduser()
        folders = [folder]
    else:
        folder = cache_root(cfg.target.cache_dir) / "features"
        folders = sorted(folder.glob("*")) if folder.is_dir() else []
    if _captured(folders, prepared.dataset.key):
        return []
    storage = cfg.data.storage_dtype
    if storage == "auto":
        name = str(facts.dtype).removeprefix("torch.")
        storage = name if name in STORAGE_DTYPES else "float32"
    per_token = bytes_per_token(facts.text.hidden_size, storage)
    tokens = int(prepared.dataset.stats["tokens"])
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    need, free = tokens * per_token, shutil.disk_usage(existing).free
    if need <= free:
        return []
    return [
        Finding(
            True,
            f"disk: the offline capture needs about {size_text(need)} ({tokens:,} tokens x "
            f"{per_token:,} bytes/token, {storage}) but {existing} has {size_text(free)} free: "
            "set data.features_dir on a larger disk, or data.storage_dtype=bfloat16",
        )
    ]


# ----------------------------------------------------------------------------- running them


def run_checks(
    cfg: Config,
    facts: TargetFacts,
    prepared: PrepareResult | None,
    *,
    world: int,
    device: torch.device,
    stage: Stage,
    log: Callable[..., None] = print,
) -> tuple[list[Finding], PrepareResult | None]:
    """Every finding for ``stage``, and the prepared data.

    The checks that need no data run first; when one of them is an error, the data is not
    prepared (a template that marks nothing would leave no rows). Otherwise the data is
    prepared unless ``prepared`` is given (cached; its summary logged), and checked.
    """
    found = [
        *aux_findings(cfg.target.aux_layers, facts.text.num_hidden_layers),
        *template_findings(cfg, facts.tokenizer),
        *eot_findings(cfg, facts),
        *layout_findings(cfg, facts, world),
        *memory_findings(cfg, facts, world=world, device=device, stage=stage),
    ]
    if any(f.error for f in found):
        return found, prepared
    if prepared is None and is_vision_config(facts.config):  # conversations with images
        prepared = prepare_vision_data(cfg, facts)
        log(prepared.summary(), flush=True)
    elif prepared is None:
        prepared = prepare_data(cfg, facts.tokenizer, facts.vocab_size)
        log(prepared.summary(), flush=True)
    found += vocab_findings(cfg, prepared)
    if stage == "check" and cfg.data.mode == "offline":
        found += disk_findings(cfg, facts, prepared)
    return found, prepared


def preflight(
    cfg: Config,
    target: TargetParts,
    prepared: PrepareResult | None,
    *,
    world: int,
    device: torch.device,
    stage: Stage,
    log: Callable[..., None] = print,
) -> PrepareResult:
    """The checks at the start of ``train`` or ``capture``, after the target is loaded: the
    prepared data (prepared here unless given), with the warnings logged; errors raise a
    :class:`PreflightError` of one line each."""
    if prepared is None and is_vision_config(target.model_config):
        prepared = prepare_vision_data(cfg, target)  # conversations with images
        log(prepared.summary(), flush=True)
    found, prepared = run_checks(
        cfg, TargetFacts.of(target), prepared, world=world, device=device, stage=stage, log=log
    )
    errors = [f.message for f in found if f.error]
    for finding in found:
        if not finding.error:
            log(finding, flush=True)
    if errors or prepared is None:
        raise PreflightError("\nerror: ".join(errors))
    return prepared


def check_config(cfg: Config, world: int | None = None) -> list[Finding]:
    """``draftforge check``: every finding for ``cfg`` on this machine, run as ``world``
    processes (default: one per visible GPU, else one)."""
    device = default_device(0, cfg.parallel.device)
    if world is None:
        world = torch.cuda.device_count() if device.type == "cuda" else 1
    if world < 1:
        raise ConfigError(f"--world-size must be at least 1, got {world}")
    facts = TargetFacts.read(cfg.target, device)
    found, _ = run_checks(cfg, facts, None, world=world, device=device, stage="check")
    return found
