"""Multi-process training on gloo: the same numbers as one process, whatever the layout.

Runs compare with plain SGD: Adam divides by sqrt(v), which turns the last-bit differences of
a different reduction order into visible weight differences, while SGD keeps them at 1e-7.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftforge import checkpoint
from draftforge.testing import tiny_run_overrides, write_tiny_run

pytestmark = pytest.mark.dist

STEPS = 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = write_tiny_run(tmp_path_factory.mktemp("dist"), conversations=80)
    # Build the tokenised cache once, before processes race for it.
    subprocess.run(
        _cmd(1, root, root / "warm", **{"training.max_steps": 1}), check=True, capture_output=True
    )
    return root


# A draft whose head starts as the target's (the tiny target's is scaled up 30x) turns tensor
# parallelism's last-bit differences in the features into 3e-5 relative loss differences after
# 15 SGD steps at lr 0.5; a random head keeps them below 1e-6, so the parity tests use one.
RANDOM_HEAD = {"draft.head_init": "random"}


def _cmd(procs: int, root: Path, out: Path, **extra) -> list[str]:
    settings = {
        **RANDOM_HEAD,
        "training.optimizer": "sgd",
        "training.lr": 0.5,
        "training.micro_batches_per_step": 2,
        "training.tokens_per_batch": 128,
        "data.max_length": 128,
        "training.log_every": 1,
        "training.max_steps": STEPS,
        **extra,
    }
    return _train_cmd(procs, tiny_run_overrides(root, out, **settings))


def _train_cmd(procs: int, overrides: list[str]) -> list[str]:
    """``draftforge train`` as one plain process, or under torchrun with ``procs`` workers."""
    args = ["-m", "draftforge.cli", "train", *overrides]
    if procs == 1:
        return [sys.executable, *args]
    return [*_torchrun(procs), *args]


def _torchrun(procs: int) -> list[str]:
    # --standalone picks a free rendezvous port, so runs never collide.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(procs),
    ]


def _run(procs: int, root: Path, out: Path, **extra) -> subprocess.CompletedProcess:
    return _check(_cmd(procs, root, out, **extra))


def _check(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _weights(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{step:08d}" / checkpoint.WEIGHTS)


def _assert_same_run(a: Path, b: Path, steps: int = STEPS, weights_atol: float = 1e-6) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == steps
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-6, atol=1e-6)
    wa, wb = _weights(a, steps), _weights(b, steps)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-6, atol=weights_atol, msg=key)


@pytest.fixture(scope="module")
def single(workdir) -> Path:
    out = workdir / "single"
    _run(1, workdir, out)
    return out


def test_data_parallel_matches_one_process(workdir, single):
    out = workdir / "dp2"
    _run(2, workdir, out)
    _assert_same_run(single, out)


def test_fsdp_sharded_draft_matches_one_process(workdir, single):
    out = workdir / "fsdp2"
    _run(2, workdir, out, **{"parallel.fsdp": "draft"})
    _assert_same_run(single, out)


def test_muon_on_a_sharded_draft_matches_one_process(workdir):
    """Muon orthogonalises each whole matrix, also when FSDP holds it in shards. torch's Muon
    iterates in bf16, so the sharded run's different summation order shows at about 1e-4."""
    muon = {"training.optimizer": "muon", "training.lr": 0.01}
    single, sharded = workdir / "muon_single", workdir / "muon_fsdp2"
    _run(1, workdir, single, **muon)
    _run(2, workdir, sharded, **muon, **{"parallel.fsdp": "draft"})
    la, lb = _losses(single), _losses(sharded)
    assert len(la) == len(lb) == STEPS and la[-1] < 0.7 * la[0]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    ("world", "fsdp"), [(2, "none"), (4, "none"), (4, "target")], ids=["tp2", "tp2dp2", "tp2fsdp2"]
)
def test_tensor_parallel_target_matches_one_process(workdir, single, world, fsdp):
    """Each rank reads its tensor-parallel slice (and, with FSDP, its share of that) of the
    checkpoint: draftforge/target_load.py."""
    out = workdir / f"tp2_world{world}_{fsdp}"
    _run(world, workdir, out, **{"parallel.tp": 2, "parallel.fsdp": fsdp})
    _assert_same_run(single, out)


