"""Peak memory of offline training against the target's depth.

Saves a random Llama target of ``--width`` at depths N and 2N (sharded bf16 safetensors),
captures a small dataset from each (``draftforge capture``), then trains from the capture in a
subprocess twice: as ``draftforge train`` does (the target's head and embedding only, read
from its safetensors) and with the whole target loaded (``load_target``), sampling the
process's resident memory (VmRSS and VmHWM of /proc/<pid>/status) every 50 ms. The budget is
2 GB + lm_head + embedding + draft state (weights, gradients and two Adam moments in fp32).

    python benchmarks/memory.py [--depth 12] [--width 1024] [--vocab 32000] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from draftforge import checkpoint
from draftforge.testing import tiny_run_overrides, tiny_target, tiny_tokenizer, write_tiny_run

WHOLE = (
    "import sys\n"
    "from draftforge.config import load_config\n"
    "from draftforge.target import load_target\n"
    "from draftforge.train import train\n"
    "cfg = load_config(None, sys.argv[1:])\n"
    "train(cfg, target=load_target(cfg.target))\n"
)
GB = 1e9


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    """The best fp32 rate of an n x n matmul on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


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
        "draft.draft_vocab_size": 256,
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=12, help="N: targets of N and 2N layers")
    parser.add_argument("--width", type=int, default=1024, help="hidden size (a multiple of 128)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fp32 2048x2048 matmul: {matmul_gflops():.1f} GFLOP/s on {args.threads} threads")
    with tempfile.TemporaryDirectory(prefix="draftforge-memory-") as tmp:
        root = write_tiny_run(tmp, conversations=16)
        rows = [(d, *measure(root, d, args)) for d in (args.depth, 2 * args.depth)]
    print(
        f"{'depth':>5} {'target GB':>9} {'whole GB':>9} {'head GB':>8} {'head/whole':>10} "
        f"{'budget GB':>9}"
    )
    for depth, size, head, whole, budget in rows:
        print(
            f"{depth:>5} {size / GB:>9.2f} {whole / GB:>9.2f} {head / GB:>8.2f} "
            f"{head / whole:>10.2f} {budget / GB:>9.2f}"
        )
    (_, _, head_n, whole_n, _), (_, _, head_2n, whole_2n, _) = rows
    print(f"2N/N peak: head-only {head_2n / head_n:.3f}, whole target {whole_2n / whole_n:.3f}")


if __name__ == "__main__":
    main()
