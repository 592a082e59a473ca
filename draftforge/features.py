"""What a training step consumes: packed micro-batches and the target's features for them.

Data: the prepared dataset (:func:`load_data`), split into train and held-out rows by a hash
of each row's id (:func:`split_eval`), shuffled and packed into micro-batches of
``training.tokens_per_batch`` tokens per epoch (:func:`epoch_plan`, a pure function of the
seed and the epoch), grouped into optimizer steps and shared out over the data-parallel ranks
(:func:`step_batches`); so the steps of ``training.epochs`` are known up front
(:func:`epoch_steps`).

Features: for each micro-batch, the aux hidden states and the teacher distribution over the
draft vocabulary (:class:`Features`), from one of two sources with the same interface
(:class:`FeatureSource`): the target run in this process (:class:`OnlineFeatures`), or a
capture read from disk (:class:`OfflineFeatures`, written by :mod:`draftforge.offline`, stored
as :mod:`draftforge.shards` describes). Both run the target several samples per forward, in
length buckets of ``target.batch_tokens`` padded tokens (:func:`target_forwards`), and give
the same numbers for the same sample up to float rounding.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from draftforge import parallel, ttt
from draftforge.config import Config, ConfigError, cache_root
from draftforge.parallel import Layout
from draftforge.shards import ShardReader, capture_settings, features_dir, verify
from draftforge.target import (
    Target,
    TargetParts,
    chunk_tokens,
    full_argmax,
    is_vision_config,
    teacher,
)
from draftforge.vision_features import CapturedPositions, prepare_vision_data, vision_states

if TYPE_CHECKING:
    from draftforge.data import PrepareResult
    from draftforge.data.vision_prepare import VisionDataset


# ----------------------------------------------------------------------------- data


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
        chat_template_kwargs=cfg.data.chat_template_kwargs,
        cache_dir=cache_root(cfg.target.cache_dir) / "datasets",
        num_workers=cfg.data.num_workers or None,
        strict=cfg.data.strict,
        draft_vocab_size=cfg.draft.draft_vocab_size,
        target_vocab_size=target_vocab_size,
        progress_interval_s=cfg.output.progress_interval_s,
    )


def load_data(
    cfg: Config,
    target: TargetParts,
    log: Callable[..., None] = print,
    prepared: PrepareResult | None = None,
) -> tuple[Any, Tensor]:
    """The tokenised dataset (cached) and the draft vocabulary's target ids.

    ``prepared``: what :func:`prepare_data` (:func:`prepare_vision_data` for a VL target)
    already returned for this config (a caller that runs several stages prepares once);
    otherwise it is called here and its summary logged.
    """
    if prepared is None and is_vision_config(target.model_config):
        prepared = prepare_vision_data(cfg, target)
        log(prepared.summary(), flush=True)
    elif prepared is None:
        prepared = prepare_data(cfg, target.tokenizer, target.vocab_size)
        log(prepared.summary(), flush=True)
    return prepared.dataset, prepared.vocab.target_ids


@dataclass
class MicroBatch:
    """Samples packed into one row: [1, T] tensors (position ids ``[3, 1, T]`` for a target
    with M-RoPE); ``rows`` are dataset indices."""

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
        # [n], or [3, n] for a VL target's M-RoPE rows (which the dataset holds)
        positions.append(
            sample["position_ids"][..., :n] if "position_ids" in sample else torch.arange(n)
        )
        segments.append(torch.full((n,), s))
        lengths.append(n)
    return MicroBatch(
        rows=rows,
        input_ids=torch.cat(ids)[None],
        loss_mask=torch.cat(masks)[None],
        position_ids=torch.cat(positions, dim=-1).unsqueeze(-2),
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


def epoch_steps(dataset: Any, rows: list[int], lengths: list[int], cfg: Config) -> int:
    """The optimizer steps that ``training.epochs`` passes over ``rows`` make.

    Training takes the micro-batches of epoch after epoch ``micro_batches_per_step`` at a time,
    so the last step of the last epoch is topped up from the next epoch; a step that
    supervises nothing is skipped (it is no optimizer step). Step 0 of TTT supervises index t
    when token t+2 of the same sample is supervised, so a row counts when its loss mask is set
    anywhere from index 2 on.
    """
    tc = cfg.training
    budget, per_step = tc.tokens_per_batch, tc.micro_batches_per_step
    batches = sum(
        len(epoch_plan(rows, lengths, budget, tc.seed, epoch)) for epoch in range(tc.epochs)
    )
    supervises = {row: bool(dataset[row]["loss_mask"][2:budget].any()) for row in rows}
    stream = micro_batches(dataset, rows, lengths, cfg, Position())
    steps = 0
    for _ in range(-(-batches // per_step)):
        step_rows = [row for _ in range(per_step) for row in next(stream)[1]]
        steps += any(supervises[row] for row in step_rows)
    return steps


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
        for _ in range(cfg.training.micro_batches_per_step):
            position, rows = next(stream)
            step_rows.append(rows)
        budget = cfg.training.tokens_per_batch
        yield position, [collate(dataset, r, budget) for r in rank_share(step_rows, layout)]


# ----------------------------------------------------------------------------- features


@dataclass
class Features:
    """What the draft needs from the target for one micro-batch, aligned to its packed row."""

    aux: Tensor  # [1, T, 3H]
    teacher_probs: Tensor  # [1, T, Vd] target distribution at each position, over the draft vocab
    teacher_argmax: Tensor  # [1, T] target argmax (target ids)


def forward_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Which samples share each target forward: length buckets of at most ``budget`` padded
    tokens, as indices into ``lengths``.

    Longest first (ties in the given order); a forward takes the next samples while their
    count times its first, longest, sample's length stays within ``budget``, so a sample
    longer than ``budget`` runs alone and ``budget=1`` runs every sample alone.
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def target_forwards(
    target: Target, samples: Sequence[Tensor], budget: int
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Run the target over samples (1-D input ids) in the groups of :func:`forward_groups`:
    each forward's sample indices, aux states ``[B, L, 3H]`` and final hidden ``[B, L, H]``
    (row b is sample ``group[b]``, right-padded to the longest).

    No attention mask: under the causal mask a token sees only earlier positions, so the
    padding after a sample never reaches it, and it keeps positions 0..n-1 as if it ran alone.
    Kernels of other shapes round differently, so its features equal its one-sample forward's
    to within float rounding (tests/test_batching.py). Without a mask every HF family takes
    its plain causal path (DeepSeek-V3's attention fails on a padding mask in transformers).
    """
    for group in forward_groups([len(s) for s in samples], budget):
        ids = torch.zeros(len(group), len(samples[group[0]]), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(samples[i])] = samples[i]
        aux, last = target.features(ids.to(target.device))
        yield group, aux, last


