"""Peak memory: of offline training against the target's depth (``--mode offline``), and of
sharded loading and online training per rank against the world size (``--mode sharded``).

``--mode offline`` saves a random Llama target of ``--width`` at depths N and 2N (sharded bf16
safetensors), captures a small dataset from each (``draftforge capture``), then trains from the
capture in a subprocess twice: as ``draftforge train`` does (the target's head and embedding
only, read from its safetensors) and with the whole target loaded (``load_target``), sampling
the process's resident memory (VmRSS and VmHWM of /proc/<pid>/status) every 50 ms. The budget
is 2 GB + lm_head + embedding + draft state (weights, gradients and two Adam moments in fp32).

``--mode sharded`` saves a random Qwen3-MoE target (at least 3 GB in fp32 by default) as sharded
fp32 safetensors, then runs ``draftforge train`` (online, ``--steps`` steps) at world 1, 2 and 4
with ``parallel.fsdp=target`` and with ``parallel.tp`` = world, each rank reading its shards
(:mod:`draftforge.target_load`), then ``draftforge capture`` at the same layouts. Each rank
records its peak resident memory (VmHWM, the whole process) once the target is loaded, resets
it (``/proc/self/clear_refs``), and records it again at the end: the peak of loading (the
larger of the two runs'), of training and of capture. The goal per rank is 1.25 x target
bytes / world + 2 GB. ``--old-worlds`` also runs the old way (every rank loads the whole
target, then FSDP shards it) for contrast.

Beside each measured peak (head-only offline training; sharded loading and training) stands
``draftforge plan``'s prediction for the same run, CPU and fp32 (:func:`planned`), with its
ratio to the measurement.

    python benchmarks/memory.py [--depth 12] [--width 1024] [--vocab 32000] [--steps 3]
    nice python benchmarks/memory.py --mode sharded [--layers 10] [--experts 32] [--old-worlds 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from draftforge import checkpoint
from draftforge.machine import matmul_gflops
from draftforge.testing import tiny_run_overrides, tiny_target, tiny_tokenizer, write_tiny_run

WHOLE = (
    "import sys\n"
    "from draftforge.config import load_config\n"
    "from draftforge.target import load_target\n"
    "from draftforge.train import train\n"
    "cfg = load_config(None, sys.argv[1:])\n"
    "train(cfg, target=load_target(cfg.target))\n"
)
# Per rank, under torchrun or alone: run a draftforge command (train or capture) with the
# target loaded as given (sharded, or "old": whole, then FSDP-sharded), recording VmHWM after
# loading and, reset, at the end.
PEAKS = (
    "import json, os, sys\n"
    "import draftforge.target_load as target_load\n"
    "from draftforge.cli import main\n"
    "from draftforge.parallel import shard_target\n"
    "from draftforge.target import decoder_layers, decoder_module, load_target\n"
    "def hwm():\n"
    "    with open('/proc/self/status') as f:\n"
    "        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM:'))\n"
    "def old(cfg, layout, *, fsdp):\n"
    "    target = load_target(cfg, layout.device)\n"
    "    if fsdp:\n"
    "        m = target.model\n"
    "        shard_target(m, layout, decoder_module(m), decoder_layers(m))\n"
    "    return target\n"
    "load = old if sys.argv[2] == 'old' else target_load.load_sharded_target\n"
    "peaks = {}\n"
    "def measured(*args, **kwargs):\n"
    "    target = load(*args, **kwargs)\n"
    "    peaks['load'] = hwm()\n"
    "    with open('/proc/self/clear_refs', 'w') as f:\n"
    "        f.write('5')\n"
    "    return target\n"
    "target_load.load_sharded_target = measured\n"
    "code = main(sys.argv[3:])\n"
    "peaks['end'] = hwm()\n"
    "with open(f\"{sys.argv[1]}/rank{os.environ.get('RANK', '0')}.json\", 'w') as f:\n"
    "    json.dump(peaks, f)\n"
    "sys.exit(code)\n"
)
GB = 1e9
TOKENS, DRAFT_VOCAB = 256, 256  # training.tokens_per_batch, draft.draft_vocab_size of the runs
GOAL_FACTOR, GOAL_SLACK = 1.25, 2 * GB  # per-rank goal: 1.25 x target bytes / world + 2 GB


def peak_rss(cmd: list[str]) -> float:
    """Run ``cmd``; its peak resident memory in bytes (the larger of sampled VmRSS and VmHWM)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.05)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{err.decode()[-2000:]}")
    return peak


