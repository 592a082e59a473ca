"""Offline mode: capture once, train from shards with the online run's losses; resumable,
splittable capture; damaged or mismatched captures stop training before it starts."""

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from draftforge import offline
from draftforge.cli import main
from draftforge.config import load_config
from draftforge.features import Position, collate, load_data, open_features
from draftforge.offline import capture, rank_slice
from draftforge.parallel import setup
from draftforge.shards import (
    FORMAT,
    MANIFEST,
    VERSION,
    ShardError,
    ShardReader,
    bytes_per_token,
    features_dir,
)
from draftforge.target import load_target
from draftforge.testing import save_tiny_target, tiny_run_overrides, write_tiny_run
from draftforge.train import train

STEPS = 50
# Small shards, so that the tiny capture (~15 MB) spans dozens of them.
RUN = {
    "training.max_steps": STEPS,
    "training.log_every": 1,
    "training.eval_every": 25,
    "data.shard_mb": 0.2,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine run fastest, and steadiest, on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("offline"))


def _config(workdir: Path, out: Path, **extra):
    settings = {**RUN, "data.features_dir": workdir / "features", **extra}
    return load_config(None, tiny_run_overrides(workdir, out, **settings))


def _metrics(run: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["loss"]) for r in rows]


def _assert_same_losses(a: list, b: list) -> None:
    """The same losses up to float rounding: online training and capture batch the target's
    forwards differently (tests/test_batching.py), which moves the features by ~1e-7."""
    assert [(s, k) for s, k, _ in a] == [(s, k) for s, k, _ in b]
    for (*_, x), (*_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(y) + 1e-6, (x, y)


@pytest.fixture(scope="module")
def captured(workdir) -> Path:
    result = capture(_config(workdir, workdir / "unused"), progress=False)
    assert result.manifest is not None and len(result.manifest["shards"]) > 10
    return result.directory


@pytest.fixture(scope="module")
def offline_losses(workdir, captured) -> list:
    train(_config(workdir, workdir / "offline_run", **{"data.mode": "offline"}))
    return _metrics(workdir / "offline_run")


def test_offline_training_reproduces_the_online_losses(workdir, offline_losses):
    train(_config(workdir, workdir / "online_run"))
    online = _metrics(workdir / "online_run")
    assert sum(split == "train" for split, *_ in online) == STEPS
    assert [k for split, k, _ in online if split == "eval"] == [25, 50]
    _assert_same_losses(online, offline_losses)


def test_batched_capture_writes_the_shards_of_one_sample_forwards(workdir):
    """Batching the target's forwards changes no shard's samples, name or size, and their
    features only by float rounding (tests/test_target.py's padded-capture tolerance)."""
    shards = {}
    for budget in (1, 2048):  # one sample per forward; several
        features = workdir / f"features_batch_{budget}"
        extra = {"data.features_dir": features, "data.shard_mb": 1.0, "target.batch_tokens": budget}
        manifest = capture(_config(workdir, workdir / "unused", **extra), progress=False).manifest
        assert manifest is not None
        entries = [{k: v for k, v in e.items() if k != "sha256"} for e in manifest["shards"]]
        shards[budget] = (features, entries)
    (alone, entries), (batched, entries_batched) = shards[1], shards[2048]
    assert entries == entries_batched and len(entries) > 10
    assert max(len(e["rows"]) for e in entries) >= 8  # several samples per forward
    for entry in entries:
        x, y = load_file(alone / entry["file"]), load_file(batched / entry["file"])
        for key in ("rows", "offsets", "input_ids", "loss_mask", "argmax"):
            assert torch.equal(x[key], y[key])
        for key in ("aux", "hidden"):
            torch.testing.assert_close(y[key], x[key], rtol=1e-5, atol=1e-5)


def test_manifest_describes_every_sample_once(workdir, captured):
    manifest = json.loads((captured / MANIFEST).read_text())
    rows = sorted(r for shard in manifest["shards"] for r in shard["rows"])
    assert rows == list(range(manifest["samples"])) and manifest["samples"] == 120
    assert manifest["settings"]["aux_layers"] == [0, 1, 2]
    assert manifest["settings"]["storage_dtype"] == "float32"  # auto: the target's dtype
    assert manifest["bytes_per_token"] == bytes_per_token(64, "float32") == 1033
    assert manifest["bytes"] == sum(p.stat().st_size for p in captured.glob("shard-*"))
    shard = manifest["shards"][0]
    tensors = load_file(captured / shard["file"])
    assert tensors["rows"].tolist() == shard["rows"]
    assert tensors["aux"].shape == (shard["offsets"][-1], 3 * 64)
    assert tensors["hidden"].shape == (shard["offsets"][-1], 64)
    assert not list(captured.glob("progress-*")) and not list(captured.glob(".tmp-*"))


def test_capture_stores_the_targets_own_argmax(workdir, captured):
    """The stored argmax is what the target's own forward predicts at every token with a
    supervised token after it (the only ones training reads), and -1 at the others."""
    model = load_target(_config(workdir, workdir / "unused").target, "cpu").model
    manifest = json.loads((captured / MANIFEST).read_text())
    kinds = set()
    for shard in manifest["shards"][:3]:
        assert shard["argmax"] is True
        tensors = load_file(captured / shard["file"])
        offsets = shard["offsets"]
        for start, end in itertools.pairwise(offsets):
            with torch.no_grad():
                logits = model(tensors["input_ids"][start:end].long()[None]).logits[0]
            read = torch.zeros(end - start, dtype=torch.bool)
            read[:-1] = tensors["loss_mask"][start + 1 : end].bool()
            expected = torch.where(read, logits.argmax(-1), -1).int()
            assert torch.equal(tensors["argmax"][start:end], expected)
            kinds.update(read.tolist())
    assert kinds == {True, False}


def test_a_capture_without_argmaxes_trains_as_before(workdir, captured, offline_losses):
    """Shards captured before argmaxes were stored train with the whole head, to the same
    losses; a capture that mixes both kinds does too."""
    features, manifest = _copy(captured, "features_no_argmax")
    for entry in manifest["shards"][::2]:  # every other shard as an older capture wrote it
        tensors = load_file(features / entry["file"])
        del tensors["argmax"]
        data = save(tensors, metadata={"format": FORMAT, "version": str(VERSION)})
        (features / entry["file"]).write_bytes(data)
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        del entry["argmax"]
    (features / MANIFEST).write_text(json.dumps(manifest))
    reader = ShardReader(features, manifest)
    assert reader.argmax([manifest["shards"][0]["rows"][0]], [4]) is None
    assert reader.argmax([manifest["shards"][1]["rows"][0]], [4]) is not None
    out = workdir / "no_argmax_run"
    train(_config(workdir, out, **{"data.mode": "offline", "data.features_dir": features}))
    _assert_same_losses(_metrics(out), offline_losses)


def _capture_cmd(workdir: Path, features: Path) -> list[str]:
    overrides = tiny_run_overrides(
        workdir, workdir / "unused", **{"data.features_dir": features, "data.shard_mb": 0.05}
    )
    return [sys.executable, "-m", "draftforge.cli", "capture", *overrides, "--no-progress"]


def test_killed_capture_resumes_without_duplicates_or_gaps(workdir, captured, offline_losses):
    features = workdir / "features_killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _capture_cmd(workdir, features),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill once at least one shard is recorded in the progress file (a shard renamed into
    # place but not yet recorded is a leftover that the rerun captures again).
    deadline = time.time() + 120
    while not list(features.glob("progress-*.json")):
        assert proc.poll() is None and time.time() < deadline, "capture ended before a shard"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (features / MANIFEST).exists(), "killed too late to test anything"
    (progress,) = features.glob("progress-*.json")
    recorded = sum(s["offsets"][-1] for s in json.loads(progress.read_text())["shards"])
    assert recorded > 0
    # Whatever is visible under a shard's name is a whole shard.
    visible = list(features.glob("shard-*.safetensors"))
    for path in visible:
        assert load_file(path)["rows"].numel() > 0
    # An unfinished capture is refused for training, with the way out.
    cfg = _config(
        workdir, workdir / "refused", **{"data.mode": "offline", "data.features_dir": features}
    )
    with pytest.raises(ShardError, match="unfinished: run `draftforge capture`"):
        train(cfg)

    # The rerun (in this process, with the same settings) continues after the recorded shards.
    cfg = _config(
        workdir, workdir / "resumed_run", **{"data.features_dir": features, "data.shard_mb": 0.05}
    )
    resumed = capture(cfg, progress=False)
    assert resumed.tokens == 14173 - recorded
    manifest = json.loads((features / MANIFEST).read_text())
    rows = [r for shard in manifest["shards"] for r in shard["rows"]]
    assert sorted(rows) == list(range(120))
    on_disk = {p.name for p in features.iterdir()}
    assert on_disk == {MANIFEST, *(shard["file"] for shard in manifest["shards"])}
    # A third run has nothing to do.
    assert capture(cfg, progress=False).tokens == 0
    assert json.loads((features / MANIFEST).read_text()) == manifest

    cfg.data.mode = "offline"
    train(cfg)
    _assert_same_losses(_metrics(workdir / "resumed_run"), offline_losses)


def _copy(captured: Path, name: str) -> tuple[Path, dict]:
    copy = captured.parent / name
    shutil.copytree(captured, copy)
    return copy, json.loads((copy / MANIFEST).read_text())


def _refusal(workdir: Path, features: Path, capsys, **extra) -> str:
    """The one-line error of `draftforge train` on ``features``; training must not start."""
    out = workdir / f"run_{features.name}"
    overrides = tiny_run_overrides(
        workdir, out, **{**RUN, "data.mode": "offline", "data.features_dir": features, **extra}
    )
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and not out.exists(), err
    return line


def test_a_flipped_byte_stops_training_and_names_the_shard(workdir, captured, capsys):
    features, manifest = _copy(captured, "flipped")
    shard = features / manifest["shards"][3]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    line = _refusal(workdir, features, capsys)
    assert str(shard) in line and "sha256" in line


def test_truncated_missing_and_unlisted_shards_are_refused(workdir, captured, capsys):
    features, manifest = _copy(captured, "truncated")
    shard = features / manifest["shards"][5]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    line = _refusal(workdir, features, capsys, **{"data.verify_checksums": False})
    assert str(shard) in line and "truncated" in line
    shard.unlink()
    line = _refusal(workdir, features, capsys)
    assert str(shard) in line and "missing" in line

    features, manifest = _copy(captured, "unlisted")
    dropped = manifest["shards"].pop(2)
    (features / MANIFEST).write_text(json.dumps(manifest))
    line = _refusal(workdir, features, capsys)
    assert f"{len(dropped['rows'])} dataset samples have no features" in line

    features, manifest = _copy(captured, "swapped")
    a, b = (features / manifest["shards"][i]["file"] for i in (0, 1))
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    manifest["shards"][0]["bytes"], manifest["shards"][1]["bytes"] = (
        manifest["shards"][1]["bytes"],
        manifest["shards"][0]["bytes"],
    )
    (features / MANIFEST).write_text(json.dumps(manifest))
    line = _refusal(workdir, features, capsys, **{"data.verify_checksums": False})
    assert str(a) in line and ("implies" in line or "samples differ" in line), line


def test_features_of_other_settings_are_refused(workdir, captured, capsys):
    line = _refusal(workdir, captured, capsys, **{"target.aux_layers": "[0,1,3]"})
    assert "aux_layers [0, 1, 2] (this config: [0, 1, 3])" in line and str(captured) in line
    line = _refusal(workdir, captured, capsys, **{"data.max_length": 200})
    assert "dataset_key" in line
    line = _refusal(workdir, captured, capsys, **{"data.storage_dtype": "bfloat16"})
    assert "storage_dtype 'float32' (this config: 'bfloat16')" in line
    # Nor does a capture mix settings in one folder.
    with pytest.raises(ShardError, match=r"aux_layers .* set data\.features_dir to another"):
        capture(_config(workdir, workdir / "unused", **{"target.aux_layers": "[0,1,3]"}))
    other = save_tiny_target(workdir / "other_target", seed=1)
    line = _refusal(workdir, captured, capsys, **{"target.path": other})
    assert "target_fingerprint" in line
    # The draft vocabulary is not a capture setting: the teacher is recomputed from the
    # final hidden states, so a capture serves any draft vocabulary.
    cfg = _config(workdir, workdir / "vocab", **{"draft.draft_vocab_size": 100})
    target = load_target(cfg.target)
    dataset, _ = load_data(cfg, target, lambda *a, **k: None)
    open_features(cfg, target, dataset, setup(cfg.parallel))
    cfg.data.features_dir = str(workdir / "nowhere")
    with pytest.raises(ShardError, match=r"no manifest\.json"):
        open_features(cfg, target, dataset, setup(cfg.parallel))


def test_capture_refuses_when_the_disk_is_too_small(workdir, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(offline.shutil, "disk_usage", lambda _path: usage(10**9, 10**9, 10**6))
    features = workdir / "features_small_disk"
    overrides = tiny_run_overrides(workdir, workdir / "unused", **{"data.features_dir": features})
    assert main(["capture", *overrides, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "14,173 tokens x 1,033 bytes/token" in err and "1.0 MB free" in err, err
    assert not list(features.glob("shard-*"))


def test_prefetch_gives_the_same_features_and_passes_errors_on(workdir, captured):
    cfg = _config(workdir, workdir / "unused", **{"data.mode": "offline"})
    target = load_target(cfg.target)
    dataset, draft_ids = load_data(cfg, target, lambda *a, **k: None)
    source = open_features(cfg, target, dataset, setup(cfg.parallel))
    plan = [(Position(0, i), [collate(dataset, [2 * i, 2 * i + 1], 256)]) for i in range(6)]
    source.depth = 0
    direct = list(source.steps(iter(plan), draft_ids))
    source.depth = 2
    ahead = list(source.steps(iter(plan), draft_ids))
    for (_, _, [f]), (_, _, [g]) in zip(direct, ahead, strict=True):
        assert torch.equal(f.aux, g.aux) and torch.equal(f.teacher_probs, g.teacher_probs)

    def broken():
        yield plan[0]
        raise OSError("disk gone")

    steps = source.steps(broken(), draft_ids)
    next(steps)
    with pytest.raises(OSError, match="disk gone"):
        next(steps)

    # Leaving early (a time limit, Ctrl-C) and closing the steps stops the reader thread.
    steps = source.steps(iter(plan), draft_ids)
    next(steps)
    assert any(t.name == "offline-prefetch" for t in threading.enumerate())
    steps.close()
    assert not any(t.name == "offline-prefetch" for t in threading.enumerate())


def test_default_features_dir_is_named_by_the_settings(workdir):
    cfg = _config(workdir, workdir / "unused", **{"data.features_dir": ""})
    settings = {"aux_layers": [0, 1, 2], "dataset_key": "abc"}
    where = features_dir(cfg, settings)
    assert where.parent == workdir / "cache" / "features"
    assert where == features_dir(cfg, dict(settings))
    assert where != features_dir(cfg, {**settings, "aux_layers": [0, 1, 3]})


def test_rank_slices_split_tokens_evenly_and_cover_every_sample_once():
    gen = torch.Generator().manual_seed(0)
    for count in (0, 1, 5, 97):
        lengths = (torch.randint(1, 300, (count,), generator=gen)).tolist()
        for world in (1, 2, 3, 8):
            slices = [rank_slice(lengths, r, world) for r in range(world)]
            assert [i for s in slices for i in s] == list(range(count))
            for s in slices:
                # Each share is within one sample of an even split of the tokens.
                share = sum(lengths[i] for i in s)
                assert abs(share - sum(lengths) / world) <= max(lengths, default=0)


@pytest.mark.dist
def test_two_process_capture_matches_one_process(workdir, captured):
    features = workdir / "features_dist"
    overrides = tiny_run_overrides(
        workdir, workdir / "unused", **{"data.features_dir": features, "data.shard_mb": 0.5}
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "draftforge.cli", "capture", *overrides, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((features / MANIFEST).read_text())
    files = [shard["file"] for shard in manifest["shards"]]
    assert any("r000of002" in f for f in files) and any("r001of002" in f for f in files)
    assert sorted(r for shard in manifest["shards"] for r in shard["rows"]) == list(range(120))
    # A sample's features do not depend on who captured it, nor on the samples that shared
    # its forwards (other shard sizes batch them otherwise), beyond float rounding.
    one = ShardReader(captured, json.loads((captured / MANIFEST).read_text()))
    two = ShardReader(features, manifest)
    rows = list(range(120))
    lengths = [10_000] * len(rows)  # capped at each sample's length
    for x, y in zip(one.hidden(rows, lengths), two.hidden(rows, lengths), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_offline_training_reproduces_online(smollm2, tmp_path):
    assets = Path(__file__).parents[1] / "draftforge" / "assets"
    overrides = [
        f"target.path={smollm2.path}",
        f"data.path={assets / 'smoke_conversations.jsonl'}",
        "data.max_length=256",
        "data.eval_fraction=0",
        "training.tokens_per_batch=256",
        "draft.draft_vocab_size=2048",
        f"training.max_steps={STEPS}",
        "training.lr=1e-3",
        "training.warmup_steps=10",
        "training.log_every=1",
        "training.save_every=0",
        f"data.features_dir={tmp_path / 'features'}",
        f"target.cache_dir={tmp_path / 'cache'}",
    ]
    capture(load_config(None, overrides), smollm2, progress=False)
    train(load_config(None, [*overrides, f"output.dir={tmp_path / 'online'}"]), smollm2)
    train(
        load_config(None, [*overrides, f"output.dir={tmp_path / 'offline'}", "data.mode=offline"]),
        smollm2,
    )
    _assert_same_losses(_metrics(tmp_path / "online"), _metrics(tmp_path / "offline"))