def batched_features(
    target: Target, samples: Sequence[Tensor], budget: int
) -> list[tuple[Tensor, Tensor]]:
    """Aux states ``[n, 3H]`` and final hidden ``[n, H]`` of each sample, in the given order,
    from forwards of up to ``budget`` padded tokens (:func:`target_forwards`)."""
    found: dict[int, tuple[Tensor, Tensor]] = {}
    for group, aux, last in target_forwards(target, samples, budget):
        for row, i in enumerate(group):
            n = len(samples[i])
            found[i] = (aux[row, :n], last[row, :n])
    return [found[i] for i in range(len(samples))]


def online_features(
    target: Target, batch: MicroBatch, draft_ids: Tensor, chunk_mb: int, batch_tokens: int
) -> Features:
    """Run the target over the batch's samples, ``batch_tokens`` padded tokens per forward
    (``target.batch_tokens``), and lay the results out along the packed row."""
    samples = batch.input_ids[0].split(batch.lengths)
    pieces = batched_features(target, samples, batch_tokens)
    aux = torch.cat([a for a, _ in pieces])
    last = torch.cat([h for _, h in pieces])
    return features_from_hidden(target, batch, aux, last, draft_ids, chunk_mb)


def features_from_hidden(
    target: TargetParts,
    batch: MicroBatch,
    aux: Tensor,
    last: Tensor,
    draft_ids: Tensor,
    chunk_mb: int,
    argmax: Tensor | None = None,
) -> Features:
    """The teacher over the draft vocab from the batch's final hidden states [T, H] (target's
    lm_head); its full-vocabulary argmax is computed unless given (a capture stores it).

    Only the indices the loss reads (:func:`draftforge.ttt.teacher_rows`) get a teacher: the
    others (prompts, a sample's last index) hold zeros, which no step reads.
    """
    weight, bias = target.lm_head()
    read = ttt.teacher_rows(batch.loss_mask, batch.segment_ids)[0].to(last.device)
    probs, found = teacher(
        last[read].to(weight.dtype),
        weight,
        draft_ids,
        lm_head_bias=bias,
        softcap=target.logit_softcap,
        chunk=chunk_tokens(weight.shape[0], chunk_mb),
        argmax=None if argmax is None else argmax[read],
    )
    all_probs = probs.new_zeros(last.shape[0], probs.shape[1])
    all_probs[read] = probs
    all_argmax = found.new_zeros(last.shape[0])
    all_argmax[read] = found
    return Features(
        aux=aux[None].float(), teacher_probs=all_probs[None], teacher_argmax=all_argmax[None]
    )


