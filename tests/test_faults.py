"""The fault-injection suite: faults and misuse that must end in one clear line, never in a
traceback, a silent loss or a useless result.

Sections: bad inputs to `draftforge prepare` (the same `prepare` runs inside `train` and
`capture`); overlapping paths; concurrent runs; damaged captures; preemption and kills at
random points (SIGTERM and SIGKILL, training and capture); damaged files of every other kind
the tool writes (checkpoints, metrics, exports; the dataset cache's own damage tests are in
`test_data_cache.py`); nonsense settings and small untruths. Every interrupted or damaged run
must end bitwise equal to the uninterrupted one, or be refused by name.
"""

import gzip
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftforge import checkpoint
from draftforge.cli import main
from draftforge.config import describe_options
from draftforge.data import DataError, prepare
from draftforge.locks import LOCK_FILE
from draftforge.shards import ShardReader
from draftforge.testing import tiny_run_overrides, write_tiny_run


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny target and tokenizer, and `data.jsonl` with four good conversations."""
    return write_tiny_run(tmp_path_factory.mktemp("faults"), conversations=4)


def prepare_cli(root: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`draftforge prepare` on the tiny target with `data.path=data`: exit code, the
    `error:` lines of stderr (at most one is expected) and stdout."""
    code = main(["prepare", *tiny_run_overrides(root, root / "out", **{"data.path": data})])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if "draftforge prepare: error:" in line]
    assert len(errors) <= 1, errors
    return code, "".join(errors), captured.out


# ---- bad inputs


# file name -> what the error about it says first
BAD_FILES = {
    "corrupt.jsonl.gz": "cannot decompress it",
    "truncated.jsonl.gz": "cannot decompress it",
    "text.parquet": "not readable as Parquet",
    "rows.xyz": "unsupported file type",
}


def _bad_content(name: str, good: bytes) -> bytes:
    packed = gzip.compress(good)
    return {
        "corrupt.jsonl.gz": packed[:10] + b"\xff not deflate" * 8,  # a gzip header, then garbage
        "truncated.jsonl.gz": packed[: len(packed) // 2],
        "text.parquet": good,
        "rows.xyz": good,
    }[name]


@pytest.mark.parametrize(("name", "says"), BAD_FILES.items(), ids=list(BAD_FILES))
def test_unreadable_files_are_one_line_errors_naming_the_file(
    run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, says: str
) -> None:
    path = tmp_path / name
    path.write_bytes(_bad_content(name, (run_root / "data.jsonl").read_bytes()))
    code, error, _ = prepare_cli(run_root, path, capsys)
    assert code == 2
    assert error.startswith(f"draftforge prepare: error: {path}: {says}")
    assert any(fix in error for fix in ("again", "convert it"))  # ... and what to do


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("", "no usable conversations: 0 rows read; point data.path at"),
        ("not json\n" * 12, "no usable conversations: all 12 rows were dropped (12 malformed_json"),
    ],
    ids=["empty", "every_row_malformed"],
)
def test_input_without_usable_rows_fails_prepare(
    run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, says: str
) -> None:
    path = tmp_path / "chats.jsonl"
    path.write_text(content)
    code, error, out = prepare_cli(run_root, path, capsys)
    assert (code, out) == (2, "")  # no summary, no draft vocabulary
    assert error.startswith(f"draftforge prepare: error: {path}: {says}")
    if content:
        assert f"e.g. {path}:1: " in error  # the first bad row, by file and line
    # `train` and `capture` prepare through the same function: they stop here too.
    with pytest.raises(DataError, match="no usable conversations"):
        prepare(
            path,
            tokenizer=run_root / "target",
            cache_dir=run_root / "cache",
            num_workers=1,
            draft_vocab_size=32,
            progress=False,
        )


