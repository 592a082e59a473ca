"""The online trainer: the target runs in this process each step; the draft learns by TTT.

``train()`` is the whole loop, written out; ``train_step()`` is one optimizer step over
``grad_accum`` packed micro-batches. Everything that decides the result (init, data order,
packing) derives from ``training.seed``, so a resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from draftforge import checkpoint, ttt
from draftforge.config import Config, ConfigError, dump_config, to_dict
from draftforge.models import build_draft
from draftforge.target import Target, chunk_tokens, load_target, teacher

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


# ----------------------------------------------------------------------------- optimisation


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepStats:
    """Sums over one optimizer step (all its micro-batches), as tensors: no host sync."""

    loss: Tensor
    ce_sums: Tensor  # [K]
    correct: Tensor  # [K]
    counts: Tensor  # [K]
    tokens: int
    grad_norm: Tensor = field(default_factory=lambda: torch.zeros(()))


def train_step(
    draft: nn.Module,
    batches: list[tuple[MicroBatch, Features]],
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    device: torch.device,
) -> StepStats | None:
    """One optimizer step; ``None`` (and no update) when no index in it is supervised."""
    tc = cfg.training
    # Denominators come from the whole step's data, so the loss is the same however the
    # step is split into micro-batches (and, later, ranks).
    counts = sum(ttt.step_counts(b.loss_mask, b.segment_ids, tc.ttt_steps) for b, _ in batches)
    if int(counts[0]) == 0:
        return None
    norms = counts.to(device).float()
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=_use_bf16(tc.precision, device)
    )
    loss_sum = torch.zeros((), device=device)
    ce_sums = torch.zeros(tc.ttt_steps, device=device)
    correct = torch.zeros(tc.ttt_steps, dtype=torch.long, device=device)
    for batch, feats in batches:
        with autocast:
            out = draft(
                feats.aux,
                batch.input_ids.to(device),
                batch.position_ids.to(device),
                batch.loss_mask.to(device),
                feats.teacher_probs,
                feats.teacher_argmax,
                norms,
                batch.segment_ids.to(device),
                steps=tc.ttt_steps,
                decay=tc.loss_decay,
            )
        out.loss.backward()
        loss_sum += out.loss.detach()
        ce_sums += out.ce_sums
        correct += out.correct
    params = [p for p in draft.parameters() if p.requires_grad]
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
    tokens = sum(b.input_ids.shape[1] for b, _ in batches)
    return StepStats(loss_sum, ce_sums, correct, counts, tokens, grad_norm.detach())


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
    """metrics.jsonl always; tensorboard and wandb when asked for (optional extras)."""

    def __init__(self, names: list[str], run_dir: Path, cfg: Config) -> None:
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
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
        self.jsonl.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(f"{split}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
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


@torch.no_grad()
def evaluate(
    draft: nn.Module, target: Target, dataset: Any, rows: list[int], lengths: list[int], cfg: Config
) -> dict[str, float]:
    """Loss, acc_k and AL estimate over the held-out rows."""
    tc = cfg.training
    device = target.device
    draft.eval()
    plan = pack(rows, lengths, tc.tokens_per_batch)
    loss = 0.0
    ce_sums = torch.zeros(tc.ttt_steps)
    correct = torch.zeros(tc.ttt_steps, dtype=torch.long)
    counts = torch.zeros(tc.ttt_steps, dtype=torch.long)
    batches = [collate(dataset, r, tc.tokens_per_batch) for r in plan]
    for batch in batches:
        counts += ttt.step_counts(batch.loss_mask, batch.segment_ids, tc.ttt_steps)
    norms = counts.float().to(device)
    for batch in batches:
        feats = online_features(target, batch, draft.draft_ids(), cfg.target.teacher_chunk_mb)
        out = draft(
            feats.aux,
            batch.input_ids.to(device),
            batch.position_ids.to(device),
            batch.loss_mask.to(device),
            feats.teacher_probs,
            feats.teacher_argmax,
            norms,
            batch.segment_ids.to(device),
            steps=tc.ttt_steps,
            decay=tc.loss_decay,
        )
        loss += float(out.loss)
        ce_sums += out.ce_sums.cpu()
        correct += out.correct.cpu()
    draft.train()
    return summarize(loss, correct, counts, ce_sums)


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


def load_data(cfg: Config, target: Target) -> tuple[Any, Tensor]:
    """The tokenised dataset (cached) and the draft vocabulary's target ids."""
    if cfg.data.max_length > cfg.training.tokens_per_batch:
        raise ConfigError(
            f"data.max_length ({cfg.data.max_length}) exceeds training.tokens_per_batch "
            f"({cfg.training.tokens_per_batch}): raise the budget or lower max_length"
        )
    result = prepare_data(cfg, target.tokenizer, target.vocab_size)
    print(result.summary(), flush=True)
    return result.dataset, result.vocab.target_ids


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    metrics: dict[str, float]
    skipped: int