def captured_argmax(target: TargetParts, last: Tensor, loss_mask: Tensor, chunk_mb: int) -> Tensor:
    """What a capture stores of one sample's target argmax, int32 [n] on the CPU: the
    full-vocabulary argmax at final states ``last`` [n, H] (as stored) where a training step
    reads it (:func:`draftforge.ttt.teacher_rows`: a supervised token follows), -1 elsewhere.
    Training from it then computes only the draft vocabulary's rows of the head (``V / Vd``
    times less teacher work: 12x for SmolLM2 and 4096), and prompts cost the capture no head
    rows (the head is a fifth of a SmolLM2 forward, a third of the demo's tokens prompts)."""
    weight, bias = target.lm_head()
    read = ttt.teacher_rows(loss_mask[None], None)[0]
    found = full_argmax(
        last[read.to(last.device)].to(weight.device, weight.dtype),
        weight,
        lm_head_bias=bias,
        softcap=target.logit_softcap,
        chunk=chunk_tokens(weight.shape[0], chunk_mb),
    )
    argmax = torch.full((last.shape[0],), -1, dtype=torch.int32)
    argmax[read] = found.to("cpu", torch.int32)
    return argmax


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


def features_for(
    target: Target, batches: list[MicroBatch], draft_ids: Tensor, cfg: Config, layout: Layout
) -> list[Features]:
    """Online features of this rank's micro-batches.

    Each micro-batch's samples are grouped into forwards on their own, so the forwards (and
    the features) of a micro-batch are the same whichever rank runs it. An FSDP-sharded
    target runs collectives in every forward, so every dp rank must run as many forwards as
    the busiest one: the ranks agree on that count before any forward runs, and the others
    then add one-token forwards to keep in step.
    """
    budget, chunk_mb = cfg.target.batch_tokens, cfg.target.teacher_chunk_mb
    padding = 0
    if cfg.parallel.fsdp in ("target", "both"):
        mine = sum(len(forward_groups(b.lengths, budget)) for b in batches)
        padding = int(parallel.all_reduce_max(mine, layout)) - mine
    feats = [online_features(target, b, draft_ids, chunk_mb, budget) for b in batches]
    idle_forwards(target, padding)
    return feats


def idle_forwards(target: Target, count: int) -> None:
    """``count`` one-token target forwards whose results nobody reads: a rank of an
    FSDP-sharded target with fewer forwards than the others runs them to take part in the
    others' collectives."""
    for _ in range(count):
        target.features(torch.zeros(1, 1, dtype=torch.long, device=target.device))


# One micro-batch as read from a capture: aux and final states, and the stored argmax (None
# when a shard of it predates stored argmaxes).
Loaded = tuple[Tensor, Tensor, Tensor | None]