def test_folder_names_the_files_it_skips(
    run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("how this data was made")
    (mixed / "table.csv").write_text("question,answer\nq,a\n")
    (mixed / "chats.jsonl").write_bytes((run_root / "data.jsonl").read_bytes())
    code, error, out = prepare_cli(run_root, mixed, capsys)
    assert (code, error) == (0, "")
    assert "rows read: 4, kept: 4" in out
    assert "skipped 2 files (unsupported_file_type)" in out
    for name in ("notes.txt", "table.csv"):
        assert f"{mixed / name}: not read; convert it to" in out

    only_text = tmp_path / "only_text"
    only_text.mkdir()
    (only_text / "notes.txt").write_text(json.dumps({"messages": []}))
    code, error, _ = prepare_cli(run_root, only_text, capsys)
    assert code == 2
    assert error.startswith(
        f"draftforge prepare: error: {only_text}: no usable conversations: no data files inside "
        "(skipped notes.txt: unsupported file type); add or convert files to"
    )


# ---- overlapping paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny target with eight conversations (`root/target`, `root/data.jsonl`) and a run
    trained on them for two steps (`root/run`)."""
    root = write_tiny_run(tmp_path_factory.mktemp("trained"), conversations=8)
    assert main(["train", *_overrides(root, root / "run", **{"training.max_steps": 2})]) == 0
    return root


def _overrides(root: Path, out: Path, **extra: object) -> list[str]:
    settings = {"data.eval_fraction": 0, "data.features_dir": root / "features", **extra}
    return tiny_run_overrides(root, out, **settings)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if f"draftforge {command}: error:" in line]
    return line


@pytest.mark.parametrize(
    ("source", "out", "says"),
    [
        ("run", "run", "is the run or checkpoint being exported"),
        ("run", "run/checkpoints/sglang", "lies inside"),
        ("run", ".", "contains"),
        ("run/checkpoints/step_00000002", "run", "contains"),
    ],
    ids=["same", "inside", "containing", "run_of_the_checkpoint"],
)
def test_export_never_overwrites_its_source(
    trained: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    source: str,
    out: str,
    says: str,
) -> None:
    shutil.copytree(trained / "run", tmp_path / "run")
    before = _snapshot(tmp_path)
    args = ["export", str(tmp_path / source), "--format", "sglang", "--force"]
    assert main([*args, "--out", str(tmp_path / out)]) == 2
    error = _one_error(capsys, "export")
    assert f"--out {tmp_path / out} {says}" in error and "choose a directory outside it" in error
    assert _snapshot(tmp_path) == before


def test_force_replaces_only_a_previous_export(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other_run = tmp_path / "other_run"
    shutil.copytree(trained / "run", other_run)
    capture = tmp_path / "capture"
    capture.mkdir()
    (capture / "manifest.json").write_text(json.dumps({"format": "draftforge-features"}))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    refusals = {
        other_run: "holds a training run, which an export never replaces",
        capture: "holds captured features, which an export never replaces",
        mine: "is not empty and holds no draftforge export (no draftforge_export.json)",
    }
    export = ["export", str(trained / "run"), "--format", "sglang", "--force", "--out"]
    for out, says in refusals.items():
        before = _snapshot(out)
        assert main([*export, str(out)]) == 2
        assert f"--out {out} {says}" in _one_error(capsys, "export")
        assert _snapshot(out) == before

    previous = tmp_path / "previous"
    assert main([*export[:-2], "--out", str(previous)]) == 0
    assert main([*export[:-2], "--out", str(previous)]) == 2
    assert "holds a previous export: choose another directory or pass --force" in _one_error(
        capsys, "export"
    )
    assert main([*export, str(previous)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        *sorted(p.name for p in refusals),
        "previous",
    ]


# ---- concurrent runs


def _train_process(root: Path, out: Path, **extra: object) -> subprocess.Popen[str]:
    args = _overrides(root, out, **extra)
    return subprocess.Popen(
        [sys.executable, "-m", "draftforge.cli", "train", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_second_train_into_one_output_dir_stops_and_the_first_is_intact(trained: Path) -> None:
    out = trained / "shared"
    first = _train_process(
        trained,
        out,
        **{
            "training.max_steps": 100_000,
            "training.log_every": 1,
            "training.save_every": 2,
            "training.keep_checkpoints": 1,
        },
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run logged no step"
            time.sleep(0.2)
        second = _train_process(trained, out, **{"training.max_steps": 2})
        _, err = second.communicate(timeout=180)
        assert second.returncode == 2 and "Traceback" not in err, err
        (line,) = err.splitlines()
        assert line.startswith(
            f"draftforge train: error: {out} is in use by draftforge train "
            f"(pid {first.pid} on {socket.gethostname()}, since "
        )
        assert line.endswith("); wait for it to end, or use another output.dir")
    finally:
        first.send_signal(signal.SIGTERM)  # it stops at a step boundary with a checkpoint
        first.communicate(timeout=180)
    assert first.returncode == 143
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    checkpoints = checkpoint.list_checkpoints(out / "checkpoints")
    assert checkpoints and checkpoints[-1].name == f"step_{steps[-1]:08d}"
    for path in checkpoints:
        checkpoint.verify(path)
    assert not (out / LOCK_FILE).exists()


def _lock_record(pid: int, host: str) -> str:
    return json.dumps(
        {"command": "draftforge train", "pid": pid, "host": host, "since": time.time() - 60}
    )


def test_a_lock_left_by_a_dead_process_is_taken_over(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(dead.stdout)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(_lock_record(pid, socket.gethostname()))
    assert main(["train", *_overrides(trained, out, **{"training.max_steps": 1})]) == 0
    printed = capsys.readouterr().out
    assert (
        f"note: taking over {out / LOCK_FILE}, left by draftforge train (pid {pid} on " in printed
    )
    assert "which no longer runs" in printed
    assert not (out / LOCK_FILE).exists() and (out / "checkpoints" / "step_00000001").is_dir()


def test_a_lock_from_another_host_is_never_broken(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(_lock_record(os.getpid(), "another-host"))
    assert main(["train", *_overrides(trained, out, **{"training.max_steps": 1})]) == 2
    error = _one_error(capsys, "train")
    assert f"{out} is locked by draftforge train (pid {os.getpid()} on another-host, since" in error
    assert error.endswith(f"once it has ended, delete {lock}")
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]


HOLDER = """
import sys, time
from pathlib import Path
from draftforge.locks import hold
lock_file = Path(sys.argv[2]) if len(sys.argv) > 2 else None
with hold(Path(sys.argv[1]), "draftforge capture", RuntimeError, "", lock_file=lock_file):
    print("holding", flush=True)
    time.sleep(600)
"""


@contextmanager
def _held(*paths: Path) -> Iterator[int]:
    """Another process holding the lock of ``paths[0]`` (``paths[1]``: its lock file); its pid.
    It is stopped with SIGTERM and must remove the lock file as it ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, paths)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        yield holder.pid
    finally:
        holder.terminate()
        assert holder.wait(timeout=60) == 128 + signal.SIGTERM
    assert not (paths[-1] if len(paths) > 1 else paths[0] / LOCK_FILE).exists()


