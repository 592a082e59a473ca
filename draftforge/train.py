"""The trainer: the draft learns by TTT from target features computed in this process each
step (online) or read from a capture (offline, :mod:`draftforge.offline`).

``train()`` is the whole loop, written out; ``train_step()`` is one optimizer step over
``grad_accum`` packed micro-batches. Everything that decides the result (init, data order,
packing) derives from ``training.seed``, so a resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from draftforge import checkpoint, parallel, ttt
from draftforge.config import Config, ConfigError, dump_config, to_dict
from draftforge.models import build_draft
from draftforge.models.eagle3 import TTTOutput
from draftforge.parallel import Layout
from draftforge.target import (
    Target,
    chunk_tokens,
    decoder_layers,
    decoder_module,
    load_target,
    teacher,
)

if TYPE_CHECKING:
    from draftforge.data import PrepareResult


class TrainingError(RuntimeError):
    """Training cannot go on; the message says what happened and what to try."""


# ----------------------------------------------------------------------------- data


@dataclass
class MicroBatch:
    """Samples packed into one row: [1, T] tensors; ``rows`` are dataset indices."""

    rows: list[int]
    input_ids: Tensor
    loss_mask: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    lengths: list[int]


def pack(order: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy packing in the given order: consecutive samples share a row until the next
    would overflow ``budget`` tokens (samples longer than it are cut to it)."""
    rows: list[list[int]] = []
    used = budget + 1
    for i in order:
        n = min(lengths[i], budget)
        if used + n > budget:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def epoch_plan(
    indices: Sequence[int], lengths: Sequence[int], budget: int, seed: int, epoch: int
) -> list[list[int]]:
    """The shuffled, packed micro-batches of one epoch (a pure function of seed and epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
    return pack(order, lengths, budget)


def collate(dataset: Any, rows: list[int], budget: int) -> MicroBatch:
    ids, masks, positions, segments, lengths = [], [], [], [], []
    for s, i in enumerate(rows):
        sample = dataset[i]
        n = min(len(sample["input_ids"]), budget)
        ids.append(sample["input_ids"][:n])
        masks.append(sample["loss_mask"][:n].bool())
        positions.append(torch.arange(n))
        segments.append(torch.full((n,), s))
        lengths.append(n)
    return MicroBatch(
        rows=rows,
        input_ids=torch.cat(ids)[None],
        loss_mask=torch.cat(masks)[None],
        position_ids=torch.cat(positions)[None],
        segment_ids=torch.cat(segments)[None],
        lengths=lengths,
    )


def split_eval(ids: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """Train/eval row indices, chosen by a hash of each row's id: stable across runs and
    independent of dataset order."""
    if fraction <= 0 or len(ids) < 2:
        return list(range(len(ids))), []
    cut = int(fraction * 2**32)
    held = [int.from_bytes(hashlib.sha256(i.encode()).digest()[:4], "big") < cut for i in ids]
    if not any(held):  # a small set still gets one eval row
        held[0] = True
    return [i for i, h in enumerate(held) if not h], [i for i, h in enumerate(held) if h]


# ----------------------------------------------------------------------------- target side


@dataclass
class Features:
    """What the draft needs from the target for one micro-batch, aligned to its packed row."""

    aux: Tensor  # [1, T, 3H]
    teacher_probs: Tensor  # [1, T, Vd] target distribution at each position, over the draft vocab
    teacher_argmax: Tensor  # [1, T] target argmax (target ids)


def sample_features(target: Target, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Aux states [T, 3H] and final hidden [T, H] of one sample, run alone.

    One sample per forward (no padding, no packing) makes a sample's features independent of
    what it is batched with, so online training and offline capture see identical numbers.
    """
    aux, last = target.features(input_ids[None].to(target.device))
    return aux[0], last[0]


