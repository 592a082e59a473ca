"""Running draftforge on a cluster: trackers that survive resumes, batch-log progress lines,
held-out lines on the console, epochs, the global micro-batch count, required target, cache
location, --config, and the curves report."""

from __future__ import annotations

import math
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from draftforge import checkpoint
from draftforge.cli import build_parser, main, parse_args
from draftforge.commands import _split_config_args
from draftforge.config import Config, ConfigError, cache_root, load_config
from draftforge.demo import DemoSettings, training_config
from draftforge.drafts import DraftError, target_path_of
from draftforge.export import FORMATS
from draftforge.features import epoch_plan, epoch_steps, prepare_data, split_eval
from draftforge.metrics import WANDB_ID_FILE, read_records
from draftforge.offline import capture
from draftforge.progress import LineProgress, duration_text, progress_bar
from draftforge.target import load_target
from draftforge.testing import tiny_run_overrides, write_tiny_run
from draftforge.train import train

NOT_SET = (
    "target.path is not set: point it at a Hugging Face model folder or hub id "
    "(the demo uses smollm2)"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_run(tmp_path_factory.mktemp("operability"))


def _config(workdir: Path, out: Path, **extra: Any) -> Config:
    return load_config(None, tiny_run_overrides(workdir, out, **extra))


# ----------------------------------------------------------------------------- trackers


class _FakeWandb:
    """What draftforge calls of wandb: init (kwargs recorded), log (steps recorded), finish."""

    def __init__(self) -> None:
        self.inits: list[dict[str, Any]] = []
        self.steps: list[list[int]] = []  # per init

    def module(self) -> types.ModuleType:
        module = types.ModuleType("wandb")
        module.init = self.init  # type: ignore[attr-defined]
        return module

    def init(self, **kwargs: Any) -> Any:
        self.inits.append(kwargs)
        self.steps.append([])
        steps = self.steps[-1]
        return types.SimpleNamespace(log=lambda data, step: steps.append(step), finish=lambda: None)


class _FakeTensorboard:
    """torch.utils.tensorboard with a SummaryWriter recording purge_step and steps."""

    def __init__(self) -> None:
        self.writers: list[dict[str, Any]] = []

    def module(self) -> types.ModuleType:
        module = types.ModuleType("torch.utils.tensorboard")
        module.SummaryWriter = self.writer  # type: ignore[attr-defined]
        return module

    def writer(self, log_dir: str, purge_step: int | None = None) -> Any:
        record: dict[str, Any] = {"log_dir": log_dir, "purge_step": purge_step, "steps": set()}
        self.writers.append(record)
        return types.SimpleNamespace(
            add_scalar=lambda tag, value, step: record["steps"].add(step), close=lambda: None
        )


def test_a_resumed_run_continues_its_wandb_run_and_repeats_no_step(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    wandb, tensorboard = _FakeWandb(), _FakeTensorboard()
    monkeypatch.setitem(sys.modules, "wandb", wandb.module())
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard.module())
    out = tmp_path / "run"
    settings = {
        "training.trackers": "[wandb, tensorboard]",
        "training.log_every": 1,
        "training.eval_every": 2,
        "training.save_every": 2,
        "training.keep_checkpoints": 5,
        "output.progress_interval_s": 1e-6,
    }
    train(_config(workdir, out, **settings, **{"training.max_steps": 4}))
    printed = capsys.readouterr()
    # Batch logs: one plain line per interval, no carriage-return bar; held-out lines on stdout.
    progress = [line for line in printed.err.split("\n") if line.startswith("train step ")]
    assert progress and not any("\r" in line for line in progress)
    assert progress[-1].startswith("train step 4/4 loss ")
    assert " acc0 " in progress[-1] and " al " in progress[-1] and " tok/s " in progress[-1]
    held_out = [line for line in printed.out.splitlines() if line.startswith("eval step ")]
    assert [line.split()[2] for line in held_out] == ["2", "4"]
    assert " acc_0 " in held_out[0] and " al_estimate " in held_out[0]

    # Resumed from step 2, as after a kill: steps 3 and 4 are trained (and logged) again.
    resume = out / "checkpoints" / "step_00000002"
    train(_config(workdir, out, **settings, **{"training.max_steps": 6, "training.resume": resume}))
    first, second = wandb.inits
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    assert first["id"] == second["id"] == run_id and second["resume"] == "allow"
    assert wandb.steps[0] == [1, 2, 2, 3, 4, 4] and wandb.steps[1] == [3, 4, 4, 5, 6, 6]
    assert [w["purge_step"] for w in tensorboard.writers] == [1, 3]
    assert min(tensorboard.writers[1]["steps"]) == 3
    records = read_records(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 4, 6]

    # The curves of any run: draftforge report.
    pytest.importorskip("matplotlib")
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert (out / "report.png").stat().st_size > 0
    assert "6 train and 3 held-out records" in capsys.readouterr().out

    # Started over (not resumed): a new wandb run.
    train(
        _config(workdir, out, **settings, **{"training.max_steps": 1, "training.resume": "never"})
    )
    assert wandb.inits[2]["id"] != run_id == wandb.inits[1]["id"]
    assert (out / WANDB_ID_FILE).read_text().strip() == wandb.inits[2]["id"]


def test_report_without_metrics_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"draftforge report: error: {tmp_path / 'metrics.jsonl'} does not exist: give a run "
        "directory (output.dir)\n"
    )


