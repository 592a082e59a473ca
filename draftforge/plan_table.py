"""``draftforge plan``: for each target config, the smallest layout per stage that fits nodes
of a given GPU, as a table, with the assumptions stated once.

The search tries 1, 2, 4, ... GPUs (several nodes once one is not enough); at each size every
tensor-parallel degree inside a node that the sharded loader accepts for the target
(:func:`draftforge.parallel.tp_problem`), and every ``parallel.fsdp`` choice that matters for
the stage; the first size where a layout's
:func:`draftforge.plan.predict` fits wins, and among its fitting layouts the one with the
lowest peak.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from draftforge.parallel import tp_problem
from draftforge.plan import GIB, STAGES, Estimate, Split, Stage, Workload, predict
from draftforge.plan_shapes import TargetShape, load_text_config, quiet_transformers

HEADROOM = 0.9  # a layout fits when its peak is at most this share of the GPU's memory
FSDP_CHOICES: dict[Stage, tuple[str, ...]] = {
    "load": ("none", "target"),
    "capture": ("none", "target"),
    "online": ("none", "draft", "target", "both"),
    "offline": ("none", "draft"),
}


@dataclass(frozen=True)
class Node:
    """A machine of ``gpus`` GPUs of ``memory`` bytes each."""

    gpus: int
    memory: float

    def __str__(self) -> str:
        return f"{self.gpus} x {self.memory / 1e9:.0f} GB"


def splits(shape: TargetShape, stage: Stage, world: int, node: Node) -> Iterator[Split]:
    """The layouts of ``world`` GPUs worth trying for a stage: tensor parallelism inside a
    node (offline training has no target to split), FSDP choices only with dp > 1."""
    for tp in range(1, min(node.gpus, world) + 1):
        if world % tp or (tp > 1 and (stage == "offline" or not shape.tp_plan)):
            continue
        if tp_problem(shape.text, tp, world):
            continue
        for fsdp in FSDP_CHOICES[stage] if world > tp else ("none",):
            yield Split(tp, world // tp, fsdp)


def smallest(
    shape: TargetShape, stage: Stage, w: Workload, node: Node, max_gpus: int
) -> Estimate | None:
    """The fitting layout with the fewest GPUs (then the lowest peak), or None up to
    ``max_gpus``."""
    world = 1
    while world <= max_gpus:
        fits = [
            e
            for split in splits(shape, stage, world, node)
            if (e := predict(shape, stage, split, w)).total <= HEADROOM * node.memory
        ]
        if fits:
            return min(fits, key=lambda e: e.total)
        world *= 2
    return None


def assumptions(w: Workload, nodes: list[Node]) -> str:
    """The one block of assumptions the table rests on."""
    return "\n".join(
        [
            "Assumptions: per-rank peak of the process that runs each stage (its loading "
            "included);",
            f"  target weights {8 * w.weight_bytes}-bit, draft compute "
            f"{'bf16 autocast' if w.compute_bytes == 2 else 'fp32'}, {w.runtime_bytes / GIB:.1f} "
            "GiB per process for CUDA context, NCCL and cuBLAS (assumed);",
            f"  {w.tokens} tokens per micro-batch, {w.micro_batches} micro-batch(es) per rank per "
            f"step, {w.batch_tokens} padded tokens per target forward, {w.steps} TTT steps, draft "
            f"vocabulary {w.draft_vocab};",
            "  fused attention (no T x T scores); capture's shard and offline read-ahead in host "
            "RAM, not counted;",
            f"  tp inside a node, FSDP over the dp ranks; fits = peak <= {HEADROOM:.0%} of a "
            f"GPU ({', '.join(map(str, nodes))}); sizes 1, 2, 4, ... GPUs.",
        ]
    )


def _cell(estimate: Estimate | None, node: Node) -> str:
    if estimate is None:
        return f"{'-':>5} {'does not fit':<30} {'':>6}"
    world = estimate.split.world
    nodes = f" ({-(-world // node.gpus)} nodes)" if world > node.gpus else ""
    return f"{world:>5} {str(estimate.split) + nodes:<30} {estimate.total / GIB:>6.1f}"


def config_table(
    path: str | Path, w: Workload, nodes: list[Node], max_gpus: int, detail: bool = False
) -> str:
    """One config's header line and its table: per stage and node type, the smallest fitting
    layout (GPUs, layout, GiB per rank); with ``detail``, each estimate's parts."""
    with quiet_transformers():
        shape = TargetShape.of(load_text_config(path))
    text = shape.text
    lines = [
        f"{Path(path).stem}: {shape.params / 1e9:.1f}B params, {shape.layers} layers, hidden "
        f"{text.hidden_size}, vocab {text.vocab_size}; weights {shape.params * w.weight_bytes / GIB:.0f} GiB"
        + ("" if shape.tp_plan else "; no tensor-parallel plan in transformers"),
        f"{'stage':<8} "
        + " | ".join(f"{'GPUs':>5} {'layout, ' + str(n):<30} {'GiB':>6}" for n in nodes),
    ]
    chosen = []
    for stage in STAGES:
        row = [smallest(shape, stage, w, node, max_gpus) for node in nodes]
        chosen += [e for e in row if e is not None]
        lines.append(
            f"{stage:<8} " + " | ".join(_cell(e, n) for e, n in zip(row, nodes, strict=True))
        )
    if detail:
        lines += [f"  {line}" for line in dict.fromkeys(e.describe() for e in chosen)]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``draftforge plan``'s arguments."""
    p.add_argument("configs", nargs="+", help="target config.json files (no weights needed)")
    p.add_argument("--tokens", type=int, default=4096, help="training.tokens_per_batch")
    p.add_argument(
        "--batch-tokens", type=int, default=8192, help="target.batch_tokens (per target forward)"
    )
    p.add_argument("--steps", type=int, default=7, help="training.ttt_steps")
    p.add_argument("--draft-vocab", type=int, default=32000, help="draft.draft_vocab_size")
    p.add_argument(
        "--gpu-memory",
        type=float,
        nargs="+",
        default=[80.0, 141.0],
        metavar="GB",
        help="memory of one GPU, one table column per value (default: H100 and H200)",
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--max-gpus", type=int, default=256, help="largest layout to try")
    p.add_argument("--detail", action="store_true", help="each chosen layout's terms")


def print_tables(args: argparse.Namespace) -> None:
    """The assumptions, then each config's table."""
    nodes = [Node(args.gpus_per_node, gb * 1e9) for gb in args.gpu_memory]
    workload = Workload(
        tokens=args.tokens,
        batch_tokens=args.batch_tokens,
        steps=args.steps,
        draft_vocab=args.draft_vocab,
    )
    print(assumptions(workload, nodes) + "\n")
    for path in args.configs:
        print(config_table(path, workload, nodes, args.max_gpus, args.detail) + "\n")