def train(cfg: Config, target: Target | None = None) -> TrainResult:
    """Train a draft as ``cfg`` says; resumes from the newest checkpoint when asked."""
    tc = cfg.training
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = target or load_target(cfg.target, device)
    dataset, draft_ids = load_data(cfg, target)
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
    draft.to(device).train()
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    )

    run_dir = Path(cfg.output.dir)
    ckpt_root = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    step, skipped, position = 0, 0, Position()
    resume_from = _resume_path(tc.resume, ckpt_root)
    if resume_from is not None:
        weights, state = checkpoint.load_checkpoint(resume_from)
        draft.load_state_dict(weights, strict=False)  # the frozen embedding is the target's
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step, skipped = state["step"], state["skipped"]
        position = Position(state["epoch"], state["index"])
        print(f"resumed from {resume_from} at step {step}", flush=True)

    def save() -> None:
        weights = {k: v for k, v in draft.state_dict().items() if not k.startswith("embed_tokens.")}
        state = {
            "step": step,
            "skipped": skipped,
            "epoch": position.epoch,
            "index": position.index,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        extra = {
            "config.yaml": dump_config(cfg),
            "draft_config.json": draft.config.to_json_string(),
        }
        checkpoint.save_checkpoint(ckpt_root, step, weights, state, extra)
        checkpoint.rotate(ckpt_root, tc.keep_checkpoints)

    trackers = Trackers(tc.trackers, run_dir, cfg)
    stream = micro_batches(dataset, train_rows, lengths, cfg, position)
    window: list[StepStats] = []
    window_start = time.perf_counter()
    metrics: dict[str, float] = {}
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    try:
        while step < tc.max_steps:
            batches = []
            for _ in range(tc.grad_accum):
                next_position, rows = next(stream)
                batch = collate(dataset, rows, tc.tokens_per_batch)
                batches.append(
                    (
                        batch,
                        online_features(
                            target, batch, draft.draft_ids(), cfg.target.teacher_chunk_mb
                        ),
                    )
                )
            stats = train_step(draft, batches, optimizer, cfg, device)
            position = Position(next_position.epoch, next_position.index + 1)
            if stats is None:
                skipped += 1
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            window.append(stats)
            if step % tc.log_every == 0 or step == tc.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics = _window_metrics(window, elapsed, scheduler.get_last_lr()[0], skipped)
                trackers.log("train", step, metrics)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    acc0=f"{metrics['acc_0']:.2f}",
                    al=f"{metrics['al_estimate']:.2f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}",
                )
                window, window_start = [], time.perf_counter()
            if eval_rows and tc.eval_every and (step % tc.eval_every == 0 or step == tc.max_steps):
                trackers.log(
                    "eval", step, evaluate(draft, target, dataset, eval_rows, lengths, cfg)
                )
            if tc.save_every and step % tc.save_every == 0:
                save()
    except KeyboardInterrupt:
        # Between steps the state is consistent: keep what was learnt, then stop.
        bar.close()
        print(f"\ninterrupted at step {step}: saving a checkpoint to resume from", flush=True)
        save()
        trackers.close()
        raise
    bar.close()
    finished = checkpoint.list_checkpoints(ckpt_root)
    if not finished or finished[-1].name != f"step_{step:08d}":
        save()
    trackers.close()
    return TrainResult(step=step, run_dir=run_dir, metrics=metrics, skipped=skipped)


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
