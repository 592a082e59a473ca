"""The fault-injection suite: faults and misuse that must end in one clear line, never in a
traceback, a silent loss or a useless result.

This section covers bad inputs to `draftforge prepare` (the same `prepare` runs inside
`train` and `capture`); other sections follow.
"""

import gzip
import json
import os
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

from draftforge import checkpoint
from draftforge.cli import main
from draftforge.data import DataError, prepare
from draftforge.locks import LOCK_FILE
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
