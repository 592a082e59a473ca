"""Per-rank peak memory of each stage (loading, capture, online and offline training), from a
target's config.json alone.

What each rank holds of the target is exact (:class:`draftforge.plan_shapes.TargetShape`:
the model class on the meta device, split as the model's own tensor-parallel plan and FSDP2
split it). The rest is arithmetic, each term named in :class:`Estimate`'s parts:

- ``runtime``: a process before any tensor (CPU: measured, :data:`CPU_RUNTIME`; GPU: CUDA
  context, NCCL and cuBLAS workspaces, assumed);
- ``target``: this rank's shard of the target (the whole target when nothing shards it), and
  ``in flight`` while loading: the largest local piece of one weight twice (read, then
  converted or merged with its experts), as :mod:`draftforge.target_load` reads a
  safetensors checkpoint at any world size;
- ``forward``: a target forward's activations over its padded tokens and, under FSDP, the
  weights it gathers whole: the decoder's embedding and three layers' worth (the running one,
  its all-gather buffer while copied out, the next one prefetched); ``head``: the head
  gathered whole on every rank when tensor parallelism split it (online training's teacher,
  and capture's stored argmax);
- ``features``: what a step keeps per micro-batch (aux states, teacher probabilities), and
  ``teacher``: the chunks of full-vocabulary logits;
- ``draft``: fp32 weights and two Adam moments of the draft's trainable part and its fp32
  frozen embedding (FSDP: a 1/dp share, and the weights gathered whole for the step); Muon
  keeps one moment of the hidden matrices, so under ``training.optimizer=muon`` this bounds
  the draft from above;
- ``activations``: the largest transient of a step: the target's forward, the teacher, or
  the draft's TTT unroll (:func:`ttt_activation_bytes`, with bf16 weight copies under
  autocast and waiting gradients) or its whole gradients at the end of a backward;
- ``buffers``: capture's shard being written (samples, their concatenation and the file's
  bytes); offline training's features read ahead (``data.prefetch``); CPU only, since on a
  GPU machine both live in host memory.

A process's peak is its largest moment: loading, or the steady state of its stage, whichever
is larger. :func:`predict` gives it for one layout; :mod:`draftforge.plan_table` searches
layouts for ``draftforge plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from draftforge.plan_shapes import ROOT, TargetShape
from draftforge.plan_shapes import count_target_params as count_target_params
from draftforge.plan_shapes import load_text_config as load_text_config

GIB = 2**30
BF16, FP32 = 2, 4
# A CPU process before its tensors, measured as the peak resident memory (/proc VmHWM) of
# `draftforge train` and `capture` on a 1 MB target, world 1 and 2: 380-390 MiB (torch 2.13
# CPU, transformers 5.24, Python 3.11). A bare `import torch, transformers` is 239 MiB of it;
# draftforge's modules, the tokenizer, the dataset and the process group are the rest.
CPU_RUNTIME = 390 * 2**20
# Assumed, not measured: CUDA context, NCCL communicators and cuBLAS workspaces per GPU.
GPU_RUNTIME = 1.0 * GIB

Stage = Literal["load", "capture", "online", "offline"]
STAGES: tuple[Stage, ...] = ("load", "capture", "online", "offline")


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Split:
    """A layout: ``tp`` ranks split each target layer (inside a node), ``dp`` groups read
    their own batches, and ``fsdp`` (``parallel.fsdp``) says what FSDP2 shards over them."""

    tp: int = 1
    dp: int = 1
    fsdp: Literal["none", "draft", "target", "both"] = "none"

    @property
    def world(self) -> int:
        return self.tp * self.dp

    @property
    def fsdp_target(self) -> bool:
        return self.fsdp in ("target", "both") and self.dp > 1

    @property
    def fsdp_draft(self) -> bool:
        return self.fsdp in ("draft", "both") and self.dp > 1

    def __str__(self) -> str:
        parts = [f"tp{self.tp}"] if self.tp > 1 else []
        parts += [f"dp{self.dp}"] if self.dp > 1 else []
        fsdp = f" fsdp={self.fsdp}" if self.fsdp != "none" and self.dp > 1 else ""
        return ("x".join(parts) or "1 rank") + fsdp


@dataclass(frozen=True)
class Workload:
    """The run settings memory depends on, and the device's bytes per value."""

    weight_bytes: int = BF16  # target.dtype
    compute_bytes: int = BF16  # the draft's compute: bf16 autocast on GPU, fp32 on CPU
    runtime_bytes: float = GPU_RUNTIME
    host_is_device: bool = False  # CPU: host buffers count against the same memory
    tokens: int = 4096  # training.tokens_per_batch
    batch_tokens: int = 8192  # target.batch_tokens: padded tokens per target forward (capture
    # fills them when its data has as many per rank)
    steps: int = 7  # training.ttt_steps
    draft_vocab: int = 32000  # draft.draft_vocab_size
    micro_batches: int = 1  # micro-batches per rank per optimizer step
    teacher_chunk_mb: int = 64  # target.teacher_chunk_mb
    shard_mb: float = 256.0  # data.shard_mb: one capture shard (or less, if the data is less)
    prefetch: int = 4  # data.prefetch: offline steps read ahead

    @classmethod
    def cpu(cls, **settings: Any) -> Workload:
        """fp32 everywhere, the measured CPU runtime, host buffers counted."""
        kw = {"weight_bytes": FP32, "compute_bytes": FP32, "runtime_bytes": CPU_RUNTIME}
        return cls(**{**kw, "host_is_device": True, **settings})


