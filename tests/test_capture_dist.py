"""Capture under torchrun with a sharded target (tensor parallel, FSDP, both): the features of
one process, whatever the layout; slices with uneven numbers of target forwards; a stalled
rank ends the capture naming it, and a rerun resumes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from draftforge.capture_writer import forward_count, shard_rows
from draftforge.config import load_config
from draftforge.features import prepare_data
from draftforge.offline import capture, rank_slice
from draftforge.shards import MANIFEST, ShardReader
from draftforge.target import load_tokenizer
from draftforge.testing import save_tiny_target, tiny_run_overrides, write_tiny_run

pytestmark = pytest.mark.dist


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models on two shared cores run fastest, and steadiest, on one thread."""


# Small shards and forwards of at most 300 padded tokens: every slice spans several shards,
# and the slices of one capture run different numbers of target forwards.
SETTINGS = {"data.shard_mb": 0.1, "target.batch_tokens": 300, "data.max_length": 128}


def _overrides(root: Path, features: Path, **extra) -> list[str]:
    return tiny_run_overrides(
        root, root / "unused", **{**SETTINGS, "data.features_dir": features, **extra}
    )


def _torchrun(procs: int, entry: list[str]) -> list[str]:
    # --standalone picks a free rendezvous port, so runs never collide.
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, "--nproc-per-node", str(procs), *entry]


def _capture_cmd(procs: int, overrides: list[str]) -> list[str]:
    return _torchrun(procs, ["-m", "draftforge.cli", "capture", *overrides, "--no-progress"])


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def single(request, tmp_path_factory) -> Path:
    """A tiny run of the family, and its capture by one process."""
    root = write_tiny_run(tmp_path_factory.mktemp(request.param), 48, request.param)
    result = capture(load_config(None, _overrides(root, root / "single")), progress=False)
    assert result.manifest is not None
    return root


def _assert_same_features(root: Path, features: Path) -> dict:
    """The capture in ``features`` holds the one-process capture's samples and features (up to
    the rounding of differently batched, or tensor-parallel, forwards)."""
    manifest = json.loads((features / MANIFEST).read_text())
    one = ShardReader(root / "single", json.loads((root / "single" / MANIFEST).read_text()))
    other = ShardReader(features, manifest)
    rows = list(range(manifest["samples"]))
    assert sorted(r for shard in manifest["shards"] for r in shard["rows"]) == rows
    lengths = [10_000] * len(rows)  # capped at each sample's length
    for x, y in zip(one.hidden(rows, lengths), other.hidden(rows, lengths), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)  # aux, then final hidden
    return manifest


def _forwards_per_slice(root: Path, slices: int) -> list[int]:
    """Target forwards of each slice, as the capture plans them."""
    cfg = load_config(None, _overrides(root, root / "plan"))
    lengths = prepare_data(cfg, load_tokenizer(root / "target"), 320).dataset.lengths()
    per_token = json.loads((root / "single" / MANIFEST).read_text())["bytes_per_token"]
    shard_bytes = int(cfg.data.shard_mb * 1e6)
    return [
        forward_count(
            shard_rows(rank_slice(lengths, s, slices), lengths, per_token, shard_bytes),
            lengths,
            cfg.target.batch_tokens,
        )
        for s in range(slices)
    ]