def online_features(
    target: Target, batch: MicroBatch, draft_ids: Tensor, chunk_mb: int
) -> Features:
    """Run the target over the batch's samples and lay the results out along the packed row."""
    pieces = [sample_features(target, ids) for ids in batch.input_ids[0].split(batch.lengths)]
    aux = torch.cat([a for a, _ in pieces])
    last = torch.cat([h for _, h in pieces])
    return features_from_hidden(target, aux, last, draft_ids, chunk_mb)


def features_from_hidden(
    target: Target, aux: Tensor, last: Tensor, draft_ids: Tensor, chunk_mb: int
) -> Features:
    """The teacher over the draft vocab from final hidden states [T, H] (target's lm_head)."""
    weight, bias = target.lm_head()
    probs, argmax = teacher(
        last.to(weight.dtype),
        weight,
        draft_ids,
        lm_head_bias=bias,
        softcap=target.logit_softcap,
        chunk=chunk_tokens(weight.shape[0], chunk_mb),
    )
    return Features(aux=aux[None].float(), teacher_probs=probs[None], teacher_argmax=argmax[None])


class FeatureSource(Protocol):
    """Where micro-batches' features come from: the target run here, or captured shards
    (:mod:`draftforge.offline`)."""

    def features(self, batches: list[MicroBatch], draft_ids: Tensor) -> list[Features]: ...

    def steps(
        self, plan: Iterator[tuple[Position, list[MicroBatch]]], draft_ids: Tensor
    ) -> Generator[tuple[Position, list[MicroBatch], list[Features]], None, None]:
        """Each step of ``plan`` with its features, in order; closing it stops any reading ahead."""
        ...


class OnlineFeatures:
    """The target runs in this process, for each step as it comes."""

    def __init__(self, target: Target, cfg: Config, layout: Layout) -> None:
        self.target, self.cfg, self.layout = target, cfg, layout

    def features(self, batches: list[MicroBatch], draft_ids: Tensor) -> list[Features]:
        return features_for(self.target, batches, draft_ids, self.cfg, self.layout)

    def steps(
        self, plan: Iterator[tuple[Position, list[MicroBatch]]], draft_ids: Tensor
    ) -> Generator[tuple[Position, list[MicroBatch], list[Features]], None, None]:
        for position, batches in plan:
            yield position, batches, self.features(batches, draft_ids)


def feature_source(cfg: Config, target: Target, dataset: Any, layout: Layout) -> FeatureSource:
    """Online or offline features, as ``data.mode`` says; an offline capture is verified here,
    before training starts."""
    if cfg.data.mode == "offline":
        from draftforge.offline import open_features

        return open_features(cfg, target, dataset, layout)
    return OnlineFeatures(target, cfg, layout)


# ----------------------------------------------------------------------------- optimisation


def lr_factor(
    step: int, warmup: int, total: int, min_ratio: float, time_fraction: float = 0.0
) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``.

    The decay's progress is the share of the steps after warmup that are done, or the share
    of a time budget that is spent (``time_fraction``), whichever is further along.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Clock:
    """Training time in seconds, summed over resumes and agreed on by every rank.

    Ranks must stop at the same step and use the same learning rate, so each `tick` takes
    the largest time over the ranks (one tiny all-reduce per step, only under a limit).
    """

    def __init__(self, limit_s: float, spent_s: float, layout: Layout) -> None:
        self.limit_s = limit_s
        self.spent_s = spent_s
        self.layout = layout
        self._start = time.perf_counter()

    def start(self) -> None:
        self._start = time.perf_counter()

    def tick(self) -> None:
        if self.limit_s:
            now = self.spent_s + time.perf_counter() - self._start
            self.spent_s, self._start = (
                parallel.all_reduce_max(now, self.layout),
                time.perf_counter(),
            )

    @property
    def fraction(self) -> float:
        return min(1.0, self.spent_s / self.limit_s) if self.limit_s else 0.0

    @property
    def out_of_time(self) -> bool:
        return bool(self.limit_s) and self.spent_s >= self.limit_s


