"""torch.distributed layout: data parallel, FSDP2 and tensor parallelism, on CPU or GPU.

The same code runs as one plain process or under ``torchrun``. The device mesh has two
dimensions, ``("dp", "tp")``: ranks in one tp group share a batch and split the target's
weights; dp groups read disjoint micro-batches. Nothing here is module-level state: the
:class:`Layout` is passed to whoever needs it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from draftforge.config import ConfigError, ParallelConfig


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died, stalled or ran other collectives."""


@dataclass
class Layout:
    """This process's place in the job."""

    rank: int
    world: int
    dp: int
    dp_rank: int
    tp: int
    device: torch.device
    mesh: DeviceMesh | None  # None in a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def dp_mesh(self) -> DeviceMesh | None:
        return self.mesh["dp"] if self.mesh is not None else None

    def tp_mesh(self) -> DeviceMesh | None:
        return self.mesh["tp"] if self.mesh is not None and self.tp > 1 else None


# What tensor parallelism splits over the tp ranks: attention heads, and the MLP and expert
# widths (the models' plans shard these dims; transformers does not pad them).
TP_SPLIT = (
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "intermediate_size_mlp",
    "moe_intermediate_size",
)


def tp_problem(text_config: Any, tp: int, world: int) -> str | None:
    """Why ``parallel.tp=tp`` cannot split a target of this (text) config over ``world``
    processes, naming the valid values; None when it can. Reads the config only."""
    if tp == 1:
        return None
    if not getattr(text_config, "base_model_tp_plan", None):
        return (
            f"parallel.tp={tp}: transformers has no tensor-parallel plan for "
            f"{type(text_config).__name__}: use parallel.tp=1 (parallel.fsdp=target shards it)"
        )
    sizes = {
        name: value
        for name in TP_SPLIT
        if isinstance(value := getattr(text_config, name, None), int)
    }
    uneven = [f"{name} ({value})" for name, value in sizes.items() if value % tp]
    if world % tp == 0 and not uneven:
        return None
    valid = [
        t for t in range(1, world + 1) if world % t == 0 and all(v % t == 0 for v in sizes.values())
    ]
    why = (
        f"does not divide the {world} processes"
        if world % tp
        else (f"does not divide the target's {', '.join(uneven)}")
    )
    return (
        f"parallel.tp={tp} {why}: valid values with {world} processes: {', '.join(map(str, valid))}"
    )


