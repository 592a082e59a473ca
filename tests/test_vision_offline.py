"""Offline mode for a vision-language target: a tiny random Qwen2.5-VL captured with its
images (conversations with synthetic images, and text-only ones), the shards read back equal
to the language model's own hidden states and M-RoPE ids, offline training with the online
run's losses, and a text capture that stays as it was (no position ids)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftforge.capture_writer import progress_path
from draftforge.check import TargetFacts, run_checks
from draftforge.config import TargetConfig, load_config
from draftforge.offline import capture
from draftforge.shards import MANIFEST, ShardError, ShardReader
from draftforge.synthetic_images import write_synthetic_images
from draftforge.target import load_target
from draftforge.testing import (
    save_vl_checkpoint,
    tiny_run_overrides,
    tiny_vl_processor,
    tiny_vl_target,
    write_tiny_run,
)
from draftforge.train import train
from draftforge.vision_features import prepare_vision_data
from draftforge.vision_target import rope_position_ids, vision_batch

AUX = [2, 0, 1]  # not in order, and not the last layer (whose output is the final-norm state)
IMAGES = 8
TEXT_ROWS = 2  # conversations without an image: their positions are 0..n-1
STEPS = 8
# What a text capture's shards hold, as before vision-language targets.
TEXT_TENSORS = {"rows", "offsets", "input_ids", "loss_mask", "aux", "hidden", "argmax"}
# One sample per shard: shards of text rows store no positions, those of image rows do.
RUN = {
    "target.aux_layers": "[2,0,1]",
    "data.shard_mb": 0.01,
    "data.eval_fraction": 0.25,
    "training.max_steps": STEPS,
    "training.log_every": 1,
    "training.eval_every": 4,
    "training.tokens_per_batch": 512,
    "data.max_length": 512,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny forwards on two shared cores run fastest on one thread; and the capture (a
    module fixture) and the reference forwards must run on the same thread count to round
    alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(images: list[tuple[Path, object]]) -> list[dict]:
    """Image rows answered with the image's caption (OpenAI content parts and LLaVA rows
    in turn), then text-only rows; image paths relative to the data file."""
    rows = []
    for k, (path, drawn) in enumerate(images):
        if k % 2:
            turns = [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": drawn.caption},
            ]
            rows.append({"id": f"image{k}", "image": f"images/{path.name}", "conversations": turns})
            continue
        parts = [
            {"type": "image", "image": f"images/{path.name}"},
            {"type": "text", "text": "Say."},
        ]
        messages = [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": drawn.caption},
        ]
        rows.append({"id": f"image{k}", "messages": messages})
    for k in range(TEXT_ROWS):
        messages = [
            {"role": "user", "content": f"Count to {k + 3}."},
            {"role": "assistant", "content": " ".join(str(i) for i in range(k + 3))},
        ]
        rows.append({"id": f"text{k}", "messages": messages})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A VL checkpoint (a confident head, as write_tiny_run's) and its ``data.jsonl``."""
    root = tmp_path_factory.mktemp("vl_offline")
    model = tiny_vl_target()
    model.lm_head.weight.data *= 30
    processor = tiny_vl_processor()
    save_vl_checkpoint(model, processor, root / "target")
    rows = _rows(write_synthetic_images(root / "images", IMAGES))
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(workdir: Path, out: Path, **extra):
    settings = {**RUN, "data.features_dir": workdir / "features", **extra}
    return load_config(None, tiny_run_overrides(workdir, out, **settings))


@pytest.fixture(scope="module")
def captured(workdir) -> Path:
    result = capture(_config(workdir, workdir / "unused"), progress=False)
    assert result.manifest is not None
    assert len(result.manifest["shards"]) == IMAGES + TEXT_ROWS
    return result.directory


def _metrics(run: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["loss"]) for r in rows]


def test_captured_states_and_positions_are_the_language_models(workdir, captured):
    target = load_target(TargetConfig(path=str(workdir / "target"), aux_layers=AUX))
    dataset = prepare_vision_data(_config(workdir, workdir / "unused"), target).dataset
    manifest = json.loads((captured / MANIFEST).read_text())
    reader = ShardReader(captured, manifest)
    hidden, positioned = target.hidden_size, 0
    for entry in manifest["shards"]:
        tensors = load_file(captured / entry["file"])
        (row,) = entry["rows"]
        batch = vision_batch([dataset.samples[row]])
        with torch.no_grad():
            reference = target.model(**batch, output_hidden_states=True).hidden_states
        for slot, layer in enumerate(AUX):
            piece = tensors["aux"][None, :, slot * hidden : (slot + 1) * hidden]
            assert torch.equal(piece, reference[layer + 1])
        assert torch.equal(tensors["hidden"][None], reference[-1])
        expected = rope_position_ids(target.model, batch)[:, 0]
        plain = torch.equal(expected, torch.arange(expected.shape[1]).expand(3, -1))
        # stored exactly where they are not 0..n-1: the image rows
        assert ("positions" in tensors) == ("positions" in entry) == (not plain)
        assert plain == dataset.ids[row].startswith("text")
        if not plain:
            assert torch.equal(tensors["positions"].long(), expected)
            positioned += 1
        assert torch.equal(reader.positions(row), expected)
    assert positioned == IMAGES
    assert manifest["tensors"]["positions"] == {"dtype": "int32", "shape": [3, "tokens"]}