@dataclass
class Estimate:
    """Bytes per rank of one stage under one layout, by what holds them."""

    stage: Stage
    split: Split
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v >= GIB / 100)
        return f"{self.stage} {self.split}: {self.total / GIB:.2f} GiB ({shown})"


# ----------------------------------------------------------------------------- terms


def draft_params(text: object, draft_vocab: int) -> tuple[int, int]:
    """(trainable, frozen) parameters of the EAGLE-3 draft for this target."""
    h = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    hd = getattr(text, "head_dim", None) or h // heads
    inter = getattr(text, "intermediate_size", None) or 4 * h
    attention = 2 * h * (heads + 2 * kv) * hd + heads * hd * h
    trainable = 3 * h * h + attention + 3 * h * inter + 4 * h + h * draft_vocab
    return trainable, text.vocab_size * h


def ttt_activation_bytes(
    text: object, tokens: int, steps: int, draft_vocab: int, compute_bytes: int = BF16
) -> float:
    """Saved tensors of the K-step unroll in the draft's compute dtype, plus the fp32 teacher.

    Per step: the attention input cat[embed, hidden] (2H), q/k/v/attention output, the
    residual stream and norms (~4H), the MLP's gate/up/activation (3I), and the fp32 draft
    logits and log-probabilities (2 x Vd x 4 bytes). No T x T tensor is kept (fused attention).
    """
    h = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    hd = getattr(text, "head_dim", None) or h // heads
    inter = getattr(text, "intermediate_size", None) or 4 * h
    width = 2 * h + 2 * heads * hd + 2 * kv * hd + 4 * h + 3 * inter
    per_step = compute_bytes * tokens * width + 2 * FP32 * tokens * draft_vocab
    teacher = FP32 * tokens * draft_vocab + compute_bytes * tokens * 3 * h
    return steps * per_step + teacher


def forward_widths(text: Any) -> tuple[int, int]:
    """Values per token a target layer's forward holds at once: (attention: q, k, v and the
    residual stream; MLP: a dense MLP's gate, up and product, or a MoE layer's routed copies
    of the token with their expert activations, plus its shared experts)."""
    h = text.hidden_size
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    hd = getattr(text, "head_dim", None) or h // heads
    qk = getattr(text, "qk_head_dim", None) or hd  # MLA: no-rope + rope parts
    v = getattr(text, "v_head_dim", None) or hd
    attention = 4 * h + heads * qk + kv * (qk + v)
    dense = max(
        getattr(text, "intermediate_size", 0) or 0, getattr(text, "intermediate_size_mlp", 0) or 0
    )
    expert = getattr(text, "moe_intermediate_size", None) or dense
    k = getattr(text, "num_experts_per_tok", 0) or 0
    shared = (getattr(text, "n_shared_experts", 0) or 0) * expert
    return attention, max(3 * dense, k * (h + 3 * expert) + 3 * shared)


def target_forward_bytes(text: object, tokens: int, logit_chunk_mb: int = 64) -> float:
    """Transient memory of the frozen target's forward (no grad): a few layer-sized buffers,
    the three captured aux states, and one chunk of full-vocabulary logits."""
    h = text.hidden_size
    inter = getattr(text, "moe_intermediate_size", None) or getattr(
        text, "intermediate_size", 4 * h
    )
    return BF16 * tokens * (4 * h + 2 * inter + 3 * h) + logit_chunk_mb * 2**20


# ----------------------------------------------------------------------------- per stage