def test_sharded_target_matches_one_process(workdir, single):
    """Each rank reads only its FSDP shard of the checkpoint (draftforge/target_load.py); four
    ranks, on a dense and a MoE target: test_sharded_target_with_uneven_samples_per_rank."""
    out = workdir / "fsdp_target"
    _run(2, workdir, out, **{"parallel.fsdp": "target"})
    _assert_same_run(single, out)


@pytest.mark.slow
def test_tensor_parallel_smollm2_matches_one_process(smollm2_dir, tmp_path):
    """TP=3 on the real target: SmolLM2's 9 query / 3 KV heads split over 3 ranks (TP=2 cannot
    split them), so its o_proj and down_proj sum partial products over ranks."""
    steps = 5
    assets = Path(__file__).parents[1] / "draftforge" / "assets"
    settings = {
        **RANDOM_HEAD,
        "target.path": smollm2_dir,
        "target.cache_dir": tmp_path / "cache",
        "data.path": assets / "smoke_conversations.jsonl",
        "data.max_length": 256,
        "data.eval_fraction": 0,
        "data.num_workers": 1,
        "draft.draft_vocab_size": 2048,
        "training.optimizer": "sgd",
        "training.lr": 0.5,
        "training.warmup_steps": 0,
        "training.micro_batches_per_step": 1,
        "training.tokens_per_batch": 256,
        "training.max_steps": steps,
        "training.log_every": 1,
        "training.eval_every": 0,
        "training.save_every": 0,
    }

    def overrides(out: Path, **extra) -> list[str]:
        return [f"{k}={v}" for k, v in {**settings, "output.dir": out, **extra}.items()]

    # The single run first: it builds the tokenised cache the TP ranks then read.
    _check(_train_cmd(1, overrides(tmp_path / "single")))
    _check(_train_cmd(3, overrides(tmp_path / "tp3", **{"parallel.tp": 3})))
    # TP sums the target's partial products in another order, so the features, and from them
    # every loss and gradient, differ in the last bits. Measured (2 cores, gloo): losses
    # (~22-27) 1.9e-6 apart, one fp32 ulp, well inside rtol=1e-6; weights at most 3.3e-8 apart
    # off the unit norm weights (1.2e-7, one ulp of 1.0, inside rtol). atol=2e-7 leaves 6x
    # room over that yet sits below the mean SGD update of every non-norm matrix (1.3e-6 for
    # q_proj, 1e-4 for fc), so wrong features or gradients would not pass.
    _assert_same_run(tmp_path / "single", tmp_path / "tp3", steps=steps, weights_atol=2e-7)


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size(workdir, single, first, second):
    out = workdir / f"resume_{first}_{second}"
    half = out / "checkpoints" / f"step_{STEPS // 2:08d}"
    # The first run is killed once its mid-run checkpoint exists, as a preempted job would be.
    proc = subprocess.Popen(
        _cmd(first, workdir, out, **{"training.save_every": STEPS // 2}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not half.exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its checkpoint"
        time.sleep(0.01)
    # torchrun's workers run in sessions of their own: kill every process of this run.
    subprocess.run(["pkill", "-KILL", "-f", f"output.dir={out}"], check=False)
    proc.wait()
    resumed = _run(second, workdir, out)
    assert f"resumed from {half}" in resumed.stdout
    _assert_same_run(single, out)


def _rank_1_at_step_3(tmp_path: Path, action: str) -> Path:
    """A ``draftforge`` entry point whose rank 1 runs ``action`` (Python) at its third step."""
    script = tmp_path / "rank1.py"
    script.write_text(
        "import os, sys, time\n"
        "import draftforge.train as t\n"
        "from draftforge.cli import main\n"
        "step = t.train_step\n"
        "calls = [0]\n"
        "def patched(*args, **kwargs):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 3 and os.environ['RANK'] == '1':\n"
        f"        {action}\n"
        "    return step(*args, **kwargs)\n"
        "t.train_step = patched\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return script


def test_a_dead_rank_fails_the_job_naming_it(workdir, tmp_path):
    script = _rank_1_at_step_3(tmp_path, "os._exit(7)")
    args = tiny_run_overrides(
        workdir, tmp_path / "run", **{"training.max_steps": 6, "parallel.timeout_minutes": 1}
    )
    cmd = [*_torchrun(2), str(script), "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "rank: 1" in proc.stderr and "exitcode: 7" in proc.stderr, proc.stderr[-2000:]


# Micro-batches of 300 tokens hold two to four samples of at most 128 tokens, so the ranks of a
# step run different numbers of target forwards; eval runs too, with its own uneven shares.
UNEVEN = {
    "training.tokens_per_batch": 300,
    "data.max_length": 128,
    "training.micro_batches_per_step": 4,
    "training.eval_every": 10,
    "data.eval_fraction": 0.1,
    "parallel.fsdp": "target",
    "parallel.timeout_minutes": 0.5,
    **RANDOM_HEAD,
}


def _uneven_counts(root: Path, world: int) -> list[list[int]]:
    """Samples per rank in each optimizer step of the first epoch, as the trainer shares them."""
    from draftforge.config import load_config
    from draftforge.features import epoch_plan, prepare_data, split_eval
    from draftforge.target import load_tokenizer

    cfg = load_config(None, tiny_run_overrides(root, root / "plan", **UNEVEN))
    prepared = prepare_data(cfg, load_tokenizer(root / "target"), 320)
    dataset = prepared.dataset
    lengths = dataset.lengths()
    train_rows, _ = split_eval(dataset.ids, cfg.data.eval_fraction)
    plan = epoch_plan(train_rows, lengths, 300, cfg.training.seed, 0)
    steps = [plan[i : i + 4] for i in range(0, len(plan) - 3, 4)]
    return [[sum(len(b) for b in step[r::world]) for r in range(world)] for step in steps]


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def uneven_root(request, tmp_path_factory) -> Path:
    root = write_tiny_run(tmp_path_factory.mktemp(request.param), 64, request.param)
    _run(1, root, root / "single", **UNEVEN)
    return root


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_target_with_uneven_samples_per_rank(uneven_root, world):
    """Ranks with more samples than others used to deadlock: they were still gathering layers
    while the rest had moved on to agree on the count. Each run is bounded by its collective
    timeout (0.5 min) and the test's own, so a hang is a failure, not a stuck suite."""
    counts = _uneven_counts(uneven_root, world)
    assert any(len(set(step)) > 1 for step in counts), counts
    out = uneven_root / f"world{world}"
    proc = subprocess.run(
        _cmd(world, uneven_root, out, **UNEVEN), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(uneven_root / "single", out)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single = (uneven_root / "single" / "metrics.jsonl").read_text().splitlines()
    want = [r["loss"] for r in map(json.loads, single) if r["split"] == "eval"]
    got = [r["loss"] for r in evals if r["split"] == "eval"]
    assert len(got) == len(want) == 2
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_tensor_parallel_and_sharded_target_with_uneven_samples(uneven_root):
    """TP inside pairs of ranks and FSDP across them, on a dense and a MoE target, each rank
    reading only its piece of the checkpoint."""
    out = uneven_root / "tp2fsdp2"
    settings = {**UNEVEN, "parallel.tp": 2}
    proc = subprocess.run(
        _cmd(4, uneven_root, out, **settings), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(uneven_root / "single", out)


def test_a_stalled_rank_ends_the_job_naming_rank_and_step(workdir, tmp_path):
    script = _rank_1_at_step_3(tmp_path, "time.sleep(30)")
    args = tiny_run_overrides(
        workdir, tmp_path / "run", **{"training.max_steps": 6, "parallel.timeout_minutes": 0.1}
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [*_torchrun(2), str(script), "train", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert time.perf_counter() - start < 120
    assert "rank 0 of 2, training step 3: a collective failed or waited longer than " in (
        proc.stderr
    ), proc.stderr[-3000:]
    assert "parallel.timeout_minutes=0.1" in proc.stderr
    assert "rank 1 never reached it (dead or stalled)" in proc.stderr  # the stalled rank, named
