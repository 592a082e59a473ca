"""Draft shapes compared on one prompt set: ``draftforge bench`` and the demo's sweep.

Prompt by prompt, decoding without a draft and then every shape runs in turn, so drift in the
machine's speed slows them all alike; each shape's speedup is given end to end and for the
decoding phase alone (after each prompt's first token, :class:`~draftforge.decode.evaluate.Totals`),
beside its round cost measured by :mod:`draftforge.decode.costs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftforge.decode.costs import measure_costs
from draftforge.decode.engine import SpecEngine
from draftforge.decode.errors import DecodeError
from draftforge.decode.evaluate import (
    WARMUP_TOKENS,
    Log,
    Prompt,
    Totals,
    encode_all,
    ratio,
    typical_context,
)
from draftforge.decode.sampling import SamplingParams
from draftforge.decode.tree import TreeShape
from draftforge.models.eagle3 import Eagle3Draft
from draftforge.target import Target


@dataclass(frozen=True)
class SweepRow:
    """One draft shape's result in a sweep; ``round_ms``: its measured round cost (drafting
    plus the verify, :mod:`draftforge.decode.costs`) when costs were measured."""

    shape: TreeShape
    acceptance_length: float | None
    tokens_per_s: float
    speedup: float | None
    round_ms: float | None = None
    drafted: float | None = None  # draft tokens verified per round
    decode_speedup: float | None = None  # the speedup after each prompt's first token

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_steps": self.shape.num_steps,
            "topk": self.shape.topk,
            "num_draft_tokens": self.shape.draft_tokens,
            "min_prob": self.shape.min_prob,
            "acceptance_length": self.acceptance_length,
            "drafted_per_round": self.drafted,
            "tokens_per_s": self.tokens_per_s,
            "speedup": self.speedup,
            "decode_speedup": self.decode_speedup,
            "round_ms": self.round_ms,
        }


def shapes_to_sweep(
    steps: Sequence[int],
    topks: Sequence[int],
    draft_tokens: Sequence[int | None],
    min_probs: Sequence[float] = (0.0,),
) -> list[TreeShape]:
    """Every valid (num_steps, topk, num_draft_tokens, min_prob) combination, in sweep order.

    Chains verify num_steps + 1 tokens whatever the list says; tree settings that ask for more
    nodes than the tree drafts are left out."""
    shapes: list[TreeShape] = []
    for floor in min_probs:
        for topk in topks:
            for n in draft_tokens if topk > 1 else [None]:
                for s in steps:
                    if topk > 1 and n is not None and n > TreeShape(s, topk).candidates + 1:
                        continue
                    shape = TreeShape(s, topk, n, floor)
                    if shape not in shapes:
                        shapes.append(shape)
    return shapes


def sweep(
    target: Target,
    draft: Eagle3Draft,
    prompts: Sequence[Prompt],
    shapes: Sequence[TreeShape],
    sampling: SamplingParams,
    max_new_tokens: int,
    *,
    seed: int = 0,
    lean: bool | None = None,
    compile: bool = False,
    log: Log = print,
    on_prompt: Callable[[], object] = lambda: None,
) -> tuple[float, list[SweepRow]]:
    """Baseline tokens/s (drafting off) and one row per draft shape, with its round cost.

    Prompt by prompt, the baseline and then every shape decode it in turn, each from the same
    seed: a machine whose speed drifts during the sweep slows them all alike, so each speedup
    compares runs made side by side. Two engines serve it all (the baseline's and one that
    switches shapes), so the target's fast weights are copied twice, not once per shape.
    ``lean``/``compile``: the target path (:class:`SpecEngine`). ``on_prompt`` is called after
    each prompt of each run: ``len(prompts) * (len(shapes) + 1)`` times in all."""
    if not shapes:
        raise DecodeError("sweep: no draft shapes to run")
    plain = SpecEngine(target, None, TreeShape(0), sampling, seed=seed, lean=lean, compile=compile)
    engine = SpecEngine(target, draft, shapes[0], sampling, seed=seed, lean=lean, compile=compile)
    note = f" ({engine.path_note})" if engine.path_note else ""
    log(f"target path: {engine.path.name}{note}")
    encoded, images, _ = encode_all(target, prompts, engine.max_positions, max_new_tokens, log)
    context = typical_context(encoded, max_new_tokens)
    plain.generate(encoded[0], WARMUP_TOKENS, images=images[0])
    step_ms = measure_costs(plain, context=context).target_step_ms
    round_ms = []
    for shape in shapes:
        engine.use_shape(shape)
        engine.generate(encoded[0], WARMUP_TOKENS, images=images[0])
        round_ms.append(measure_costs(engine, context=context).round_ms(shape.draft_tokens))
    base, totals = Totals(), [Totals() for _ in shapes]
    for index, (ids, inputs) in enumerate(zip(encoded, images, strict=True)):
        plain.generator.manual_seed(seed + index)
        base.add(plain.generate(ids, max_new_tokens, images=inputs))
        on_prompt()
        for shape, total in zip(shapes, totals, strict=True):
            engine.use_shape(shape)
            engine.generator.manual_seed(seed + index)
            total.add(engine.generate(ids, max_new_tokens, images=inputs))
            on_prompt()
    prefill = base.prefill_seconds / base.seconds if base.seconds > 0 else 0.0
    log(
        f"baseline (no drafting): {base.tokens_per_s:.2f} tok/s, target step {step_ms:.1f} ms, "
        f"prefill {prefill:.0%} of its time"
    )
    rows = [
        SweepRow(
            shape=shape,
            acceptance_length=total.summary().get("acceptance_length"),
            tokens_per_s=total.tokens_per_s,
            speedup=ratio(total.tokens_per_s, base.tokens_per_s),
            round_ms=cost,
            drafted=total.summary().get("drafted_per_round"),
            decode_speedup=ratio(total.decode_tokens_per_s, base.decode_tokens_per_s),
        )
        for shape, total, cost in zip(shapes, totals, round_ms, strict=True)
    ]
    log(format_rows(rows))
    return base.tokens_per_s, rows


def format_rows(rows: Sequence[SweepRow], header: bool = True) -> str:
    """A fixed-width table of sweep rows (the header alone for no rows): ``tokens`` is the
    shape's verify size, ``drafted`` the draft tokens verified per round on average (fewer
    under ``p_min``, the shape's min_prob)."""
    lines = [
        f"{'steps':>5} {'topk':>4} {'tokens':>6} {'p_min':>5} {'drafted':>7} {'AL':>6} "
        f"{'tok/s':>8} {'speedup':>7} {'decode':>7} {'round ms':>8}"
    ]
    for r in rows:
        al = "-" if r.acceptance_length is None else f"{r.acceptance_length:.3f}"
        drafted = "-" if r.drafted is None else f"{r.drafted:.2f}"
        speedup, decode = ("-" if x is None else f"{x:.2f}x" for x in (r.speedup, r.decode_speedup))
        round_ms = "-" if r.round_ms is None else f"{r.round_ms:.1f}"
        lines.append(
            f"{r.shape.num_steps:>5} {r.shape.topk:>4} {r.shape.draft_tokens:>6} "
            f"{r.shape.min_prob:>5.2g} {drafted:>7} {al:>6} {r.tokens_per_s:>8.2f} "
            f"{speedup:>7} {decode:>7} {round_ms:>8}"
        )
    return "\n".join(lines if header else lines[1:])


def plot_sweep(rows: Sequence[SweepRow], path: str | Path, title: str = "") -> Path:
    """AL and speedup against num_steps, one line per (topk, num_draft_tokens) setting."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_al, ax_speed) = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list[SweepRow]] = {}
    for r in rows:
        label = "chain" if r.shape.topk == 1 else f"topk {r.shape.topk}"
        if r.shape.topk > 1 and r.shape.num_draft_tokens is not None:
            label += f", {r.shape.num_draft_tokens} tokens"
        if r.shape.min_prob:
            label += f", p >= {r.shape.min_prob:g}"
        groups.setdefault(label, []).append(r)
    for label, group in groups.items():
        group = sorted(group, key=lambda r: r.shape.num_steps)
        steps = [r.shape.num_steps for r in group]
        ax_al.plot(steps, [r.acceptance_length or 0 for r in group], marker="o", label=label)
        ax_speed.plot(steps, [r.speedup or 0 for r in group], marker="o", label=label)
    ax_al.set(xlabel="num_steps", ylabel="acceptance length (tokens / verify)")
    ax_speed.set(xlabel="num_steps", ylabel="speedup vs no drafting")
    ax_speed.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    for ax in (ax_al, ax_speed):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