class OfflineFeatures:
    """Features from a capture: aux states as stored, the teacher recomputed from the final
    hidden states with the target's lm_head (see the module docstring).

    A background thread reads up to ``data.prefetch`` optimizer steps ahead (``steps``), so
    the disk and the conversion to the training dtypes overlap with the draft's compute.
    """

    def __init__(self, reader: ShardReader, target: TargetParts, cfg: Config) -> None:
        self.reader = reader
        self.target = target
        self.chunk_mb = cfg.target.teacher_chunk_mb
        self.depth = cfg.data.prefetch

    def _load(self, batches: list[MicroBatch]) -> list[Loaded]:
        """The host-side work of one step: read, convert to the dtypes the step computes in,
        and pin for an asynchronous copy to the GPU."""
        head_dtype = self.target.lm_head()[0].dtype
        pin = self.target.device.type == "cuda"
        loaded = []
        for batch in batches:
            aux, last = self.reader.hidden(batch.rows, batch.lengths)
            aux, last = aux.float(), last.to(head_dtype)
            argmax = self.reader.argmax(batch.rows, batch.lengths)
            if pin:
                aux, last = aux.pin_memory(), last.pin_memory()
            loaded.append((aux, last, argmax))
        return loaded

    def _teacher(
        self, batches: list[MicroBatch], loaded: list[Loaded], draft_ids: Tensor
    ) -> list[Features]:
        device = self.target.device
        return [
            features_from_hidden(
                self.target,
                batch,
                aux.to(device, non_blocking=True),
                last.to(device, non_blocking=True),
                draft_ids,
                self.chunk_mb,
                None if argmax is None else argmax.to(device, torch.long),
            )
            for batch, (aux, last, argmax) in zip(batches, loaded, strict=True)
        ]

    def features(self, batches: list[MicroBatch], draft_ids: Tensor) -> list[Features]:
        return self._teacher(batches, self._load(batches), draft_ids)

    def positioned(self, dataset: Any) -> Any:
        """The dataset training collates micro-batches from: ``dataset`` itself, or, when
        the capture stores position ids (a vision-language target's), a view of it whose
        rows carry those, so the draft rotates by the positions the target used, as online."""
        if self.reader.position_rows is None:
            return dataset
        return CapturedPositions(dataset, self.reader)

    def steps(
        self, plan: Iterator[tuple[Position, list[MicroBatch]]], draft_ids: Tensor
    ) -> Generator[tuple[Position, list[MicroBatch], list[Features]], None, None]:
        if self.depth == 0:
            for position, batches in plan:
                yield position, batches, self.features(batches, draft_ids)
            return
        ready: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            # Wakes up now and then to notice that the consumer has gone.
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for position, batches in plan:
                    if not put((position, batches, self._load(batches))):
                        return
            except BaseException as err:  # handed to the training thread, which raises it
                put(err)
            else:
                put(None)

        producer = threading.Thread(target=produce, name="offline-prefetch", daemon=True)
        producer.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                position, batches, loaded = item
                yield position, batches, self._teacher(batches, loaded, draft_ids)
        finally:
            # The producer notices within 0.1 s (or after the read in flight): never leave it
            # running into interpreter shutdown, where a thread inside torch aborts the process.
            stop.set()
            producer.join()


class VisionOnlineFeatures:
    """A VL target runs in this process over each micro-batch's samples, images and all:
    each sample alone through the whole model, vision tower included (``data.max_length``
    is at most ``training.tokens_per_batch``, so a packed sample is always whole). Its
    M-RoPE position ids, which the draft rotates by, are in the micro-batch already (the
    prepared dataset holds them)."""

    def __init__(self, target: Target, dataset: VisionDataset, cfg: Config) -> None:
        self.target, self.dataset = target, dataset
        self.chunk_mb = cfg.target.teacher_chunk_mb

    def _sample_states(self, row: int) -> tuple[Tensor, Tensor]:
        """Aux ``[T, 3H]`` and final ``[T, H]`` states of one prepared row."""
        found = vision_states(self.target, self.dataset.samples[row])
        return found.aux[0], found.final[0]

    def features(self, batches: list[MicroBatch], draft_ids: Tensor) -> list[Features]:
        feats = []
        for batch in batches:
            states = [self._sample_states(row) for row in batch.rows]
            aux = torch.cat([a for a, _ in states])
            last = torch.cat([h for _, h in states])
            feats.append(
                features_from_hidden(self.target, batch, aux, last, draft_ids, self.chunk_mb)
            )
        return feats

    def steps(
        self, plan: Iterator[tuple[Position, list[MicroBatch]]], draft_ids: Tensor
    ) -> Generator[tuple[Position, list[MicroBatch], list[Features]], None, None]:
        for position, batches in plan:
            yield position, batches, self.features(batches, draft_ids)


def open_features(
    cfg: Config, target: TargetParts, dataset: Any, layout: Layout
) -> OfflineFeatures:
    """Verify the capture this run needs, before any training, and read features from it."""
    settings = capture_settings(cfg, target, dataset)
    directory = features_dir(cfg, settings)
    # Every rank reads every shard, so one rank's hashing vouches for all of them.
    manifest = verify(
        directory, settings, dataset, checksums=cfg.data.verify_checksums and layout.is_main
    )
    parallel.barrier(layout)
    return OfflineFeatures(ShardReader(directory, manifest), target, cfg)


def feature_source(cfg: Config, target: TargetParts, dataset: Any, layout: Layout) -> FeatureSource:
    """Online or offline features, as ``data.mode`` says; an offline capture is verified here,
    before training starts."""
    if cfg.data.mode == "offline":
        return open_features(cfg, target, dataset, layout)
    if not isinstance(target, Target):
        raise TypeError("online features need the loaded target (load_target), not its head only")
    if target.processor is not None:
        return VisionOnlineFeatures(target, dataset, cfg)
    return OnlineFeatures(target, cfg, layout)
