import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from draftforge import checkpoint
from draftforge.cli import main
from draftforge.config import ConfigError, load_config
from draftforge.features import collate, epoch_plan, online_features, pack, split_eval
from draftforge.models import build_draft
from draftforge.optim import build_optimizers
from draftforge.parallel import setup
from draftforge.schedule import lr_factor
from draftforge.target import load_target
from draftforge.testing import tiny_run_overrides, write_tiny_run
from draftforge.train import TrainingError, train, train_step


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("train"))


def _overrides(workdir: Path, out: Path, **extra) -> list[str]:
    return tiny_run_overrides(workdir, out, **extra)


def _metrics(run: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_lowers_loss_and_raises_acc(workdir, optimizer):
    out = workdir / f"run_learn_{optimizer}"
    settings = {
        "training.max_steps": 40,
        "training.eval_every": 40,
        "training.optimizer": optimizer,
    }
    cfg = load_config(None, _overrides(workdir, out, **settings))
    result = train(cfg)
    train_rows = _metrics(out)
    first, last = train_rows[0], train_rows[-1]
    assert result.step == 40
    assert last["loss"] < 0.8 * first["loss"], (first["loss"], last["loss"])
    assert last["acc_0"] > first["acc_0"] + 0.15, (first["acc_0"], last["acc_0"])
    assert last["al_estimate"] > first["al_estimate"]
    (evaluated,) = _metrics(out, "eval")
    assert evaluated["step"] == 40 and 0 < evaluated["acc_0"] <= 1
    assert checkpoint.list_checkpoints(out / "checkpoints")[-1].name == "step_00000040"


def _train_cmd(workdir: Path, out: Path, steps: int, save_every: int) -> list[str]:
    args = _overrides(
        workdir, out, **{"training.max_steps": steps, "training.save_every": save_every}
    )
    return [sys.executable, "-m", "draftforge.cli", "train", *args]


def test_resume_after_sigkill_is_bitwise_identical(workdir):
    steps = 24  # the 18 steps after the first checkpoint take longer than a poll (~1.5 s)
    # The uninterrupted reference run.
    subprocess.run(
        _train_cmd(workdir, workdir / "run_full", steps, 6), check=True, capture_output=True
    )
    # The interrupted run: killed with SIGKILL once its step-6 checkpoint is on disk.
    out = workdir / "run_killed"
    proc = subprocess.Popen(
        _train_cmd(workdir, out, steps, 6), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_00000006").exists():
        assert proc.poll() is None and time.time() < deadline, (
            "training ended before its checkpoint"
        )
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / f"step_{steps:08d}").exists()
    resumed = subprocess.run(
        _train_cmd(workdir, out, steps, 6), check=True, capture_output=True, text=True
    )
    assert "resumed from" in resumed.stdout
    final = f"checkpoints/step_{steps:08d}/{checkpoint.WEIGHTS}"
    a, b = load_file(workdir / "run_full" / final), load_file(out / final)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_muon_runs_on_the_hidden_matrices_and_adamw_on_the_rest(workdir):
    cfg = load_config(None, _overrides(workdir, workdir / "unused"))
    draft = build_draft("eagle3", load_target(cfg.target).config, [0, 1, 2], 320)
    names = {p: n for n, p in draft.named_parameters()}
    for key, expected in {"adamw": 1, "sgd": 1}.items():
        optimizers = build_optimizers(draft, dataclasses.replace(cfg.training, optimizer=key))
        assert len(optimizers) == expected
    muon, adamw = build_optimizers(draft, dataclasses.replace(cfg.training, optimizer="muon"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    on_muon = {names[p] for group in muon.param_groups for p in group["params"]}
    on_adamw = {names[p] for group in adamw.param_groups for p in group["params"]}
    assert on_muon == {
        "fc.weight",
        *(f"midlayer.self_attn.{m}_proj.weight" for m in "qkvo"),
        *(f"midlayer.mlp.{m}_proj.weight" for m in ("gate", "up", "down")),
    }
    assert on_adamw == {n for n, p in draft.named_parameters() if p.requires_grad} - on_muon
    assert "lm_head.weight" in on_adamw and "embed_tokens.weight" not in on_adamw


def test_muon_resumes_bitwise(workdir, tmp_path):
    """Both optimizers' states and both schedules are saved and restored."""
    extra = {"training.optimizer": "muon", "training.max_steps": 8, "training.save_every": 4}
    full = tmp_path / "full"
    train(load_config(None, _overrides(workdir, full, **extra, **{"training.keep_checkpoints": 2})))
    _, state = checkpoint.load_checkpoint(full / "checkpoints" / "step_00000004")
    buffers = [s for s in state["optimizer"]["state"].values() if "momentum_buffer" in s]
    assert len(buffers) == 8  # Muon's: fc and the decoder layer's 7 matrices
    resumed = tmp_path / "resumed"
    shutil.copytree(
        full / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004"
    )
    assert train(load_config(None, _overrides(workdir, resumed, **extra))).first_step == 4
    final = f"checkpoints/step_00000008/{checkpoint.WEIGHTS}"
    a, b = load_file(full / final), load_file(resumed / final)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resuming_with_another_optimizer_names_the_one_it_was_trained_with(workdir, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, _overrides(workdir, out, **{"training.max_steps": 2})))
    saved = out / "checkpoints" / "step_00000002"
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    muon = {"training.max_steps": 4, "training.optimizer": "muon"}
    with pytest.raises(ConfigError, match=r"trained with training\.optimizer=adamw .* says muon"):
        train(load_config(None, _overrides(workdir, out, **muon)))
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before
    assert checkpoint.list_checkpoints(out / "checkpoints") == [saved]


def test_resuming_a_draft_of_another_shape_names_the_setting_it_was_trained_with(workdir, tmp_path):
    out = tmp_path / "run"
    narrow = {"training.max_steps": 2, "draft.intermediate_size": 48}
    train(load_config(None, _overrides(workdir, out, **narrow)))
    saved = out / "checkpoints" / "step_00000002"
    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    with pytest.raises(ConfigError) as err:
        train(load_config(None, _overrides(workdir, out, **{"training.max_steps": 4})))
    message = str(err.value)
    assert re.search(r"holds a draft of another shape \(midlayer\.mlp\.\w+\.weight is \[", message)
    assert "(draft.intermediate_size=48)" in message and "training.resume=never" in message
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before


def test_damaged_and_unfinished_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "ckpt"
    weights = {"w": torch.arange(6.0)}
    good = checkpoint.save_checkpoint(root, 1, weights, {"step": 1}, {})
    newer = checkpoint.save_checkpoint(root, 2, weights, {"step": 2}, {})
    (root / ".step_00000003-abc").mkdir()  # what a killed writer leaves behind
    (root / ".step_00000003-abc" / checkpoint.WEIGHTS).write_bytes(b"partial")
    assert checkpoint.latest_valid(root) == newer
    data = (newer / checkpoint.WEIGHTS).read_bytes()
    (newer / checkpoint.WEIGHTS).write_bytes(data[: len(data) // 2])  # truncated later
    assert checkpoint.latest_valid(root) == good
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.load_checkpoint(newer)
    checkpoint.rotate(root, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_00000002"]
    assert not list(root.glob(".step_*"))


def test_a_step_without_supervised_tokens_is_skipped(workdir, tmp_path):
    # The data pipeline already drops rows with no assistant token (counted in its report);
    # a step whose rows supervise nothing anyway must not touch the weights.
    cfg = load_config(None, _overrides(workdir, tmp_path / "run"))
    target = load_target(cfg.target)
    draft = build_draft("eagle3", target.config, [0, 1, 2], 320)
    draft.load_target_embedding(target.embed_weight())
    sample = {
        "input_ids": torch.randint(0, 256, (30,)),
        "loss_mask": torch.zeros(30, dtype=torch.bool),
    }
    batch = collate([sample], [0], 256)
    feats = online_features(target, batch, draft.draft_ids(), 64, 2048)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in draft.state_dict().items()}
    assert train_step(draft, [(batch, feats)], [optimizer], cfg, setup(cfg.parallel)) is None
    assert all(torch.equal(before[k], v) for k, v in draft.state_dict().items())
    sample["loss_mask"][20:] = True
    batch = collate([sample], [0], 256)
    stats = train_step(draft, [(batch, feats)], [optimizer], cfg, setup(cfg.parallel))
    assert stats is not None and stats.counts.tolist() == [10] * 7  # tokens 20..29


def test_nan_loss_stops_with_a_clear_error(workdir, tmp_path):
    cfg = load_config(None, _overrides(workdir, tmp_path / "run", **{"training.max_steps": 3}))
    target = load_target(cfg.target)
    target.model.model.layers[0].mlp.down_proj.weight.data.fill_(float("nan"))
    with pytest.raises(TrainingError, match="NaN"):
        train(cfg, target)


def test_bad_settings_are_one_line_errors(workdir, tmp_path, capsys):
    for extra, message in [
        ({"target.aux_layers": "[0,1,7]"}, "outside the target's 4 layers"),
        ({"draft.draft_vocab_size": 100000}, "larger than the target vocabulary"),
        ({"data.max_length": 4096}, "exceeds training.tokens_per_batch"),
        ({"data.path": tmp_path / "missing.jsonl"}, "missing.jsonl"),
    ]:
        assert main(["train", *_overrides(workdir, tmp_path / "run", **extra)]) == 2
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if "error:" in line]
        assert message in line and "Traceback" not in err, err


def test_packing_and_epoch_plans():
    lengths = [5, 3, 4, 8, 2, 9]
    assert pack([0, 1, 2, 3, 4, 5], lengths, 8) == [[0, 1], [2], [3], [4], [5]]
    plan = epoch_plan(list(range(6)), lengths, 10, seed=3, epoch=0)
    assert sorted(i for row in plan for i in row) == list(range(6))
    assert all(sum(min(lengths[i], 10) for i in row) <= 10 for row in plan)
    assert plan == epoch_plan(list(range(6)), lengths, 10, seed=3, epoch=0)
    assert plan != epoch_plan(list(range(6)), lengths, 10, seed=3, epoch=1)


def test_eval_split_is_stable_and_disjoint():
    ids = [f"conv-{i}" for i in range(1000)]
    train_rows, eval_rows = split_eval(ids, 0.1)
    assert not set(train_rows) & set(eval_rows)
    assert 60 < len(eval_rows) < 140
    shuffled = list(reversed(ids))
    _, eval_again = split_eval(shuffled, 0.1)
    assert {shuffled[i] for i in eval_again} == {ids[i] for i in eval_rows}


def test_lr_schedule():
    assert lr_factor(0, 4, 100, 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 4, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(52, 4, 100, 0.1) == pytest.approx(0.55)
    # Under a time budget the decay follows whichever of steps and time is further along.
    assert lr_factor(10, 4, 100, 0.1, time_fraction=0.5) == pytest.approx(0.55)
    assert lr_factor(10, 4, 100, 0.1, time_fraction=1.0) == pytest.approx(0.1)
    assert lr_factor(76, 4, 100, 0.1, time_fraction=0.1) == pytest.approx(
        lr_factor(76, 4, 100, 0.1)
    )


def test_time_limit_stops_with_a_checkpoint_and_resumes_with_the_time_left(workdir, tmp_path):
    out = tmp_path / "timed"
    limit_min = 0.03  # 1.8 s: a few tiny steps
    extra = {
        "training.max_steps": 100_000,
        "training.warmup_steps": 0,
        "training.save_every": 0,
        "training.log_every": 1,
    }

    def run(minutes: float):
        overrides = _overrides(workdir, out, **extra, **{"training.time_limit_minutes": minutes})
        return train(load_config(None, overrides))

    first = run(limit_min)
    assert 0 < first.step < 100_000
    newest = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    _, state = checkpoint.load_checkpoint(newest)
    assert state["step"] == first.step
    assert state["train_seconds"] >= limit_min * 60
    # The cosine decay followed the clock: the rate after the last step is the floor
    # (min_lr_ratio 0.1 of tiny_run_overrides' 3e-3), far before max_steps.
    assert _metrics(out)[-1]["lr"] == pytest.approx(3e-4, rel=1e-6)
    # Rerunning with the time spent trains nothing more; a larger budget continues.
    assert run(limit_min).step == first.step
    assert run(state["train_seconds"] / 60 + limit_min).step > first.step
    with pytest.raises(ConfigError, match="time_limit_minutes"):
        run(-1)


@pytest.mark.slow
def test_smollm2_training_raises_acc0(smollm2, tmp_path):
    assets = Path(__file__).parents[1] / "draftforge" / "assets"
    overrides = [
        f"data.path={assets / 'smoke_conversations.jsonl'}",
        "data.max_length=256",
        "data.eval_fraction=0",
        "training.tokens_per_batch=256",
        "draft.draft_vocab_size=2048",
        "training.max_steps=200",
        "training.lr=1e-3",
        "training.warmup_steps=10",
        "training.log_every=20",
        "training.save_every=0",
        f"target.path={smollm2.path}",
        f"target.cache_dir={tmp_path / 'cache'}",
        f"output.dir={tmp_path / 'run'}",
    ]
    train(load_config(None, overrides), smollm2)
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["acc_0"] > rows[0]["acc_0"] + 0.3, (rows[0]["acc_0"], rows[-1]["acc_0"])
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_init_from_an_export_starts_from_its_weights(workdir, tmp_path):
    from draftforge.export import export_checkpoint

    first = tmp_path / "first"
    train(load_config(None, _overrides(workdir, first, **{"training.max_steps": 3})))
    export_checkpoint(first, "draftforge", tmp_path / "export")
    second = tmp_path / "second"
    # One SGD step at a rate far below the weights' last bit leaves them exactly as loaded.
    start = {
        "training.max_steps": 1,
        "training.optimizer": "sgd",
        "training.lr": 1e-30,
        "draft.init_from": tmp_path / "export",
    }
    train(load_config(None, _overrides(workdir, second, **start)))
    a = load_file(first / "checkpoints" / "step_00000003" / checkpoint.WEIGHTS)
    b = load_file(second / "checkpoints" / "step_00000001" / checkpoint.WEIGHTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    mismatched = _overrides(
        workdir,
        tmp_path / "third",
        **{"draft.init_from": tmp_path / "export", "draft.draft_vocab_size": 100},
    )
    with pytest.raises(ConfigError, match="does not fit this draft"):
        train(load_config(None, mismatched))


@pytest.mark.parametrize("head_init", ["target", "random"])
def test_head_init_target_starts_from_the_targets_head_rows(workdir, tmp_path, head_init):
    # One SGD step at a rate far below the weights' last bit leaves the start as it was.
    start = {
        "training.max_steps": 1,
        "training.optimizer": "sgd",
        "training.lr": 1e-30,
        "draft.head_init": head_init,
        "draft.draft_vocab_size": 100,
    }
    cfg = load_config(None, _overrides(workdir, tmp_path / "run", **start))
    train(cfg)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000001" / checkpoint.WEIGHTS)
    draft_ids = torch.arange(saved["d2t"].numel()) + saved["d2t"]
    assert draft_ids[-1] > 99  # not the first rows: the draft vocab is a subset with gaps
    target_rows = load_target(cfg.target).lm_head()[0][draft_ids]
    assert torch.equal(saved["lm_head.weight"], target_rows) == (head_init == "target")