@dataclass
class StepStats:
    """Sums over one optimizer step (all its micro-batches), as tensors: no host sync."""

    loss: Tensor
    ce_sums: Tensor  # [K]
    correct: Tensor  # [K]
    counts: Tensor  # [K]
    tokens: int
    grad_norm: Tensor = field(default_factory=lambda: torch.zeros(()))


def global_counts(batches: list[MicroBatch], steps: int, layout: Layout) -> Tensor:
    """[K] supervised indices per TTT step over all micro-batches on all ranks.

    The loss of step k is divided by these, so the loss and its gradient do not depend on how
    a global step is split into micro-batches and ranks.
    """
    counts = torch.zeros(steps, dtype=torch.long)
    for batch in batches:
        counts += ttt.step_counts(batch.loss_mask, batch.segment_ids, steps)
    return parallel.all_reduce_sum(counts.to(layout.device), layout)


def train_step(
    draft: nn.Module,
    batches: list[tuple[MicroBatch, Features]],
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    layout: Layout,
) -> StepStats | None:
    """One optimizer step over this rank's micro-batches; ``None`` (and no update on any
    rank) when nothing in the global step is supervised."""
    tc = cfg.training
    device = layout.device
    counts = global_counts([batch for batch, _ in batches], tc.ttt_steps, layout)
    if int(counts[0]) == 0:
        return None
    norms = counts.float()
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=_use_bf16(tc.precision, device)
    )
    loss_sum = torch.zeros((), device=device)
    ce_sums = torch.zeros(tc.ttt_steps, device=device)
    correct = torch.zeros(tc.ttt_steps, dtype=torch.long, device=device)
    for batch, feats in batches:
        with autocast:
            out = _forward(draft, batch, feats, norms, cfg, device)
        out.loss.backward()
        loss_sum += out.loss.detach()
        ce_sums += out.ce_sums
        correct += out.correct
    params = [p for p in draft.parameters() if p.requires_grad]
    if cfg.parallel.fsdp not in ("draft", "both"):
        parallel.sync_grads(params, layout)
    try:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip, error_if_nonfinite=True)
    except RuntimeError as err:
        if "non-finite" not in str(err):
            raise
        raise TrainingError(
            "the loss or its gradient is NaN/inf: lower training.lr, check the data for "
            "empty or extreme samples, or use training.precision=fp32"
        ) from None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for total in (loss_sum, ce_sums, correct):
        parallel.all_reduce_sum(total, layout)
    tokens = sum(b.input_ids.shape[1] for b, _ in batches) * layout.dp
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return StepStats(loss_sum, ce_sums, correct, counts, tokens, grad_norm.detach())


def _forward(
    draft: nn.Module,
    batch: MicroBatch,
    feats: Features,
    norms: Tensor,
    cfg: Config,
    device: torch.device,
) -> TTTOutput:
    return draft(
        feats.aux,
        batch.input_ids.to(device),
        batch.position_ids.to(device),
        batch.loss_mask.to(device),
        feats.teacher_probs,
        feats.teacher_argmax,
        norms,
        batch.segment_ids.to(device),
        steps=cfg.training.ttt_steps,
        decay=cfg.training.loss_decay,
    )


def _use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


# ----------------------------------------------------------------------------- metrics


def summarize(loss: float, correct: Tensor, counts: Tensor, ce_sums: Tensor) -> dict[str, float]:
    """Loss, per-step accuracy/CE and the AL estimate from summed counters."""
    acc = correct.double().cpu() / counts.double().clamp(min=1)
    metrics = {"loss": loss, "al_estimate": float(ttt.acceptance_length(acc))}
    for k in range(len(acc)):
        metrics[f"acc_{k}"] = float(acc[k])
        metrics[f"ce_{k}"] = float(ce_sums[k].cpu().double() / counts[k].clamp(min=1))
    return metrics


