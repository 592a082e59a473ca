"""A run's training curves: loss, acc_k and the AL estimate, train and held out.

``draftforge report RUN_DIR`` draws them from ``RUN_DIR/metrics.jsonl`` (what
:class:`draftforge.metrics.Trackers` writes) to ``RUN_DIR/report.png``; the demo's report
draws its loss and acc_k panels with the same functions. Needs matplotlib (the ``plot``
extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from draftforge import require_extra
from draftforge.metrics import read_records

Records = list[dict[str, Any]]


def split_records(records: Records) -> tuple[Records, Records]:
    """(train, held-out) records."""
    return (
        [r for r in records if r["split"] == "train"],
        [r for r in records if r["split"] == "eval"],
    )


def _curve(ax: Any, rows: Records, key: str, style: str, **kwargs: Any) -> None:
    points = [(r["step"], r[key]) for r in rows if key in r]
    if points:
        ax.plot(*zip(*points, strict=True), style, **kwargs)


def plot_loss(ax: Any, train: Records, held_out: Records) -> None:
    _curve(ax, train, "loss", "-", label="train")
    _curve(ax, held_out, "loss", "o-", label="held out")
    ax.set(xlabel="step", ylabel="TTT loss", title="loss")


def acc_keys(records: Records) -> list[str]:
    """``acc_0``, ``acc_1``, ... present in the records, by TTT step."""
    keys = {k for r in records for k in r if k.startswith("acc_") and k[4:].isdigit()}
    return sorted(keys, key=lambda k: int(k[4:]))


def plot_acc(ax: Any, train: Records, held_out: Records) -> None:
    """acc_k of each TTT step: train as lines, held out as markers of the same colour."""
    for i, key in enumerate(acc_keys(train + held_out)):
        colour = f"C{int(key[4:]) % 10}"
        _curve(ax, train, key, "-", color=colour, label=key)
        _curve(ax, held_out, key, "o--", color=colour, label=None if i else "held out (o)")
    ax.set(xlabel="step", ylabel="top-1 agreement with the target", title="acc_k")
    ax.set_ylim(0, 1)


def plot_al(ax: Any, train: Records, held_out: Records) -> None:
    _curve(ax, train, "al_estimate", "-", label="train")
    _curve(ax, held_out, "al_estimate", "o-", label="held out")
    ax.set(xlabel="step", ylabel="1 + sum_k prod_j<=k acc_j", title="acceptance length estimate")


def plot_run(run_dir: Path) -> tuple[Path, Records, Records]:
    """Draw the curves of ``run_dir/metrics.jsonl`` to ``run_dir/report.png``; returns the
    image and the train and held-out records drawn."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist: give a run directory (output.dir)")
    train, held_out = split_records(read_records(metrics))
    matplotlib = require_extra("matplotlib", "plot", "draftforge report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for draw, ax in zip((plot_loss, plot_acc, plot_al), axes, strict=True):
        draw(ax, train, held_out)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"{run_dir.resolve().name}: {len(train)} train and {len(held_out)} held-out records"
    )
    fig.tight_layout()
    path = run_dir / "report.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, train, held_out