def default_device(local_rank: int = 0, requested: str = "auto") -> torch.device:
    """This process's device as ``parallel.device`` (``requested``) asks: ``auto`` is its GPU
    when CUDA works, else the CPU; ``cuda`` without a working CUDA is a :class:`ConfigError`,
    never a silent fallback to the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if requested == "cuda":
        why = (
            f"is built for CUDA {torch.version.cuda} but finds no usable GPU or driver; check "
            "nvidia-smi and CUDA_VISIBLE_DEVICES"
            if torch.version.cuda
            else "is a CPU-only build (torch.version.cuda is None); install a CUDA build of torch"
        )
        raise ConfigError(
            "parallel.device=cuda but torch.cuda.is_available() is False: torch "
            f"{torch.__version__} {why}, or use parallel.device=cpu"
        )
    return torch.device("cpu")


def describe_device(
    device: torch.device, target_dtype: torch.dtype, draft_bf16: bool | None = None
) -> str:
    """The line ``train`` and ``capture`` start with, e.g. ``device: cuda:0 (NVIDIA H200),
    target dtype bfloat16, draft precision bf16 autocast``; without ``draft_bf16`` (capture
    trains no draft) the draft part is left out."""
    if device.type == "cuda":
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        where = f"{device} ({torch.get_num_threads()} threads)"
    line = f"device: {where}, target dtype {str(target_dtype).removeprefix('torch.')}"
    if draft_bf16 is None:
        return line
    return f"{line}, draft precision {'bf16 autocast' if draft_bf16 else 'fp32'}"


def setup(cfg: ParallelConfig) -> Layout:
    """Join the job ``torchrun`` started (or stay a single process) and build the mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if cfg.tp != 1:
            raise ConfigError(
                f"parallel.tp={cfg.tp} needs {cfg.tp} processes: launch with torchrun --nproc-per-node {cfg.tp}"
            )
        return Layout(0, 1, 1, 0, 1, default_device(0, cfg.device), None)
    if world % cfg.tp:
        raise ConfigError(f"parallel.tp={cfg.tp} does not divide the {world} processes")
    device = default_device(int(os.environ.get("LOCAL_RANK", "0")), cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A collective that waits longer than this fails instead of hanging the job, so a
        # dead rank ends the run with an error.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=cfg.timeout_minutes),
        )
    rank = dist.get_rank()
    mesh = init_device_mesh(device.type, (world // cfg.tp, cfg.tp), mesh_dim_names=("dp", "tp"))
    return Layout(rank, world, world // cfg.tp, mesh["dp"].get_local_rank(), cfg.tp, device, mesh)


# What gloo's failures say (NCCL's are DistBackendError, a torch.distributed.DistError).
_GLOO_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")


@contextmanager
def collective_errors(
    layout: Layout, where: Callable[[], str], timeout_minutes: float
) -> Iterator[None]:
    """Re-raise a failed or timed-out collective as a :class:`CollectiveError` that names this
    rank, ``where()`` (for example the training step) and the ranks that did not fail
    alongside it (:func:`silent_ranks`), instead of a backend traceback."""
    try:
        yield
    except RuntimeError as err:
        failed = isinstance(err, dist.DistError) or any(m in str(err) for m in _GLOO_FAILURES)
        if not layout.distributed or not failed:
            raise
        silent = silent_ranks(layout, wait_s=min(60.0, timeout_minutes * 15))
        culprit = (
            f"rank{'s' * (len(silent) > 1)} {', '.join(map(str, silent))} never reached it "
            "(dead or stalled)"
            if silent
            else "another rank died, stalled or ran different collectives"
        )
        raise CollectiveError(
            f"rank {layout.rank} of {layout.world}, {where()}: a collective failed or waited "
            f"longer than parallel.timeout_minutes={timeout_minutes:g}; {culprit} "
            f"({str(err).splitlines()[0]})"
        ) from None


def silent_ranks(layout: Layout, wait_s: float) -> list[int]:
    """After a collective failed on this rank: the ranks that have not said the same within
    ``wait_s`` seconds, through the job's key-value store (torchrun's, which outlives its
    workers). A live rank's collective fails too, at about the same time, so these are the
    ranks that died or stalled; empty when every rank failed, or the store cannot tell."""
    keys = [f"draftforge/collective-failed/{r}" for r in range(layout.world)]
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(keys[layout.rank], "1")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r, key in enumerate(keys) if not store.check([key])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.2)
    except (RuntimeError, ValueError):  # no store, or its host is gone
        return []


def teardown(layout: Layout) -> None:
    if layout.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(layout: Layout) -> None:
    if layout.distributed:
        dist.barrier()


def all_reduce_sum(x: Tensor, layout: Layout) -> Tensor:
    """Sum over data-parallel ranks (tp ranks hold the same values)."""
    if layout.dp > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=layout.dp_mesh().get_group())
    return x


def broadcast_object(value: Any, layout: Layout) -> Any:
    """Rank 0's ``value`` (picklable) on every rank."""
    if not layout.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(value: Any, layout: Layout) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not layout.distributed:
        return [value]
    values: list[Any] = [None] * layout.world
    dist.all_gather_object(values, value)
    return values


def all_reduce_max(value: float, layout: Layout) -> float:
    """The largest ``value`` over all ranks."""
    if layout.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=layout.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def any_rank(flag: bool, layout: Layout) -> bool:
    """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
    return all_reduce_max(float(flag), layout) > 0


def sync_grads(params: list[nn.Parameter], layout: Layout) -> None:
    """Sum gradients of a replicated draft over dp ranks.

    The loss is already divided by the global supervised-token count, so the sum of the
    ranks' gradients is the gradient of the global loss: no averaging.
    """
    if layout.dp == 1:
        return
    group = layout.dp_mesh().get_group()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)


def parallelize_draft(
    draft: nn.Module, layout: Layout, *, fsdp: bool, compile: bool, bf16: bool
) -> nn.Module:
    """Apply, in this fixed order: (tensor parallelism: none, a draft is one layer), torch.compile
    of the decoder layer, then FSDP2 ``fully_shard`` over the dp ranks.

    FSDP2 must wrap the module whose ``forward`` runs the whole TTT unroll: calling a sharded
    submodule from outside would mix DTensors and plain tensors.
    """
    if compile:
        draft.midlayer.compile()
    if fsdp and layout.dp > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
        )
        fully_shard(draft, mesh=layout.dp_mesh(), mp_policy=policy)
        # Sum, not average: the loss is normalised by the global token count already. Plain
        # SUM collectives (no NCCL PreMulSum), which gloo also has.
        draft.set_gradient_divide_factor(1.0)
        draft.set_force_sum_reduction_for_comms(True)
    return draft


def shard_target(
    model: nn.Module, layout: Layout, decoder: nn.Module, decoder_layers: nn.ModuleList
) -> nn.Module:
    """FSDP2-shard a frozen target over the dp ranks, one unit per decoder layer, so each
    rank holds 1/dp of its weights and gathers one layer at a time."""
    from torch.distributed.fsdp import fully_shard

    if layout.dp == 1:
        return model
    for layer in decoder_layers:
        fully_shard(layer, mesh=layout.dp_mesh(), reshard_after_forward=True)
    # The root unit is the decoder, whose forward draftforge calls (the teacher uses the
    # head on its own, gathered once), so its embedding and final norm are unsharded in time.
    fully_shard(decoder, mesh=layout.dp_mesh(), reshard_after_forward=True)
    return model