def test_offline_training_reproduces_the_online_losses(workdir, captured):
    train(_config(workdir, workdir / "online_run"))
    train(_config(workdir, workdir / "offline_run", **{"data.mode": "offline"}))
    online, offline = _metrics(workdir / "online_run"), _metrics(workdir / "offline_run")
    assert [(s, k) for s, k, _ in online] == [(s, k) for s, k, _ in offline]
    assert sum(split == "eval" for split, *_ in online) == 2
    # tests/test_offline.py's tolerance; both runs forward each sample alone, so in fact equal
    for (*_, x), (*_, y) in zip(online, offline, strict=True):
        assert abs(x - y) <= 1e-5 * abs(y) + 1e-6, (x, y)


def test_a_damaged_positioned_shard_is_captured_again(workdir, captured, tmp_path):
    manifest = json.loads((captured / MANIFEST).read_text())
    entry = next(e for e in manifest["shards"] if "positions" in e)
    copy = tmp_path / "features"
    copy.mkdir()
    for file in captured.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    whole = (copy / entry["file"]).read_bytes()
    (copy / entry["file"]).write_bytes(whole[:-8] + bytes(8))
    cfg = _config(workdir, tmp_path / "run", **{"data.features_dir": copy, "data.mode": "offline"})
    with pytest.raises(ShardError, match="sha256 differs"):
        train(cfg)
    assert capture(cfg, progress=False).tokens == entry["offsets"][-1]
    # the same tensors (a safetensors header may list its metadata in another order)
    again, before = load_file(copy / entry["file"]), load_file(captured / entry["file"])
    assert again.keys() == before.keys()
    assert all(torch.equal(again[k], before[k]) for k in before)
    repaired = json.loads((copy / MANIFEST).read_text())
    for e in (*repaired["shards"], *manifest["shards"]):
        e.pop("sha256")
    assert repaired == manifest


def test_a_killed_capture_resumes_with_its_positions(workdir, captured, tmp_path):
    # what a kill after the fourth shard leaves: those shards and a progress record of them
    manifest = json.loads((captured / MANIFEST).read_text())
    kept = manifest["shards"][:4]
    assert any("positions" in e for e in kept) and any(
        "positions" in e for e in manifest["shards"][4:]
    )
    features = tmp_path / "features"
    features.mkdir()
    for entry in kept:
        (features / entry["file"]).write_bytes((captured / entry["file"]).read_bytes())
    record = {key: manifest[key] for key in ("format", "version", "settings")}
    progress = {**record, "done": False, "shards": kept}
    progress_path(features, 0, 1).write_text(json.dumps(progress))
    cfg = _config(workdir, tmp_path / "unused", **{"data.features_dir": features})
    resumed = capture(cfg, progress=False)
    assert resumed.tokens == manifest["tokens"] - sum(e["offsets"][-1] for e in kept)
    again = json.loads((features / MANIFEST).read_text())
    assert again["shards"][:4] == kept  # the finished shards as they were, positions and all
    for e in (*again["shards"], *manifest["shards"]):
        e.pop("sha256")
    assert again["shards"] == manifest["shards"]
    assert again["tensors"] == manifest["tensors"]


def test_check_prepares_a_vl_targets_data_as_capture_does(workdir, captured):
    # draftforge check loads no weights: the processor comes from the checkpoint's files
    cfg = _config(workdir, workdir / "unused", **{"data.mode": "offline"})
    cpu = torch.device("cpu")
    facts = TargetFacts.read(cfg.target, cpu)
    found, prepared = run_checks(cfg, facts, None, world=1, device=cpu, stage="check")
    assert not [f for f in found if f.error]
    assert all("\n" not in f.message for f in found)  # each finding one line
    manifest = json.loads((captured / MANIFEST).read_text())
    assert prepared.dataset.key == manifest["settings"]["dataset_key"]
    lengths = {}
    for entry in manifest["shards"]:
        for j, row in enumerate(entry["rows"]):
            lengths[row] = entry["offsets"][j + 1] - entry["offsets"][j]
    assert prepared.dataset.lengths() == [lengths[row] for row in range(len(lengths))]


def test_a_text_capture_stores_no_positions(tmp_path):
    root = write_tiny_run(tmp_path, conversations=6)
    settings = {"data.features_dir": tmp_path / "features", "data.shard_mb": 0.02}
    result = capture(
        load_config(None, tiny_run_overrides(root, tmp_path / "unused", **settings)),
        progress=False,
    )
    manifest = result.manifest
    assert manifest is not None and len(manifest["shards"]) > 1
    assert set(manifest["tensors"]) == TEXT_TENSORS
    for entry in manifest["shards"]:
        assert set(entry) == {"file", "bytes", "sha256", "rows", "ids", "offsets", "argmax"}
        assert set(load_file(tmp_path / "features" / entry["file"])) == TEXT_TENSORS
    assert ShardReader(tmp_path / "features", manifest).position_rows is None