def _target(shape: TargetShape, split: Split, w: Workload) -> dict[str, float]:
    """This rank's shard of the target, and what is in flight while loading: one weight's
    piece at a time, twice (read, then converted or merged with its experts)."""
    local = [x.local(split.tp, split.dp, split.fsdp_target) for x in shape.weights]
    return {"target": w.weight_bytes * sum(local), "in flight": 2 * w.weight_bytes * max(local)}


def _gathered(shape: TargetShape, split: Split, w: Workload) -> float:
    """FSDP: whole (tp-local) during a forward, the decoder's own weights and three layers'
    worth: the running layer, its all-gather buffer while it is copied out, and the next
    layer, prefetched."""
    if not split.fsdp_target:
        return 0.0
    per_layer = [0] * shape.layers
    root = 0
    for x in shape.weights:
        n = x.local(split.tp, 1, False)
        if x.layer == ROOT:
            root += n
        elif x.layer >= 0:
            per_layer[x.layer] += n
    return w.weight_bytes * (root + 3 * max(per_layer))


def _forward(shape: TargetShape, split: Split, w: Workload, tokens: int) -> float:
    """A target forward's transient activations over ``tokens`` padded tokens, with the aux
    and final states it returns (fp32 copies of the aux states when the target is not)."""
    attention, mlp = forward_widths(shape.text)
    h = shape.text.hidden_size
    kept = w.weight_bytes * 4 * h + (FP32 * 3 * h if w.weight_bytes != FP32 else 0)
    return tokens * (w.weight_bytes * (attention + mlp / split.tp) + kept)