def save_target(directory: Path, depth: int, width: int, vocab: int) -> float:
    """A random Llama target in sharded bf16 safetensors; its size in bytes once loaded (fp32)."""
    heads = width // 128
    model = tiny_target(
        "llama",
        num_hidden_layers=depth,
        hidden_size=width,
        intermediate_size=int(width * 2.75),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=128,
        vocab_size=vocab,
    )
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    # In bf16, as checkpoints are: loading on CPU then makes fp32 copies (target.dtype auto),
    # where fp32 files would be memory-mapped and their untouched layers never resident.
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="200MB")
    tiny_tokenizer().save_pretrained(directory)
    return size


def draft_state_bytes(run: Path) -> float:
    """Weights, gradients and two Adam moments (fp32) of the draft in the run's checkpoint."""
    weights, _ = checkpoint.load_checkpoint(checkpoint.list_checkpoints(run / "checkpoints")[-1])
    return 4 * 4 * sum(t.numel() for t in weights.values() if t.is_floating_point())


def measure(root: Path, depth: int, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """(target bytes, peak RSS head-only, peak RSS whole target, budget) at one depth."""
    target = root / f"target-{depth}"
    size = save_target(target, depth, args.width, args.vocab)
    settings = {
        "target.path": target,
        "target.aux_layers": f"[0,{depth // 2},{depth - 1}]",
        "data.features_dir": root / f"features-{depth}",
        "draft.draft_vocab_size": DRAFT_VOCAB,
        "training.tokens_per_batch": TOKENS,
        "training.max_steps": args.steps,
        "data.eval_fraction": 0,
    }
    capture = tiny_run_overrides(root, root / "unused", **settings)
    cli = [sys.executable, "-m", "draftforge.cli"]
    subprocess.run([*cli, "capture", *capture, "--no-progress"], check=True, capture_output=True)
    runs = {}
    for name, command in (("head", [*cli, "train"]), ("whole", [sys.executable, "-c", WHOLE])):
        out = root / f"run-{depth}-{name}"
        overrides = tiny_run_overrides(root, out, **settings, **{"data.mode": "offline"})
        runs[name] = peak_rss([*command, *overrides])
    head_bytes = 2 * args.vocab * args.width * 4  # lm_head + embedding, fp32
    budget = 2 * GB + head_bytes + draft_state_bytes(root / f"run-{depth}-head")
    return size, runs["head"], runs["whole"], budget


def save_moe_target(directory: Path, args: argparse.Namespace) -> float:
    """A random Qwen3-MoE target in sharded fp32 safetensors (kept when ``directory`` holds
    one already); its size in bytes."""
    if not (directory / "config.json").is_file():
        model = tiny_target(
            "qwen3_moe",
            num_hidden_layers=args.layers,
            hidden_size=args.width,
            num_attention_heads=args.width // 64,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=args.moe_width,
            moe_intermediate_size=args.moe_width,
            num_experts=args.experts,
            vocab_size=args.vocab,
        )
        model.save_pretrained(directory, max_shard_size="500MB")
        tiny_tokenizer().save_pretrained(directory)
        del model
    from draftforge.target_load import weight_files

    elements = 0
    for key, file in weight_files(directory).items():
        with safe_open(str(file), framework="pt") as f:
            elements += math.prod(f.get_slice(key).get_shape())
    return 4.0 * elements


def layout_peaks(
    root: Path, target: Path, world: int, tp: int, how: str, command: str, args: argparse.Namespace
) -> tuple[float, float, float, Path]:
    """(max over ranks of the loading peak, of the peak after loading, wall seconds, the run's
    folder) of ``command`` at this layout: ``train`` (``args.steps`` online steps) or
    ``capture`` (into the folder's ``features``); ``how``: sharded or old loading."""
    out = root / f"peaks-{command}-{how}-{world}-{tp}"
    out.mkdir()
    layout = {"parallel.tp": tp, "parallel.fsdp": "target" if tp == 1 else "none"}
    overrides = tiny_run_overrides(root, out / "run", **moe_settings(target, out, args), **layout)
    if command == "capture":
        overrides.append("--no-progress")
    launch = [sys.executable]
    if world > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    start = time.perf_counter()
    script = root / "peaks.py"
    script.write_text(PEAKS)
    cmd = [*launch, str(script), str(out), how, command, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{command}, world {world}, tp {tp}, {how} failed:\n{proc.stderr[-3000:]}")
    peaks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return max(p["load"] for p in peaks), max(p["end"] for p in peaks), seconds, out


def moe_settings(target: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The runs' settings on the MoE target; captures go to ``out/features``."""
    return {
        "target.path": target,
        "target.aux_layers": f"[0,{args.layers // 2},{args.layers - 1}]",
        "draft.draft_vocab_size": DRAFT_VOCAB,
        "training.max_steps": args.steps,
        "training.tokens_per_batch": TOKENS,
        "data.max_length": 256,
        "data.eval_fraction": 0,
        "data.features_dir": out / "features",
    }


def offline_peak(root: Path, target: Path, captured: Path, args: argparse.Namespace) -> None:
    """Print the peak of offline training from the capture in ``captured/features`` against
    its budget (2 GB + lm_head + embedding + draft state) and the plan's prediction."""
    out = root / "offline"
    settings = {**moe_settings(target, captured, args), "data.mode": "offline"}
    cmd = [sys.executable, "-m", "draftforge.cli", "train"]
    peak = peak_rss([*cmd, *tiny_run_overrides(root, out / "run", **settings)])
    config = json.loads((target / "config.json").read_text())
    tables = 1 if config.get("tie_word_embeddings") else 2
    head = tables * config["vocab_size"] * config["hidden_size"] * 4  # fp32
    draft = draft_state_bytes(out / "run")
    budget = 2 * GB + head + draft
    print(
        f"offline training ({args.steps} steps) from the world-1 capture: peak {peak / GB:.2f} GB, "
        f"budget {budget / GB:.2f} GB (2 + lm_head and embedding {head / GB:.2f} + draft state "
        f"{draft / GB:.2f}), {'within' if peak <= budget else 'OVER'}; plan "
        f"{_vs(peak, planned(target, 'offline'))}",
        flush=True,
    )


def capture_workload(features: Path) -> dict[str, Any]:
    """The capture's own sizes for :func:`planned`: the padded tokens of its largest target
    forward and its largest shard, in MB (a small capture stays below both settings)."""
    from draftforge.config import TargetConfig
    from draftforge.features import forward_groups

    manifest = json.loads((features / "manifest.json").read_text())
    budget = TargetConfig.batch_tokens
    padded = 0
    for shard in manifest["shards"]:
        lengths = [b - a for a, b in zip(shard["offsets"], shard["offsets"][1:], strict=False)]
        for group in forward_groups(lengths, budget):
            padded = max(padded, len(group) * lengths[group[0]])
    shard_mb = max(shard["bytes"] for shard in manifest["shards"]) / 2**20
    return {"batch_tokens": padded, "shard_mb": shard_mb}


def planned(target: Path, stage: str, world: int = 1, tp: int = 1, **workload: Any) -> float:
    """What ``draftforge plan`` predicts per rank for this run on CPU in fp32: the loading
    peak (``load``), or a stage's peak once loaded (as VmHWM shows it, reset after loading).
    ``workload`` overrides :class:`draftforge.plan.Workload` fields; a capture of little data
    passes the padded tokens of its largest forward (``batch_tokens``) and its largest shard
    (``shard_mb``), which are less than the settings' limits."""
    from draftforge.plan import Split, Workload, predict, steady_state
    from draftforge.plan_shapes import TargetShape, load_text_config

    shape = TargetShape.of(load_text_config(target / "config.json"))
    split = Split(tp, world // tp, "target" if tp == 1 else "none")
    w = Workload.cpu(**{"tokens": TOKENS, "draft_vocab": DRAFT_VOCAB, **workload})
    estimate = predict if stage == "load" else steady_state
    return estimate(shape, stage, split, w).total


def sharded(args: argparse.Namespace) -> None:
    """The per-rank peaks of sharded loading and online training, as a table."""
    with tempfile.TemporaryDirectory(prefix="draftforge-memory-") as tmp:
        root = write_tiny_run(tmp, conversations=16)
        target = Path(args.target_dir) if args.target_dir else root / "moe-target"
        size = save_moe_target(target, args)
        print(
            f"target: Qwen3-MoE, {args.layers} layers, {args.experts} experts, {size / GB:.2f} GB fp32"
        )
        layouts = [(w, 1, "sharded") for w in args.worlds]
        layouts += [(w, w, "sharded") for w in args.worlds if w > 1]
        layouts += [(w, 1, "old") for w in args.old_worlds]
        print(
            f"{'world':>5} {'tp':>3} {'fsdp':>6} {'loading':>8} {'load GB':>8} {'train GB':>8} "
            f"{'capture GB':>10} {'goal GB':>8} {'ok':>3} {'s':>5} {'plan load':>11} "
            f"{'plan train':>11} {'plan capture':>12}"
        )
        first_capture: Path | None = None
        for world, tp, how in layouts:
            load, run, seconds, _ = layout_peaks(root, target, world, tp, how, "train", args)
            peaks = [load, run]
            plan = ""
            captured = "-"
            if how != "old":
                plan = f"{_vs(load, planned(target, 'load', world, tp))} "
                plan += f"{_vs(run, planned(target, 'online', world, tp))} "
                load_c, cap, more, out = layout_peaks(root, target, world, tp, how, "capture", args)
                first_capture = first_capture or out
                peaks += [load_c, cap]
                load = max(load, load_c)  # both runs load the target the same way
                seconds += more
                captured = f"{cap / GB:.2f}"
                workload = capture_workload(out / "features")
                plan += _vs(cap, planned(target, "capture", world, tp, **workload))
            goal = GOAL_FACTOR * size / world + GOAL_SLACK
            ok = "yes" if max(peaks) <= goal else "no"
            print(
                f"{world:>5} {tp:>3} {'target' if tp == 1 else 'none':>6} {how:>8} "
                f"{load / GB:>8.2f} {run / GB:>8.2f} "
                f"{captured:>10} {goal / GB:>8.2f} {ok:>3} {seconds:>5.0f} {plan}",
                flush=True,
            )
        if first_capture is not None:
            offline_peak(root, target, first_capture, args)


def _vs(measured: float, predicted: float) -> str:
    """A prediction in GB and its ratio to the measurement, e.g. ``2.43 (1.07)``."""
    return f"{predicted / GB:>5.2f} ({predicted / measured:.2f})"


def offline(args: argparse.Namespace) -> None:
    """Offline training's peak at depth N and 2N, head-only against the whole target."""
    with tempfile.TemporaryDirectory(prefix="draftforge-memory-") as tmp:
        root = write_tiny_run(tmp, conversations=16)
        rows = [(d, *measure(root, d, args)) for d in (args.depth, 2 * args.depth)]
        plans = [planned(root / f"target-{d}", "offline") for d, *_ in rows]
    print(
        f"{'depth':>5} {'target GB':>9} {'whole GB':>9} {'head GB':>8} {'head/whole':>10} "
        f"{'budget GB':>9} {'plan head':>12}"
    )
    for (depth, size, head, whole, budget), plan in zip(rows, plans, strict=True):
        print(
            f"{depth:>5} {size / GB:>9.2f} {whole / GB:>9.2f} {head / GB:>8.2f} "
            f"{head / whole:>10.2f} {budget / GB:>9.2f} {_vs(head, plan):>12}"
        )
    (_, _, head_n, whole_n, _), (_, _, head_2n, whole_2n, _) = rows
    print(f"2N/N peak: head-only {head_2n / head_n:.3f}, whole target {whole_2n / whole_n:.3f}")


def _worlds(text: str) -> list[int]:
    return [int(w) for w in text.split(",") if w]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["offline", "sharded"], default="offline")
    parser.add_argument("--depth", type=int, default=12, help="offline: N, targets of N and 2N")
    parser.add_argument("--width", type=int, default=1024, help="hidden size (a multiple of 128)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--layers", type=int, default=10, help="sharded: the MoE target's depth")
    parser.add_argument("--experts", type=int, default=32, help="sharded: experts per layer")
    parser.add_argument("--moe-width", type=int, default=768, help="sharded: expert width")
    parser.add_argument("--worlds", type=_worlds, default=[1, 2, 4], help="sharded: e.g. 1,2,4")
    parser.add_argument(
        "--old-worlds", type=_worlds, default=[2], help="sharded: worlds to run the old way too"
    )
    parser.add_argument("--target-dir", help="sharded: keep the saved target here (reused)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fp32 1024x1024 matmul: {matmul_gflops():.1f} GFLOP/s on {args.threads} threads")
    if args.mode == "offline":
        offline(args)
    else:
        sharded(args)


if __name__ == "__main__":
    main()