# ----------------------------------------------------------------------------- progress


def test_progress_lines_come_once_per_interval(capsys: pytest.CaptureFixture) -> None:
    now = [0.0]
    bar = LineProgress(10, desc="train", unit="step", interval_s=30, clock=lambda: now[0])
    bar.set_postfix({"loss": "3.210", "tok/s": "5200"})
    now[0] = 10
    bar.update(2)  # before the interval: nothing
    now[0] = 30
    bar.update(1)
    now[0] = 40
    bar.update(1)  # 10 s after the last line: nothing
    bar.close()  # the last count is always shown
    bar.close()
    assert capsys.readouterr().err.splitlines() == [
        "train step 3/10 loss 3.210 tok/s 5200 eta 1m",
        "train step 4/10 loss 3.210 tok/s 5200 eta 1m",
    ]
    assert [duration_text(s) for s in (5, 720, 11_100)] == ["5s", "12m", "3h05m"]


def test_a_terminal_gets_a_bar_and_a_log_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(progress_bar(5, desc="x", disable=True), LineProgress)  # captured: a log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert isinstance(progress_bar(5, desc="x", disable=True), tqdm)


def test_capture_writes_progress_lines(workdir: Path, tmp_path: Path, capsys) -> None:
    cfg = _config(
        workdir,
        tmp_path / "run",
        **{"data.features_dir": tmp_path / "features", "output.progress_interval_s": 1e-6},
    )
    capture(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.startswith("capture tok ")]
    assert lines and not any("\r" in line for line in lines)
    done, total = lines[-1].split()[2].split("/")
    assert done == total


# ----------------------------------------------------------------------------- epochs


def test_epochs_set_the_steps_and_the_lr_schedule(workdir: Path, tmp_path: Path, capsys) -> None:
    extra = {
        "training.epochs": 1,
        "training.max_steps": 100_000,
        "training.micro_batches_per_step": 2,
        "training.log_every": 1,
    }
    cfg = _config(workdir, tmp_path / "run", **extra)
    target = load_target(cfg.target)
    dataset = prepare_data(cfg, target.tokenizer, target.vocab_size).dataset
    rows, _ = split_eval(dataset.ids, cfg.data.eval_fraction)
    batches = len(epoch_plan(rows, dataset.lengths(), 256, 0, 0))
    steps = math.ceil(batches / 2)  # every tiny row is supervised: no step is skipped
    assert epoch_steps(dataset, rows, dataset.lengths(), cfg) == steps
    result = train(cfg, target)
    assert result.step == steps
    assert f"training.epochs 1: {steps} optimizer steps\n" in capsys.readouterr().out
    # The cosine decay ends with the epochs: the last rate is the floor (0.1 of 3e-3).
    assert read_records(tmp_path / "run" / "metrics.jsonl")[-1]["lr"] == pytest.approx(3e-4)

    # Whichever of epochs and max_steps comes first ends the run.
    capped = _config(workdir, tmp_path / "capped", **{**extra, "training.max_steps": 3})
    assert train(capped, target).step == 3
    assert "training.max_steps (3) ends the run first" in capsys.readouterr().out