def _teacher(shape: TargetShape, w: Workload) -> float:
    """One chunk of full-vocabulary logits (as computed, and in fp32) and its draft slice."""
    vocab = shape.text.vocab_size
    rows = max(1, w.teacher_chunk_mb * 2**20 // (FP32 * vocab))
    upcast = FP32 if w.weight_bytes != FP32 else 0
    return rows * (vocab * (w.weight_bytes + upcast) + 2 * FP32 * min(w.draft_vocab, vocab))


def _features(shape: TargetShape, w: Workload) -> float:
    """What a step keeps of its micro-batches: fp32 aux states, teacher probabilities, argmax."""
    h, vocab = shape.text.hidden_size, shape.text.vocab_size
    per_token = FP32 * 3 * h + FP32 * min(w.draft_vocab, vocab) + 8
    return w.micro_batches * w.tokens * per_token


def _draft(shape: TargetShape, split: Split, w: Workload) -> tuple[float, float]:
    """The draft between steps, and the most its training step adds.

    Between steps: fp32 weights and two Adam moments of the trainable part, and the fp32
    frozen embedding; under FSDP a 1/dp share of them, plus the weights gathered whole in the
    compute dtype for the forward and backward. During a step, the larger of: the TTT
    unroll's saved tensors (with bf16 copies of the weights under autocast) while gradients of
    earlier micro-batches (or, on CPU, of the last step) wait (fp32, or their 1/dp share
    under FSDP); and the gradients
    whole at the end of a backward (under FSDP in the compute dtype and in fp32 for the
    reduce-scatter).
    """
    base, frozen = shape.draft
    trainable = base + shape.text.hidden_size * min(w.draft_vocab, shape.text.vocab_size)
    state = 12 * trainable + FP32 * frozen
    dp = split.dp if split.fsdp_draft else 1
    # On CPU, freed gradients stay resident (glibc keeps chunks under its mmap threshold).
    waiting = FP32 * trainable / dp if w.micro_batches > 1 or w.host_is_device else 0.0
    copies = w.compute_bytes * trainable if w.compute_bytes != FP32 else 0
    unroll = _activations(shape, w) + copies + waiting
    if split.fsdp_draft:
        whole = w.compute_bytes * (trainable + frozen)
        return state / dp + whole, max(unroll, (w.compute_bytes + FP32) * trainable)
    return state, max(unroll, FP32 * trainable)


def _head(shape: TargetShape, split: Split, w: Workload) -> float:
    """The head gathered whole on every rank, when tensor parallelism split it or FSDP split
    the embedding it is tied to (an untied head is whole already)."""
    split_head = (split.tp > 1 and shape.tp_plan) or (shape.tied and split.fsdp_target)
    return w.weight_bytes * shape.head_numel if split_head else 0.0


def _estimate(stage: Stage, split: Split, **parts: float) -> Estimate:
    return Estimate(stage, split, {k.replace("_", " "): v for k, v in parts.items() if v})


def predict(shape: TargetShape, stage: Stage, split: Split, w: Workload) -> Estimate:
    """Peak bytes per rank of a process that runs ``stage`` under ``split``: the larger of its
    loading peak and its steady state (offline training loads only the head and embedding)."""
    if stage == "offline":
        return steady_state(shape, stage, split, w)
    parts = _target(shape, split, w)
    load = _estimate(
        "load", split, runtime=w.runtime_bytes, target=parts["target"], in_flight=parts["in flight"]
    )
    if stage == "load":
        return load
    steady = steady_state(shape, stage, split, w)
    return steady if steady.total >= load.total else replace(load, stage=stage)


def steady_state(
    shape: TargetShape, stage: Literal["capture", "online", "offline"], split: Split, w: Workload
) -> Estimate:
    """Peak bytes per rank of a stage once the target is loaded (what a process's peak
    resident memory shows when it is reset after loading)."""
    runtime, parts = w.runtime_bytes, _target(shape, split, w)
    target = parts["target"]
    draft, step = _draft(shape, split, w)
    if stage == "offline":
        h = shape.text.hidden_size
        head = w.weight_bytes * (shape.head_numel + (0 if shape.tied else shape.embed_numel))
        buffers = (w.prefetch + 1) * w.micro_batches * w.tokens * (FP32 * 3 + w.weight_bytes) * h
        return _estimate(
            stage,
            split,
            runtime=runtime,
            head_and_embedding=head,
            draft=draft,
            features=_features(shape, w),
            activations=max(_teacher(shape, w), step),
            buffers=buffers if w.host_is_device else 0.0,
        )
    # Online, a forward holds samples of one micro-batch; capture fills ``batch_tokens``.
    tokens = w.batch_tokens if stage == "capture" else min(w.batch_tokens, w.tokens)
    forward = _gathered(shape, split, w) + _forward(shape, split, w, tokens)
    if stage == "capture":
        # The stored argmax comes from the whole head, a chunk of logits at a time.
        buffers = 3 * w.shard_mb * 2**20 if w.host_is_device else 0.0
        return _estimate(
            stage,
            split,
            runtime=runtime,
            target=target,
            head=_head(shape, split, w),
            forward=max(forward, _teacher(shape, w)),
            buffers=buffers,
        )
    return _estimate(
        stage,
        split,
        runtime=runtime,
        target=target,
        head=_head(shape, split, w),
        draft=draft,
        features=_features(shape, w),
        activations=max(forward, _teacher(shape, w), step),
    )


def _activations(shape: TargetShape, w: Workload) -> float:
    return ttt_activation_bytes(
        shape.text, w.tokens, w.steps, min(w.draft_vocab, shape.text.vocab_size), w.compute_bytes
    )


# ----------------------------------------------------------------------------- check's plan


@dataclass
class Plan:
    """Bytes per GPU of online training for one layout, as ``draftforge check`` states them."""

    layout: str
    size: int
    target: float
    draft: float
    activations: float

    @property
    def total(self) -> float:
        return self.target + self.draft + self.activations


def layout_plan(
    config: object,
    params: int,
    *,
    tp: int = 1,
    dp: int = 1,
    fsdp: str = "none",
    tokens: int = 4096,
    steps: int = 7,
    draft_vocab: int = 32000,
    weight_bytes: int = BF16,
    label: str = "",
) -> Plan:
    """Bytes per GPU of one layout of online training: ``tp`` ranks split each target layer,
    ``dp`` groups read their own batches, and ``fsdp`` (``parallel.fsdp``) says what FSDP2
    shards over the ``dp`` ranks. ``params`` is the target's parameter count
    (:func:`count_target_params`); ``weight_bytes`` its bytes per weight. A coarser sum than
    :func:`predict` (every weight split by tp, no runtime or loading terms)."""
    text = config.get_text_config()
    target_bytes = weight_bytes * params / tp
    trainable, frozen = draft_params(text, min(draft_vocab, text.vocab_size))
    # Draft state: fp32 master weights, fp32 grads and two fp32 Adam moments (16 B/param),
    # plus bf16 compute copies; the frozen embedding is bf16.
    draft_state = 16 * trainable
    draft_compute = BF16 * (trainable + frozen)
    acts = ttt_activation_bytes(text, tokens, steps, draft_vocab) + target_forward_bytes(
        text, tokens
    )
    if fsdp in ("target", "both") and dp > 1:
        # Sharded over the dp ranks; one target layer is gathered at a time.
        target_bytes = target_bytes / dp + target_bytes / text.num_hidden_layers
    if fsdp in ("draft", "both"):
        draft_state /= dp
    return Plan(label or f"tp{tp}dp{dp}", tp * dp, target_bytes, draft_state + draft_compute, acts)