@pytest.mark.parametrize(
    ("procs", "layout", "slices"),
    [
        (2, {"parallel.tp": 2}, 1),
        (2, {"parallel.fsdp": "target"}, 2),
        (4, {"parallel.tp": 2, "parallel.fsdp": "target"}, 2),
    ],
    ids=["tp2", "fsdp2", "tp2-fsdp2"],
)
def test_sharded_capture_matches_one_process(single, procs, layout, slices):
    if slices > 1:  # the FSDP ranks must keep in step over uneven work
        counts = _forwards_per_slice(single, slices)
        assert len(set(counts)) > 1, counts
    features = single / f"features_{procs}_{'_'.join(map(str, layout.values()))}"
    overrides = _overrides(single, features, **layout, **{"parallel.timeout_minutes": 0.5})
    proc = subprocess.run(
        _capture_cmd(procs, overrides), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = _assert_same_features(single, features)
    # One writer per data-parallel group: its slice's shards carry its group's index.
    prefixes = {shard["file"].split("-")[1] for shard in manifest["shards"]}
    assert prefixes == {f"r{s:03d}of{slices:03d}" for s in range(slices)}


def _stalling_entry(tmp_path: Path, seconds: float) -> Path:
    """A ``draftforge`` entry point whose rank 1 sleeps ``seconds`` before its second shard."""
    script = tmp_path / "stall.py"
    script.write_text(
        "import os, sys, time\n"
        "import draftforge.capture_writer as w\n"
        "from draftforge.cli import main\n"
        "samples = w.shard_samples\n"
        "calls = [0]\n"
        "def patched(*args, **kwargs):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 2 and os.environ['RANK'] == '1':\n"
        f"        time.sleep({seconds})\n"
        "    return samples(*args, **kwargs)\n"
        "w.shard_samples = patched\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return script


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        # A sharded target: rank 0's next collective times out, and rank 1 never joined it.
        ({"parallel.fsdp": "target"}, "rank 0 of 2, capture: a collective failed or waited"),
        # Data parallel only, no collective: rank 0 finishes, then rank 1's record stops.
        ({}, "capture: rank 1, the writer of slice 1 of 2, recorded no progress"),
    ],
    ids=["fsdp", "data-parallel"],
)
@pytest.mark.parametrize("single", ["llama"], indirect=True)
def test_a_stalled_rank_ends_the_capture_naming_it_and_a_rerun_resumes(
    single, tmp_path, layout, message
):
    features = tmp_path / "features"
    overrides = _overrides(single, features, **layout, **{"parallel.timeout_minutes": 0.1})
    script = _stalling_entry(tmp_path, 60)
    start = time.perf_counter()
    stalled = subprocess.run(
        _torchrun(2, [str(script), "capture", *overrides, "--no-progress"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stalled.returncode != 0
    assert time.perf_counter() - start < 60 + 45, "the stalled rank was waited for"
    assert message in stalled.stderr, stalled.stderr[-3000:]
    assert "parallel.timeout_minutes=0.1" in stalled.stderr
    if layout:
        assert "rank 1 never reached it (dead or stalled)" in stalled.stderr
    assert not (features / MANIFEST).exists()
    kept = {shard.name: shard.stat().st_mtime_ns for shard in features.glob("shard-*")}
    assert kept, "the finished shards were not kept"

    rerun = _overrides(single, features, **layout, **{"parallel.timeout_minutes": 0.5})
    proc = subprocess.run(_capture_cmd(2, rerun), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = _assert_same_features(single, features)
    # The rerun resumed: the shards finished before the stall are the manifest's, untouched.
    assert set(kept) <= {shard["file"] for shard in manifest["shards"]}
    assert all((features / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_a_rank_with_nothing_to_capture_keeps_the_others_in_step(tmp_path, tied):
    """One sample, two FSDP ranks: rank 1's slice is empty, yet it must take part in every
    forward of rank 0's sharded target and, when the head is tied to the sharded embedding,
    in gathering the head for the stored argmax."""
    root = write_tiny_run(tmp_path, 1)
    if tied:
        save_tiny_target(root / "target", tie_word_embeddings=True)
    features = tmp_path / "features"
    layout = {"parallel.fsdp": "target", "parallel.timeout_minutes": 0.5}
    proc = subprocess.run(
        _capture_cmd(2, _overrides(root, features, **layout)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((features / MANIFEST).read_text())
    assert manifest["samples"] == 1
    assert [shard["file"].split("-")[1] for shard in manifest["shards"]] == ["r000of002"]