def test_an_epoch_run_resumes_bitwise(workdir: Path, tmp_path: Path) -> None:
    extra = {
        "training.epochs": 1,
        "training.micro_batches_per_step": 4,
        "training.save_every": 6,
        "training.keep_checkpoints": 10,
    }
    full = tmp_path / "full"
    result = train(_config(workdir, full, **extra))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step = "step_00000006"
    shutil.copytree(full / "checkpoints" / step, resumed / "checkpoints" / step)
    assert train(_config(workdir, resumed, **extra)).first_step == 6
    final = f"checkpoints/step_{result.step:08d}/{checkpoint.WEIGHTS}"
    a, b = load_file(full / final), load_file(resumed / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _masks(*supervised_from: int | None) -> list[dict[str, torch.Tensor]]:
    """Rows of 8 tokens, supervised from the given index on (None: nowhere)."""
    rows = []
    for start in supervised_from:
        mask = torch.zeros(8, dtype=torch.bool)
        if start is not None:
            mask[start:] = True
        rows.append({"loss_mask": mask})
    return rows


def test_epoch_steps_leave_out_steps_that_supervise_nothing() -> None:
    # A row supervised only at indices 0-1 trains nothing: step 0 predicts from index 2 on.
    dataset = _masks(2, 3, 0, 5)
    dataset[2]["loss_mask"][2:] = False
    cfg = Config()
    cfg.training.tokens_per_batch = 8  # one row per micro-batch
    cfg.training.micro_batches_per_step = 1
    cfg.training.epochs = 2
    rows, lengths = [0, 1, 2, 3], [8] * 4
    assert epoch_steps(dataset, rows, lengths, cfg) == 6  # 3 of 4 micro-batches, twice
    cfg.training.micro_batches_per_step = 3
    cfg.training.epochs = 1
    assert epoch_steps(dataset, rows, lengths, cfg) == 2  # the second topped up from epoch 1


# ----------------------------------------------------------------------------- settings


def test_the_micro_batch_count_key_names_the_global_count() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'training\.grad_accum'"):
        load_config(None, ["training.grad_accum=2"])
    assert (
        load_config(None, ["training.micro_batches_per_step=4"]).training.micro_batches_per_step
        == 4
    )


def test_the_export_format_of_draftforges_own_directory_says_so() -> None:
    assert FORMATS == ("sglang", "vllm", "draftforge")


@pytest.mark.parametrize(
    "argv",
    [
        ["train"],
        ["capture"],
        ["prepare"],
        ["target"],
        ["regenerate", "in.jsonl", "--out", "out.jsonl"],
    ],
)
def test_commands_need_target_path(argv: list[str], tmp_path: Path, capsys) -> None:
    assert main([*argv, "data.path=x.jsonl", f"output.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == f"draftforge {argv[0]}: error: {NOT_SET}\n"


def test_defaults_print_and_the_demo_names_its_target(tmp_path: Path, capsys) -> None:
    assert main(["config"]) == 0
    assert "  path: ''\n" in capsys.readouterr().out
    assert training_config(DemoSettings(), tmp_path / "d.jsonl").target.path == "smollm2"
    (tmp_path / "config.yaml").write_text("training:\n  lr: 0.1\n")
    with pytest.raises(DraftError, match=r"records no target .*: pass --target"):
        target_path_of(tmp_path)


def test_config_file_as_an_option(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 0.5\n")
    assert main(["config", "--config", str(path), "training.max_steps=7"]) == 0
    printed = capsys.readouterr().out
    assert "  lr: 0.5\n" in printed and "  max_steps: 7\n" in printed
    assert main(["config", str(path), "--config", str(path)]) == 2
    assert "two config files" in capsys.readouterr().err
    parser = build_parser()
    for argv in (
        ["target"],
        ["prepare"],
        ["train"],
        ["capture"],
        ["regenerate", "in", "--out", "o"],
    ):
        args = parse_args(parser, [*argv, "--config", str(path), "target.path=m"])
        assert _split_config_args(args) == (str(path), ["target.path=m"]), argv
    # Flags first, config and overrides after them, as before.
    args = parse_args(parser, ["regenerate", "in", "--out", "o", str(path), "target.path=m"])
    assert _split_config_args(args) == (str(path), ["target.path=m"])


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DRAFTFORGE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "draftforge"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "draftforge"
    monkeypatch.setenv("DRAFTFORGE_CACHE", str(tmp_path / "df"))
    assert cache_root() == tmp_path / "df"
    assert cache_root(str(tmp_path / "set")) == tmp_path / "set"  # target.cache_dir wins
    eval_args = parse_args(build_parser(), ["eval", "--draft", "d"])
    assert cache_root(eval_args.cache_dir) == tmp_path / "df"