def test_capture_and_export_stop_while_another_process_holds_their_folder(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features = tmp_path / "features"
    with _held(features) as pid:
        overrides = _overrides(trained, tmp_path / "unused", **{"data.features_dir": features})
        assert main(["capture", *overrides, "--no-progress"]) == 2
        error = _one_error(capsys, "capture")
        assert f"{features} is in use by draftforge capture (pid {pid} on " in error
        assert error.endswith("; wait for it to end, or set data.features_dir to another folder")
        assert not any(p.name != LOCK_FILE for p in features.iterdir())

    out = tmp_path / "sglang"
    with _held(out, tmp_path / f".sglang{LOCK_FILE}") as pid:
        export = ["export", str(trained / "run"), "--format", "sglang", "--out", str(out)]
        assert main(export) == 2
        error = _one_error(capsys, "export")
        assert f"{out} is in use by draftforge capture (pid {pid} on " in error
        assert error.endswith("; wait for it to end, or choose another --out")
    assert not out.exists()


# ---- damaged captures


def _capture(root: Path, features: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """`draftforge capture` into ``features`` (a shard per sample); what it printed."""
    overrides = _overrides(
        root, root / "unused", **{"data.features_dir": features, "data.shard_mb": 0.05}
    )
    assert main(["capture", *overrides, "--no-progress"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _trains_from(root: Path, features: Path, out: Path) -> int:
    overrides = _overrides(
        root,
        out,
        **{"data.features_dir": features, "data.mode": "offline", "training.max_steps": 1},
    )
    return main(["train", *overrides])


def test_capture_recaptures_damaged_shards_of_a_finished_capture(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features = tmp_path / "features"
    _capture(trained, features, capsys)
    manifest = json.loads((features / "manifest.json").read_text())
    assert len(manifest["shards"]) == 8
    flipped, cut, gone = (features / manifest["shards"][i]["file"] for i in (1, 4, 6))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-10])
    gone.unlink()
    assert _trains_from(trained, features, tmp_path / "refused") == 2
    assert "sha256 differs" in _one_error(capsys, "train")

    printed = _capture(trained, features, capsys)
    assert (
        f"{flipped}: sha256 differs from manifest.json: the shard is damaged; capturing it again"
        in printed
    )
    assert f"{cut}: " in printed and "(truncated or replaced); capturing it again" in printed
    assert f"{gone}: missing (listed in manifest.json); capturing it again" in printed
    assert "nothing left to capture" not in printed
    repaired = json.loads((features / "manifest.json").read_text())
    assert [s["rows"] for s in repaired["shards"]] == [s["rows"] for s in manifest["shards"]]
    assert _trains_from(trained, features, tmp_path / "run") == 0
    assert "nothing left to capture" in _capture(trained, features, capsys)


def test_a_resumed_capture_checks_the_checksums_of_its_shards(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features = tmp_path / "features"
    _capture(trained, features, capsys)
    # Back to an unfinished capture: the manifest's shards recorded as one rank's progress.
    manifest = json.loads((features / "manifest.json").read_text())
    progress = features / "progress-r000of001.json"
    progress.write_text(json.dumps({**manifest, "done": False}))
    (features / "manifest.json").unlink()
    flipped = features / manifest["shards"][5]["file"]
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0x01
    flipped.write_bytes(bytes(data))

    printed = _capture(trained, features, capsys)
    assert (
        f"{flipped}: sha256 differs from {progress.name}: the shard is damaged; capturing again from it"
        in printed
    )
    assert _trains_from(trained, features, tmp_path / "run") == 0


def test_capture_does_not_send_a_broken_manifest_back_to_itself(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features = tmp_path / "features"
    _capture(trained, features, capsys)
    manifest = json.loads((features / "manifest.json").read_text())
    manifest["shards"].pop(2)
    (features / "manifest.json").write_text(json.dumps(manifest))
    assert _trains_from(trained, features, tmp_path / "run") == 2
    assert "capture again with this config (`draftforge capture`)" in _one_error(capsys, "train")
    overrides = _overrides(trained, tmp_path / "unused", **{"data.features_dir": features})
    assert main(["capture", *overrides, "--no-progress"]) == 2
    error = _one_error(capsys, "capture")
    assert "1 dataset samples have no features" in error
    assert error.endswith(
        "set data.features_dir to another folder, or delete this one to capture again"
    )


# ---- training runs: shared helpers


def _train_cmd(root: Path, out: Path, **extra: object) -> list[str]:
    settings = {"training.log_every": 1, "training.max_steps": 24, **extra}
    return [
        sys.executable,
        "-m",
        "draftforge.cli",
        "train",
        *tiny_run_overrides(root, out, **settings),
    ]


def _final_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step_{step:08d}" / checkpoint.WEIGHTS)


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    """Until ``path`` has content: metrics.jsonl is opened before training's SIGTERM handler is
    set (on every rank), its first record is written after it."""
    deadline = time.time() + 300
    while not (path.exists() and path.stat().st_size):
        assert proc.poll() is None and time.time() < deadline, f"the run ended before {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run's files and its tokenised cache, built once before processes race for it."""
    root = write_tiny_run(tmp_path_factory.mktemp("train_faults"), conversations=48)
    subprocess.run(
        _train_cmd(root, root / "warm", **{"training.max_steps": 1}),
        check=True,
        capture_output=True,
    )
    return root


@pytest.fixture(scope="module")
def reference(train_root: Path) -> Path:
    """The uninterrupted 24-step run every interrupted one must end up equal to."""
    out = train_root / "reference"
    subprocess.run(_train_cmd(train_root, out), check=True, capture_output=True)
    return out


# ---- preemption and kills


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bitwise_identical(
    train_root: Path, reference: Path
) -> None:
    out = train_root / "sigterm"
    # No periodic checkpoints: whatever is saved, SIGTERM saved it.
    cmd = _train_cmd(train_root, out, **{"training.save_every": 0})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "metrics.jsonl", proc, "its first step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    (line,) = [line for line in err.splitlines() if "terminated (SIGTERM) at step" in line]
    step = int(line.split("at step ")[1].split(":")[0])
    assert 0 < step < 24
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == [
        f"step_{step:08d}"
    ]
    checkpoint.verify(out / "checkpoints" / f"step_{step:08d}")
    resumed = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in resumed.stdout
    _assert_bitwise_equal(_final_weights(reference, 24), _final_weights(out, 24))


@pytest.mark.dist
def test_sigterm_under_torchrun_stops_both_ranks_at_one_step_and_resumes_exactly(
    train_root: Path,
) -> None:
    settings = {
        "training.micro_batches_per_step": 2,
        "training.save_every": 0,
        "training.max_steps": 16,
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

    def cmd(out: Path) -> list[str]:
        overrides = tiny_run_overrides(train_root, out, **{"training.log_every": 1, **settings})
        return [*torchrun, "--nproc-per-node", "2", "-m", "draftforge.cli", "train", *overrides]

    whole = train_root / "dist_whole"
    subprocess.run(cmd(whole), check=True, capture_output=True, timeout=300)
    out = train_root / "dist_sigterm"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "metrics.jsonl", proc, "its first step")
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    _, err = proc.communicate(timeout=120)
    steps = {
        int(line.split("at step ")[1].split(":")[0])
        for line in err.splitlines()
        if "terminated (SIGTERM) at step" in line
    }
    assert len(steps) == 1, err[-3000:]  # both ranks said so, and at the same step
    (step,) = steps
    assert err.count("terminated (SIGTERM) at step") == 2
    checkpoint.verify(out / "checkpoints" / f"step_{step:08d}")
    subprocess.run(cmd(out), check=True, capture_output=True, timeout=300)
    _assert_bitwise_equal(_final_weights(whole, 16), _final_weights(out, 16))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_point_then_resume_is_bitwise_identical(
    train_root: Path, reference: Path, seed: int
) -> None:
    out = train_root / f"killed_{seed}"
    cmd = _train_cmd(train_root, out, **{"training.save_every": 3})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(out / "metrics.jsonl", proc, "its first step")
    time.sleep(random.Random(seed).uniform(0.0, 1.0))
    proc.kill()
    proc.wait()
    subprocess.run(cmd, check=True, capture_output=True)
    _assert_bitwise_equal(_final_weights(reference, 24), _final_weights(out, 24))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_capture_killed_at_a_random_point_resumes_to_the_same_features(
    train_root: Path, seed: int
) -> None:
    def cmd(features: Path) -> list[str]:
        overrides = tiny_run_overrides(
            train_root,
            train_root / "unused",
            **{"data.features_dir": features, "data.shard_mb": 0.05},
        )
        return [sys.executable, "-m", "draftforge.cli", "capture", *overrides]

    whole = train_root / "capture_whole"
    if not (whole / "manifest.json").exists():
        subprocess.run(cmd(whole), check=True, capture_output=True)
    features = train_root / f"capture_killed_{seed}"
    proc = subprocess.Popen(cmd(features), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(features / "progress-r000of001.json", proc, "its first shard")
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
    subprocess.run(cmd(features), check=True, capture_output=True)
    a, b = _captured(whole), _captured(features)
    assert a.keys() == b.keys()
    for row in a:
        assert all(torch.equal(x, y) for x, y in zip(a[row], b[row], strict=True)), row


def _captured(features: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Aux and final hidden states of every captured row."""
    manifest = json.loads((features / "manifest.json").read_text())
    reader = ShardReader(features, manifest)
    rows = [row for entry in manifest["shards"] for row in entry["rows"]]
    assert sorted(rows) == list(range(manifest["samples"]))
    out = {}
    for entry in manifest["shards"]:
        lengths = [b - a for a, b in itertools.pairwise(entry["offsets"])]
        for row, n in zip(entry["rows"], lengths, strict=True):
            out[row] = reader.hidden([row], [n])
    return out


# ---- damaged files


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":  # one bit, near the end: inside the data, past any header
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0x01]) + data[-9:])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # garbage: not even UTF-8
        path.write_bytes(b"garbage\x00\xff")


CHECKPOINT_DAMAGE = [
    (checkpoint.WEIGHTS, "flip"),
    (checkpoint.STATE, "truncate"),
    (checkpoint.MANIFEST, "garbage"),
    ("config.yaml", "garbage"),
    ("draft_config.json", "flip"),
]


@pytest.mark.parametrize(("name", "how"), CHECKPOINT_DAMAGE, ids=[n for n, _ in CHECKPOINT_DAMAGE])
def test_a_damaged_checkpoint_is_skipped_by_name_and_the_run_still_ends_exact(
    train_root: Path, reference: Path, name: str, how: str
) -> None:
    out = train_root / f"damaged_{name}"
    cmd = _train_cmd(train_root, out, **{"training.save_every": 6, "training.keep_checkpoints": 4})
    subprocess.run(cmd, check=True, capture_output=True)
    # As if the job had been stopped after step 12, whose checkpoint then took damage.
    for late in ("step_00000018", "step_00000024"):
        shutil.rmtree(out / "checkpoints" / late)
    _damage(out / "checkpoints" / "step_00000012" / name, how)
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    assert f"skipping checkpoint: {out / 'checkpoints' / 'step_00000012'}" in resumed.stdout
    assert f"resumed from {out / 'checkpoints' / 'step_00000006'}" in resumed.stdout
    _assert_bitwise_equal(_final_weights(reference, 24), _final_weights(out, 24))


def test_damaged_metrics_are_kept_aside_and_the_run_goes_on(train_root: Path) -> None:
    out = train_root / "damaged_metrics"
    cmd = _train_cmd(train_root, out, **{"training.save_every": 4, "training.max_steps": 8})
    subprocess.run([*cmd, "training.max_steps=4"], check=True, capture_output=True)
    metrics = out / "metrics.jsonl"
    found = metrics.read_bytes() + b"\xff\x00 not a record\n"
    metrics.write_bytes(found)
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{metrics}: 1 damaged lines left out" in resumed.stdout
    assert (out / "metrics.jsonl.damaged").read_bytes() == found
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 9))


EXPORT_DAMAGE = [
    ("sglang", "config.json", "garbage"),
    ("vllm", "model.safetensors", "truncate"),
    ("vllm", "model.safetensors", "flip"),  # still a readable file: only the checksum tells
]


@pytest.mark.parametrize(
    ("fmt", "name", "how"), EXPORT_DAMAGE, ids=[f for f, _, _ in EXPORT_DAMAGE]
)
def test_a_damaged_export_is_refused_by_name(
    train_root: Path, reference: Path, tmp_path: Path, fmt: str, name: str, how: str
) -> None:
    from draftforge.drafts import DraftError, load_draft
    from draftforge.export import export_checkpoint

    export_checkpoint(reference, fmt, tmp_path / fmt)
    _damage(tmp_path / fmt / name, how)
    with pytest.raises(DraftError, match=re.escape(str(tmp_path / fmt / name))):
        load_draft(tmp_path / fmt)


# ---- nonsense settings and small untruths


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("training.lr=-0.001", "training.lr must be positive, got -0.001"),
        ("training.max_steps=0", "training.max_steps must be >= 1, got 0"),
        ("training.max_steps=-5", "training.max_steps must be >= 1, got -5"),
        ("data.eval_fraction=1.5", "data.eval_fraction must be in [0, 1), got 1.5"),
    ],
)
def test_out_of_range_settings_fail_before_anything_is_loaded(
    run_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str
) -> None:
    # A target that does not exist: the setting's error must come first, before any loading.
    overrides = tiny_run_overrides(run_root, tmp_path / "run", **{"target.path": tmp_path / "none"})
    for command in ("train", "capture", "prepare"):
        assert main([command, *overrides, setting]) == 2
        err = capsys.readouterr().err
        assert f"draftforge {command}: error: {message}" in err, err
    assert not (tmp_path / "run").exists()


def test_help_says_what_the_draft_vocabulary_limit_is() -> None:
    (doc,) = [doc for key, _, _, doc in describe_options() if key == "draft.draft_vocab_size"]
    assert "capped" not in doc and "at most the target's vocabulary" in doc


def test_rerunning_a_finished_run_says_it_trained_nothing(train_root: Path) -> None:
    cmd = _train_cmd(train_root, train_root / "finished", **{"training.max_steps": 3})
    first = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "trained 3 steps" in first.stdout
    again = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "nothing to train" in again.stdout and "trained 3 steps" not in again.stdout


def test_a_prompts_file_that_is_not_utf8_is_one_line_error(tmp_path: Path) -> None:
    from draftforge.decode import DecodeError, load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DecodeError, match=re.escape(f"{path}:2: not UTF-8 text")):
        load_prompts(path)


class _RunsCode:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_pickled_draft_with_code_is_refused_without_unsafe_advice(
    reference: Path, tmp_path: Path
) -> None:
    from draftforge.drafts import DraftError, load_draft
    from draftforge.export import export_checkpoint

    export_checkpoint(reference, "sglang", tmp_path / "draft")
    # A draft published as a pickle (no safetensors, no draftforge provenance file).
    (tmp_path / "draft" / "model.safetensors").unlink()
    (tmp_path / "draft" / "draftforge_export.json").unlink()
    marker = tmp_path / "code_ran"
    torch.save(
        {"fc.weight": torch.zeros(2), "x": _RunsCode(marker)},
        tmp_path / "draft" / "pytorch_model.bin",
    )
    with pytest.raises(DraftError, match="refused") as err:
        load_draft(tmp_path / "draft")
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()
