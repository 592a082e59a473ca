"""The trainer: the draft learns by TTT from target features, computed in this process each
step (online) or read from a capture (offline); see :mod:`draftforge.features`.

``train()`` sets a run up and runs its loop: :class:`Run` holds what changes as it trains
(draft, optimizer, schedule, clock, position in the data) and saves and resumes it;
``train_step()`` is one optimizer step over this rank's share of the step's
``micro_batches_per_step`` packed micro-batches. Everything
that decides the result (init, data order, packing) derives from ``training.seed``, so a
resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from draftforge import checkpoint, locks, parallel, ttt
from draftforge.check import preflight
from draftforge.config import Config, ConfigError, dump_config
from draftforge.drafts import load_draft
from draftforge.features import (
    Features,
    FeatureSource,
    MicroBatch,
    OfflineFeatures,
    Position,
    collate,
    epoch_steps,
    feature_source,
    load_data,
    micro_batches,
    pack,
    rank_share,
    split_eval,
    step_batches,
)
from draftforge.metrics import StepStats, Trackers, eval_line, summarize, window_metrics
from draftforge.models import build_draft
from draftforge.models.eagle3 import TTTOutput
from draftforge.optim import build_optimizers, check_same_optimizer
from draftforge.parallel import Layout
from draftforge.progress import Progress, progress_bar
from draftforge.schedule import Clock, lr_factor
from draftforge.target import Target, TargetParts
from draftforge.target_head import load_target_head
from draftforge.target_load import target_for_layout

if TYPE_CHECKING:
    from draftforge.data import PrepareResult


class TrainingError(RuntimeError):
    """Training cannot go on; the message says what happened and what to try."""


class Terminated(Exception):
    """SIGTERM stopped training at a step boundary, on every rank, after saving a checkpoint."""

    def __init__(self, step: int) -> None:
        super().__init__(
            f"terminated (SIGTERM) at step {step}: a checkpoint of it was saved; "
            "run the same command again to resume"
        )
        self.step = step


# ----------------------------------------------------------------------------- optimisation


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
    optimizers: Sequence[torch.optim.Optimizer],
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
    for optimizer in optimizers:
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


# ----------------------------------------------------------------------------- evaluation


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


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    step: int
    first_step: int  # where this call started: 0, or the step of the checkpoint it resumed
    run_dir: Path
    metrics: dict[str, float]
    skipped: int
    main: bool = True  # rank 0 (or the only process): the one that reports


class Run:
    """What changes as a run trains, and how it is saved and resumed.

    A checkpoint holds the full (unsharded) draft weights and optimizer state, the schedule,
    the RNG, the step, the skipped-step count, the training time spent and the position in the
    data: resuming from it, on any world size, continues exactly where it stopped.
    """

    def __init__(self, cfg: Config, draft: nn.Module, layout: Layout, total_steps: int) -> None:
        tc = cfg.training
        self.cfg, self.draft, self.layout = cfg, draft, layout
        self.total_steps = total_steps  # max_steps, or fewer when training.epochs ends sooner
        self.optimizers = build_optimizers(draft, tc)
        self.clock = Clock(tc.time_limit_minutes * 60, 0.0, layout)
        # One schedule per optimizer, all alike: they share the steps, the clock and the lr.
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s: lr_factor(
                    s, tc.warmup_steps, total_steps, tc.min_lr_ratio, self.clock.fraction
                ),
            )
            for optimizer in self.optimizers
        ]
        self.step, self.skipped, self.position = 0, 0, Position()
        self.saved_at = -1  # the step of the newest checkpoint, -1 before there is one
        self.root = Path(cfg.output.dir) / "checkpoints"

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.clock.out_of_time

    def resume(self, path: Path) -> None:
        check_same_optimizer(path, self.cfg.training)
        weights, state = checkpoint.load_checkpoint(path)
        checkpoint.check_shapes(path, weights, self.draft.state_dict(), asdict(self.cfg.draft))
        # Full (unsharded) state dicts: a checkpoint resumes on any world size.
        set_model_state_dict(
            self.draft, weights, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        if state["optimizer"]["state"]:  # plain SGD keeps none (and torch cannot load "none")
            set_optimizer_state_dict(
                self.draft,
                self.optimizers,
                state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        for scheduler in self.schedulers:
            scheduler.load_state_dict(state["scheduler"])
            for group, lr in zip(
                scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True
            ):
                group["lr"] = lr  # the rate the next step uses
        torch.set_rng_state(state["rng"])
        self.step, self.skipped = state["step"], state["skipped"]
        self.clock.spent_s = state.get("train_seconds", 0.0)
        self.position = Position(state["epoch"], state["index"])
        self.saved_at = self.step

    def save(self) -> None:
        """A checkpoint of this step (a collective when the draft is sharded)."""
        self.saved_at = self.step
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.draft, options=full)
        optimizer_state = get_optimizer_state_dict(self.draft, self.optimizers, options=full)
        if self.layout.is_main:
            state = {
                "step": self.step,
                "skipped": self.skipped,
                "epoch": self.position.epoch,
                "index": self.position.index,
                "optimizer": optimizer_state,
                "scheduler": self.schedulers[0].state_dict(),  # all alike
                "rng": torch.get_rng_state(),
                "train_seconds": self.clock.spent_s,
            }
            extra = {
                "config.yaml": dump_config(self.cfg),
                "draft_config.json": self.draft.config.to_json_string(),
            }
            weights = {k: v for k, v in weights.items() if not k.startswith("embed_tokens.")}
            checkpoint.save_checkpoint(self.root, self.step, weights, state, extra)
            checkpoint.rotate(self.root, self.cfg.training.keep_checkpoints)
        parallel.barrier(self.layout)


def train(
    cfg: Config, target: Target | None = None, prepared: PrepareResult | None = None
) -> TrainResult:
    """Train a draft as ``cfg`` says; resumes from the newest checkpoint when asked.

    Runs as one process or under torchrun (see :mod:`draftforge.parallel`). ``target`` and
    ``prepared`` (see :func:`~draftforge.features.load_data`) reuse what the caller already
    loaded. ``cfg`` is checked first and never changed.
    """
    cfg.validate()
    layout = parallel.setup(cfg.parallel)
    # Rank 0 holds output.dir for the whole run (:mod:`draftforge.locks`); no other rank writes there.
    run_dir = Path(cfg.output.dir)
    lock = locks.hold(run_dir, "draftforge train", TrainingError, "use another output.dir")
    try:
        with lock if layout.is_main else nullcontext():
            result = _train(_for_layout(cfg, layout), target, prepared, layout)
        parallel.barrier(layout)  # no rank tears its process group down while another still talks
        return result
    finally:
        parallel.teardown(layout)


def _for_layout(cfg: Config, layout: Layout) -> Config:
    """A copy of ``cfg`` with ``training.micro_batches_per_step`` resolved for this many dp
    ranks."""
    per_step = cfg.training.micro_batches_per_step or layout.dp
    if per_step % layout.dp:
        raise ConfigError(
            f"training.micro_batches_per_step ({per_step}) must be a multiple of the "
            f"{layout.dp} data-parallel ranks: each step's micro-batches are shared out evenly"
        )
    training = dataclasses.replace(cfg.training, micro_batches_per_step=per_step)
    return dataclasses.replace(cfg, training=training)


def _train(
    cfg: Config, target: Target | None, prepared: PrepareResult | None, layout: Layout
) -> TrainResult:
    log = print if layout.is_main else _quiet
    target = _setup_target(cfg, target, layout)
    bf16 = _use_bf16(cfg.training.precision, layout.device)
    log(parallel.describe_device(layout.device, target.dtype, bf16), flush=True)
    # Rank 0 builds the tokenised cache; the others then find it there.
    if layout.is_main:
        prepared = preflight(
            cfg, target, prepared, world=layout.world, device=layout.device, stage="train", log=log
        )
        dataset, draft_ids = load_data(cfg, target, log, prepared)
    parallel.barrier(layout)
    if not layout.is_main:
        dataset, draft_ids = load_data(cfg, target, log, prepared)
    source = feature_source(cfg, target, dataset, layout)
    if isinstance(source, OfflineFeatures):  # a VL capture's rows carry its stored positions
        dataset = source.positioned(dataset)
    lengths = dataset.lengths()
    train_rows, eval_rows = split_eval(dataset.ids, cfg.data.eval_fraction)
    if not train_rows:
        raise ConfigError(
            f"{cfg.data.path}: no training rows left after holding out data.eval_fraction"
        )
    draft = _setup_draft(cfg, target, draft_ids, layout, log)
    run = Run(cfg, draft, layout, _total_steps(cfg, dataset, train_rows, lengths, log))
    run_dir = Path(cfg.output.dir)
    if layout.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    resume_from = _resume_path(cfg.training.resume, run.root)
    if resume_from is not None:
        run.resume(resume_from)
        log(f"resumed from {resume_from} at step {run.step}", flush=True)
    first_step = run.step

    def evaluate_now() -> dict[str, float]:
        return evaluate(run.draft, source, dataset, eval_rows, lengths, cfg, layout)

    trackers = Trackers(
        cfg.training.trackers if layout.is_main else [], run_dir, cfg, layout.is_main, run.step
    )
    steps = source.steps(
        step_batches(
            micro_batches(dataset, train_rows, lengths, cfg, run.position), dataset, cfg, layout
        ),
        run.draft.draft_ids(),
    )
    bar = _progress_bar(run)
    try:
        with (
            parallel.collective_errors(
                layout, lambda: f"training step {run.step + 1}", cfg.parallel.timeout_minutes
            ),
            _sigterm_flag() as terminate,
        ):
            evaluate_held_out = evaluate_now if eval_rows else None
            metrics = _loop(run, steps, trackers, bar, evaluate_held_out, terminate)
    except (KeyboardInterrupt, Terminated) as stop:
        # Between steps the state is consistent: keep what was learnt, then stop.
        bar.close()
        if isinstance(stop, KeyboardInterrupt):
            log(f"\ninterrupted at step {run.step}: saving a checkpoint to resume from", flush=True)
        if run.saved_at != run.step:
            run.save()
        trackers.close()
        raise
    finally:
        steps.close()  # however training ends, no reader thread outlives it
    bar.close()
    if run.clock.out_of_time and run.step < run.total_steps:
        minutes = cfg.training.time_limit_minutes
        log(f"time limit of {minutes:g} min reached at step {run.step}", flush=True)
    if run.saved_at != run.step:
        run.save()
    trackers.close()
    return TrainResult(run.step, first_step, run_dir, metrics, run.skipped, layout.is_main)


def _setup_target(cfg: Config, target: Target | None, layout: Layout) -> TargetParts:
    """The target, loaded unless given (offline: its head and embedding only), each rank
    reading only its shards under ``parallel.tp`` and ``parallel.fsdp`` (a given target is
    sharded after the fact), with its head gathered on every rank at once."""
    if target is None and cfg.data.mode == "offline":
        return load_target_head(cfg.target, layout.device)
    fsdp = cfg.parallel.fsdp in ("target", "both")
    target = target_for_layout(cfg.target, target, layout, fsdp=fsdp)
    target.lm_head()
    return target


def _setup_draft(
    cfg: Config, target: TargetParts, draft_ids: Tensor, layout: Layout, log: Callable[..., None]
) -> nn.Module:
    """A new draft seeded by ``training.seed`` (or ``draft.init_from``'s weights), on the
    device and parallelised as ``parallel`` says."""
    torch.manual_seed(cfg.training.seed)
    draft = build_draft(
        cfg.draft.arch,
        target.config,
        target.aux_layers,
        cfg.draft.draft_vocab_size,
        cfg.draft.intermediate_size,
    )
    draft.load_target_embedding(target.embed_weight())
    draft.set_vocab(draft_ids)
    if cfg.draft.head_init == "target":
        draft.load_target_head(target.lm_head()[0])
    if cfg.draft.init_from:
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
    return parallel.parallelize_draft(
        draft,
        layout,
        fsdp=cfg.parallel.fsdp in ("draft", "both"),
        compile=cfg.parallel.compile,
        bf16=_use_bf16(cfg.training.precision, layout.device),
    )


def _total_steps(
    cfg: Config, dataset: Any, rows: list[int], lengths: list[int], log: Callable[..., None]
) -> int:
    """``max_steps``, or the steps of ``training.epochs`` when they end sooner."""
    tc = cfg.training
    if not tc.epochs:
        return tc.max_steps
    steps = epoch_steps(dataset, rows, lengths, cfg)
    first = f"; training.max_steps ({tc.max_steps}) ends the run first" * (tc.max_steps < steps)
    log(f"training.epochs {tc.epochs}: {steps} optimizer steps{first}", flush=True)
    return min(steps, tc.max_steps)


def _progress_bar(run: Run) -> Progress:
    """Steps done of the total; under a time limit, seconds spent of it (and its ETA)."""
    timed = bool(run.clock.limit_s)
    return progress_bar(
        round(run.clock.limit_s) if timed else run.total_steps,
        initial=round(run.clock.spent_s) if timed else run.step,
        desc="train",
        unit="seconds" if timed else "step",
        bar_format=(
            "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
            if timed
            else None
        ),
        interval_s=run.cfg.output.progress_interval_s,
        disable=not run.layout.is_main,
    )


def _loop(
    run: Run,
    steps: Iterator[tuple[Position, list[MicroBatch], list[Features]]],
    trackers: Trackers,
    bar: Progress,
    evaluate_now: Callable[[], dict[str, float]] | None,
    terminate: threading.Event,
) -> dict[str, float]:
    """Optimizer steps until the run's total or the time limit, logging, evaluating and saving
    as ``training`` says (held-out results also on the console); returns the last logged metrics. Raises :class:`Terminated` at the
    first step boundary after ``terminate`` is set on any rank."""
    tc = run.cfg.training
    window: list[StepStats] = []
    window_start = time.perf_counter()
    metrics: dict[str, float] = {}
    run.clock.start()
    while not run.done:
        if parallel.any_rank(terminate.is_set(), run.layout):
            raise Terminated(run.step)
        next_position, mine, feats = next(steps)
        stats = train_step(
            run.draft, list(zip(mine, feats, strict=True)), run.optimizers, run.cfg, run.layout
        )
        run.position = Position(next_position.epoch, next_position.index + 1)
        if stats is None:
            run.skipped += 1
            continue
        run.clock.tick()
        for scheduler in run.schedulers:
            scheduler.step()
        run.step += 1
        bar.update(min(round(run.clock.spent_s), bar.total) - bar.n if run.clock.limit_s else 1)
        window.append(stats)
        if run.step % tc.log_every == 0 or run.done:
            elapsed = time.perf_counter() - window_start
            lr = run.schedulers[0].get_last_lr()[0]
            metrics = window_metrics(window, elapsed, lr, run.skipped)
            trackers.log("train", run.step, metrics)
            shown = {
                "loss": f"{metrics['loss']:.3f}",
                "acc0": f"{metrics['acc_0']:.2f}",
                "al": f"{metrics['al_estimate']:.2f}",
                "tok/s": f"{metrics['tokens_per_s']:.0f}",
            }
            bar.set_postfix({"step": run.step, **shown} if run.clock.limit_s else shown)
            window, window_start = [], time.perf_counter()
        if evaluate_now and tc.eval_every and (run.step % tc.eval_every == 0 or run.done):
            held_out = evaluate_now()
            trackers.log("eval", run.step, held_out)
            if run.layout.is_main:
                bar.write(eval_line(run.step, held_out))
        if tc.save_every and run.step % tc.save_every == 0:
            run.save()
    return metrics


@contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An event that SIGTERM (what schedulers send before a kill) sets instead of ending the
    process, so that the loop can stop at a step boundary and save; the previous handler is
    restored afterwards. Signal handlers belong to the main thread: elsewhere the event is
    never set."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet(*_args: object, **_kwargs: object) -> None:
    """``print`` for ranks other than 0."""


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