class Trackers:
    """metrics.jsonl always; tensorboard and wandb when asked for (optional extras).
    Only rank 0 writes (``enabled``)."""

    def __init__(
        self, names: list[str], run_dir: Path, cfg: Config, enabled: bool = True, step: int = 0
    ) -> None:
        path = run_dir / "metrics.jsonl"
        if enabled and path.exists():
            # A resumed run repeats the steps after its checkpoint: drop their old records.
            kept = [
                line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step
            ]
            path.write_text("".join(line + "\n" for line in kept))
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
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise ConfigError(
                        "training.trackers has wandb: pip install 'draftforge[wandb]'"
                    ) from None
                self.wandb = wandb.init(project="draftforge", dir=str(run_dir), config=to_dict(cfg))
            else:
                raise ConfigError(
                    f"training.trackers: unknown tracker {name!r}; choose from tensorboard, wandb"
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


# ----------------------------------------------------------------------------- the loop


@dataclass
class Position:
    """Where the next optimizer step's data starts."""

    epoch: int = 0
    index: int = 0


def micro_batches(
    dataset: Any, rows: list[int], lengths: list[int], cfg: Config, start: Position
) -> Iterator[tuple[Position, list[int]]]:
    """(position of this micro-batch, its rows), epoch after epoch, from ``start``."""
    tc = cfg.training
    epoch, index = start.epoch, start.index
    while True:
        plan = epoch_plan(rows, lengths, tc.tokens_per_batch, tc.seed, epoch)
        for i in range(index, len(plan)):
            yield Position(epoch, i), plan[i]
        epoch, index = epoch + 1, 0


def rank_share(items: list[Any], layout: Layout) -> list[Any]:
    """This dp rank's items: every dp-th one, starting at its dp rank."""
    return items[layout.dp_rank :: layout.dp]


def step_batches(
    stream: Iterator[tuple[Position, list[int]]], dataset: Any, cfg: Config, layout: Layout
) -> Iterator[tuple[Position, list[MicroBatch]]]:
    """This rank's collated micro-batches of each optimizer step, with the position of the
    step's last micro-batch."""
    while True:
        step_rows = []
        for _ in range(cfg.training.grad_accum):
            position, rows = next(stream)
            step_rows.append(rows)
        budget = cfg.training.tokens_per_batch
        yield position, [collate(dataset, r, budget) for r in rank_share(step_rows, layout)]


def features_for(
    target: Target, batches: list[MicroBatch], draft_ids: Tensor, cfg: Config, layout: Layout
) -> list[Features]:
    """Online features of this rank's micro-batches.

    An FSDP-sharded target runs collectives in every forward, so every dp rank must run as
    many forwards as the busiest one: the ranks agree on that count before any forward runs,
    and the others then add one-token forwards to keep in step.
    """
    padding = 0
    if cfg.parallel.fsdp in ("target", "both"):
        mine = sum(len(b.lengths) for b in batches)
        padding = int(parallel.all_reduce_max(mine, layout)) - mine
    feats = [online_features(target, b, draft_ids, cfg.target.teacher_chunk_mb) for b in batches]
    for _ in range(padding):
        target.features(torch.zeros(1, 1, dtype=torch.long, device=target.device))
    return feats


@torch.no_grad()
def evaluate(
    draft: nn.Module,
    source: FeatureSource,
    dataset: Any,
    rows: list[int],
    lengths: list[int],
    cfg: Config,
    layout: Layout,
) -> dict[str, float]:
    """Loss, acc_k and AL estimate over the held-out rows (shared out over dp ranks)."""
    tc = cfg.training
    draft.eval()
    plan = pack(rows, lengths, tc.tokens_per_batch)
    # Equal micro-batch counts on every rank (a sharded draft runs collectives per forward):
    # short ranks repeat a batch with nothing supervised, which adds nothing to the sums.
    per_rank = -(-len(plan) // layout.dp)
    mine = [collate(dataset, r, tc.tokens_per_batch) for r in rank_share(plan, layout)]
    while len(mine) < per_rank:
        filler = collate(dataset, plan[0], tc.tokens_per_batch)
        filler.loss_mask.zero_()
        mine.append(filler)
    counts = global_counts(mine, tc.ttt_steps, layout)
    loss = torch.zeros((), device=layout.device)
    ce_sums = torch.zeros(tc.ttt_steps, device=layout.device)
    correct = torch.zeros(tc.ttt_steps, dtype=torch.long, device=layout.device)
    with torch.no_grad():
        for batch, feats in zip(mine, source.features(mine, draft.draft_ids()), strict=True):
            out = _forward(draft, batch, feats, counts.float(), cfg, layout.device)
            loss += out.loss
            ce_sums += out.ce_sums
            correct += out.correct
    for total in (loss, ce_sums, correct):
        parallel.all_reduce_sum(total, layout)
    draft.train()
    return summarize(float(loss), correct, counts, ce_sums)


def prepare_data(cfg: Config, tokenizer: Any, target_vocab_size: int) -> PrepareResult:
    """`draftforge.data.prepare` with the run config's data, target and draft fields.

    Shared by `train` and `draftforge prepare`, so both build and reuse the same cache entry.
    """
    from draftforge.data import prepare

    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at a conversations file or directory")
    if cfg.draft.draft_vocab_size > target_vocab_size:
        raise ConfigError(
            f"draft.draft_vocab_size ({cfg.draft.draft_vocab_size}) is larger than the target "
            f"vocabulary ({target_vocab_size}); use at most {target_vocab_size}"
        )
    return prepare(
        cfg.data.path,
        split=cfg.data.split,
        fmt=cfg.data.format,
        tokenizer=tokenizer,
        max_length=cfg.data.max_length,
        last_turn_only=cfg.data.last_turn_only,
        supervise_empty_think=cfg.data.supervise_empty_think,
        chat_template=cfg.data.chat_template,
        cache_dir=Path(cfg.target.cache_dir).expanduser() / "datasets",
        num_workers=cfg.data.num_workers or None,
        strict=cfg.data.strict,
        draft_vocab_size=cfg.draft.draft_vocab_size,
        target_vocab_size=target_vocab_size,
    )


def load_data(
    cfg: Config,
    target: Target,
    log: Callable[..., None] = print,
    prepared: PrepareResult | None = None,
) -> tuple[Any, Tensor]:
    """The tokenised dataset (cached) and the draft vocabulary's target ids.

    ``prepared``: what :func:`prepare_data` already returned for this config (a caller that
    runs several stages prepares once); otherwise it is called here and its summary logged.
    """
    if cfg.data.max_length > cfg.training.tokens_per_batch:
        raise ConfigError(
            f"data.max_length ({cfg.data.max_length}) exceeds training.tokens_per_batch "
            f"({cfg.training.tokens_per_batch}): raise the budget or lower max_length"
        )
    if prepared is None:
        prepared = prepare_data(cfg, target.tokenizer, target.vocab_size)
        log(prepared.summary(), flush=True)
    return prepared.dataset, prepared.vocab.target_ids


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    metrics: dict[str, float]
    skipped: int
    main: bool = True  # rank 0 (or the only process): the one that reports


def train(
    cfg: Config, target: Target | None = None, prepared: PrepareResult | None = None
) -> TrainResult:
    """Train a draft as ``cfg`` says; resumes from the newest checkpoint when asked.

    Runs as one process or under torchrun (see :mod:`draftforge.parallel`). ``target`` and
    ``prepared`` (see :func:`load_data`) reuse what the caller already loaded.
    """
    layout = parallel.setup(cfg.parallel)
    try:
        return _train(cfg, target, prepared, layout)
    finally:
        parallel.teardown(layout)


def _train(
    cfg: Config, target: Target | None, prepared: PrepareResult | None, layout: Layout
) -> TrainResult:
    tc = cfg.training
    if tc.grad_accum == 0:
        tc.grad_accum = layout.dp
    if tc.grad_accum % layout.dp:
        raise ConfigError(
            f"training.grad_accum ({tc.grad_accum}) must be a multiple of the {layout.dp} "
            "data-parallel ranks: each step's micro-batches are shared out evenly"
        )
    log = print if layout.is_main else _quiet
    target = target or load_target(cfg.target, layout.device, tp_mesh=layout.tp_mesh())
    if cfg.parallel.fsdp in ("target", "both"):
        parallel.shard_target(
            target.model, layout, decoder_module(target.model), decoder_layers(target.model)
        )
    target.lm_head()  # gathers a sharded head now, on every rank at once
    # Rank 0 builds the tokenised cache; the others then find it there.
    if layout.is_main:
        dataset, draft_ids = load_data(cfg, target, log, prepared)
    parallel.barrier(layout)
    if not layout.is_main:
        dataset, draft_ids = load_data(cfg, target, log, prepared)
    source = feature_source(cfg, target, dataset, layout)
    lengths = [int(n) for n in (dataset.offsets[1:] - dataset.offsets[:-1]).tolist()]
    train_rows, eval_rows = split_eval(dataset.ids, cfg.data.eval_fraction)
    if not train_rows:
        raise ConfigError(
            f"{cfg.data.path}: no training rows left after holding out data.eval_fraction"
        )

    torch.manual_seed(tc.seed)
    draft = build_draft(
        cfg.draft.arch,
        target.config,
        target.aux_layers,
        cfg.draft.draft_vocab_size,
        cfg.draft.intermediate_size,
    )
    draft.load_target_embedding(target.embed_weight())
    draft.set_vocab(draft_ids)
    if cfg.draft.init_from:
        from draftforge.export import load_draft

        start = load_draft(cfg.draft.init_from, target)
        if not torch.equal(start.draft_ids(), draft.draft_ids()):
            log(f"draft.init_from: keeping the draft vocabulary of {cfg.draft.init_from}")
        try:
            draft.load_state_dict(start.state_dict())
        except RuntimeError as err:
            raise ConfigError(
                f"draft.init_from {cfg.draft.init_from} does not fit this draft ({str(err).splitlines()[-1].strip()}); "
                "match draft.draft_vocab_size and the target to the starting draft"
            ) from None
    draft.to(layout.device).train()
    draft = parallel.parallelize_draft(
        draft,
        layout,
        fsdp=cfg.parallel.fsdp in ("draft", "both"),
        compile=cfg.parallel.compile,
        bf16=_use_bf16(tc.precision, layout.device),
    )
    params = [p for p in draft.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=tc.lr, weight_decay=tc.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(
            params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay
        )
    if tc.time_limit_minutes < 0:
        raise ConfigError(
            f"training.time_limit_minutes must be >= 0 (0 = no limit), got {tc.time_limit_minutes}"
        )
    clock = Clock(tc.time_limit_minutes * 60, 0.0, layout)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio, clock.fraction),
    )

    run_dir = Path(cfg.output.dir)
    ckpt_root = run_dir / "checkpoints"
    if layout.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    step, skipped, position = 0, 0, Position()
    resume_from = _resume_path(tc.resume, ckpt_root)
    if resume_from is not None:
        weights, state = checkpoint.load_checkpoint(resume_from)
        # Full (unsharded) state dicts: a checkpoint resumes on any world size.
        set_model_state_dict(
            draft, weights, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        if state["optimizer"]["state"]:  # plain SGD keeps none (and torch cannot load "none")
            set_optimizer_state_dict(
                draft, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the rate the next step uses
        torch.set_rng_state(state["rng"])
        step, skipped = state["step"], state["skipped"]
        clock.spent_s = state.get("train_seconds", 0.0)
        position = Position(state["epoch"], state["index"])
        log(f"resumed from {resume_from} at step {step}", flush=True)

    saved_at = step if resume_from is not None else -1

    def save() -> None:
        nonlocal saved_at
        saved_at = step
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(draft, options=full)  # collective when sharded
        optimizer_state = get_optimizer_state_dict(draft, optimizer, options=full)
        if layout.is_main:
            state = {
                "step": step,
                "skipped": skipped,
                "epoch": position.epoch,
                "index": position.index,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "train_seconds": clock.spent_s,
            }
            extra = {
                "config.yaml": dump_config(cfg),
                "draft_config.json": draft.config.to_json_string(),
            }
            weights = {k: v for k, v in weights.items() if not k.startswith("embed_tokens.")}
            checkpoint.save_checkpoint(ckpt_root, step, weights, state, extra)
            checkpoint.rotate(ckpt_root, tc.keep_checkpoints)
        parallel.barrier(layout)

    trackers = Trackers(tc.trackers if layout.is_main else [], run_dir, cfg, layout.is_main, step)
    steps = source.steps(
        step_batches(
            micro_batches(dataset, train_rows, lengths, cfg, position), dataset, cfg, layout
        ),
        draft.draft_ids(),
    )
    window: list[StepStats] = []
    window_start = time.perf_counter()
    metrics: dict[str, float] = {}
    # Under a time limit the bar counts seconds, so its ETA is the limit's.
    timed = bool(clock.limit_s)
    bar = tqdm(
        total=round(clock.limit_s) if timed else tc.max_steps,
        initial=round(clock.spent_s) if timed else step,
        desc="train",
        unit="s" if timed else "step",
        bar_format=(
            "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
            if timed
            else None
        ),
        dynamic_ncols=True,
        disable=not layout.is_main,
    )

    def where() -> str:
        return f"training step {step + 1}"

    clock.start()
    try:
        with parallel.collective_errors(layout, where, cfg.parallel.timeout_minutes):
            while step < tc.max_steps and not clock.out_of_time:
                next_position, mine, feats = next(steps)
                stats = train_step(
                    draft, list(zip(mine, feats, strict=True)), optimizer, cfg, layout
                )
                position = Position(next_position.epoch, next_position.index + 1)
                if stats is None:
                    skipped += 1
                    continue
                clock.tick()
                scheduler.step()
                step += 1
                bar.update(min(round(clock.spent_s), bar.total) - bar.n if timed else 1)
                window.append(stats)
                last = step == tc.max_steps or clock.out_of_time
                if step % tc.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    metrics = _window_metrics(window, elapsed, scheduler.get_last_lr()[0], skipped)
                    trackers.log("train", step, metrics)
                    bar.set_postfix(
                        step=step,
                        loss=f"{metrics['loss']:.3f}",
                        acc0=f"{metrics['acc_0']:.2f}",
                        al=f"{metrics['al_estimate']:.2f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}",
                    )
                    window, window_start = [], time.perf_counter()
                if eval_rows and tc.eval_every and (step % tc.eval_every == 0 or last):
                    trackers.log(
                        "eval",
                        step,
                        evaluate(draft, source, dataset, eval_rows, lengths, cfg, layout),
                    )
                if tc.save_every and step % tc.save_every == 0:
                    save()
    except KeyboardInterrupt:
        # Between steps the state is consistent: keep what was learnt, then stop.
        bar.close()
        log(f"\ninterrupted at step {step}: saving a checkpoint to resume from", flush=True)
        save()
        trackers.close()
        raise
    finally:
        steps.close()  # however training ends, no reader thread outlives it
    bar.close()
    if clock.out_of_time and step < tc.max_steps:
        log(f"time limit of {tc.time_limit_minutes:g} min reached at step {step}", flush=True)
    if saved_at != step:
        save()
    trackers.close()
    return TrainResult(step, run_dir, metrics, skipped, layout.is_main)


def _quiet(*_args: object, **_kwargs: object) -> None:
    """``print`` for ranks other than 0."""


def _window_metrics(
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


def _resume_path(resume: str, root: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoint.latest_valid(root)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            f"training.resume: {path} is not a checkpoint directory (use auto, never or a path)"
        )
    return path
