import gzip
import json
from pathlib import Path

import pytest

from draftforge import checkpoint
from draftforge import train as train_module
from draftforge.cli import main
from draftforge.decode.tree import TreeShape
from draftforge.demo import (
    DEMO_CONVERSATIONS,
    DEMO_DATA,
    DemoSettings,
    heldout_prompts,
    run_demo,
    write_subset,
)
from draftforge.testing import write_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = write_tiny_run(tmp_path_factory.mktemp("demo"), conversations=60)
    with gzip.open(root / "data.jsonl.gz", "wt") as f:
        f.write((root / "data.jsonl").read_text())
    return root


def _settings(tiny: Path, out: Path, **extra) -> DemoSettings:
    """The demo pipeline on a tiny random target: every stage runs, in seconds."""
    fields = {
        "minutes": 0.02,
        "out": out,
        "conversations": 40,
        "eval_prompts": 2,
        "max_new_tokens": 4,
        "chain_steps": (1, 2),
        "tree": TreeShape(2, 2, 3),
        "cache_dir": str(tiny / "cache"),
        "data": tiny / "data.jsonl.gz",
        "overrides": [
            f"target.path={tiny / 'target'}",
            "target.aux_layers=[0,1,2]",
            "draft.draft_vocab_size=320",
            "data.max_length=256",
            "data.num_workers=1",
            "training.tokens_per_batch=256",
            "training.warmup_steps=2",
        ],
    }
    return DemoSettings(**{**fields, **extra})


def _manifest_mtime(report: dict) -> float:
    return (Path(report["capture_dir"]) / "manifest.json").stat().st_mtime


def test_demo_runs_every_stage_and_a_second_run_reuses_the_caches(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_demo(_settings(tiny, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["stage_seconds"]) == {
        "target",
        "data",
        "capture",
        "train",
        "eval",
        "export",
        "report",
    }
    assert report["train_steps"] > 0
    shapes = [(r["num_steps"], r["topk"]) for r in report["rows"]]
    assert shapes == [(1, 1), (2, 1), (2, 2)]
    assert all(r["acceptance_length"] >= 1 for r in report["rows"])
    assert report["best_chain"]["topk"] == 1
    fastest = max(report["rows"], key=lambda r: r["tokens_per_s"])
    assert report["best_setting"] == {k: v for k, v in fastest.items() if k != "label"}
    assert set(report["estimated_seconds"]) == {"capture", "train", "eval", "export"}
    assert report["generate_tokens_per_s"] > 0 and report["baseline_tokens_per_s"] > 0
    assert report["costs"]["target_step_ms"] > 0 and report["costs"]["draft_step_ms"] > 0
    assert set(report["costs"]["verify_ms"]) >= {str(r["num_draft_tokens"]) for r in report["rows"]}
    for fmt in ("sglang", "vllm"):
        assert (out / "export" / fmt / "config.json").is_file()
    assert (out / "report.png").stat().st_size > 10_000
    text = (out / "report.txt").read_text()
    assert "fastest setting (exported)" in text and "fastest chain" in text
    assert "transformers' generate" in text and "cost model" in text
    assert "sglang.launch_server" in text and "vllm serve" in text
    # The exports are set up for the fastest setting measured.
    steps, topk = fastest["num_steps"], fastest["topk"]
    draft_tokens = fastest["num_draft_tokens"] if topk > 1 else steps + 1
    assert (
        f"--speculative-num-steps {steps} --speculative-eagle-topk {topk} "
        f"--speculative-num-draft-tokens {draft_tokens}"
    ) in text
    vllm = json.loads((out / "export" / "vllm" / "config.json").read_text())
    assert vllm["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == steps
    first_capture = _manifest_mtime(report)

    capsys.readouterr()
    assert run_demo(_settings(tiny, out)) == 0
    printed = capsys.readouterr().out
    assert "training a new draft (the last run finished); caches are reused" in printed
    assert "fp32 matmul" in printed and "estimated time from here" in printed
    assert "capture 0.0" in printed  # the capture is complete: nothing left to estimate
    assert "nothing left to capture" in printed
    # The data is prepared once and handed to the capture and the training.
    assert printed.count("dataset cache:") == 1
    assert _manifest_mtime(json.loads((out / "report.json").read_text())) == first_capture

    # --fresh: every cache under the output folder, rebuilt.
    assert run_demo(_settings(tiny, out, fresh=True)) == 0
    fresh = json.loads((out / "report.json").read_text())
    assert Path(fresh["capture_dir"]).is_relative_to(out / "cache")


def test_an_interrupted_demo_resumes_training(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    real_step = train_module.train_step
    calls = {"n": 0}

    def interrupt_on_the_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupt_on_the_fourth)
    settings = _settings(tiny, out, minutes=0.2)
    assert run_demo(settings) == 130
    assert "run the same command again to continue" in capsys.readouterr().out
    saved = checkpoint.latest_valid(out / "run" / "checkpoints")
    assert saved is not None and saved.name == "step_00000003"
    assert not (out / "report.json").exists()

    monkeypatch.setattr(train_module, "train_step", real_step)
    assert run_demo(settings) == 0
    assert "resuming the interrupted run from step_00000003" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["train_steps"] > 3
    _, state = checkpoint.load_checkpoint(checkpoint.latest_valid(out / "run" / "checkpoints"))
    assert state["train_seconds"] >= 0.2 * 60  # the budget is summed over both runs


def test_write_subset_keeps_the_file_when_the_rows_are_the_same(tmp_path):
    out = tmp_path / "train.jsonl"
    assert write_subset(DEMO_DATA, 5, out) == 5
    first = out.stat().st_mtime_ns
    assert write_subset(DEMO_DATA, 5, out) == 5
    assert out.stat().st_mtime_ns == first
    assert write_subset(DEMO_DATA, 6, out) == 6
    assert len(out.read_text().splitlines()) == 6


def test_builtin_demo_data_is_smollm2_answered_conversations():
    with gzip.open(DEMO_DATA, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == DEMO_CONVERSATIONS
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"], row["id"]
        assert row["messages"][1]["content"].strip(), row["id"]
    # Held-out prompts come from other template families, so none is a training prompt.
    train_prompts = {r["messages"][0]["content"] for r in rows}
    assert not train_prompts & {p.messages[0]["content"] for p in heldout_prompts(200)}


def test_demo_cli_rejects_bad_settings(capsys):
    assert main(["demo", "--minutes", "0"]) == 2
    assert "--minutes must be positive" in capsys.readouterr().err
    assert main(["demo", "--conversations", "3"]) == 2
    assert f"--conversations must be from 10 to {DEMO_CONVERSATIONS}" in capsys.readouterr().err
    assert main(["demo", "--conversations", str(DEMO_CONVERSATIONS + 1)]) == 2
    assert f"--conversations must be from 10 to {DEMO_CONVERSATIONS}" in capsys.readouterr().err
