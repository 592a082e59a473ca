"""`draftforge prepare` and `regenerate` on the command line: summaries, errors, arguments."""

import json
from pathlib import Path

import pytest

from draftforge.cli import build_parser, main, parse_args
from draftforge.testing import save_tiny_target

CHAT = [
    {"role": "user", "content": "What is a draft model?"},
    {"role": "assistant", "content": "A small model that guesses the next tokens."},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("target") / "tiny")


@pytest.fixture
def data(tmp_path) -> Path:
    """Three good conversations, a malformed line and one without an answer to learn."""
    lines = [json.dumps({"id": f"c{i}", "messages": CHAT}) for i in range(3)]
    lines.insert(2, '{"messages": [oops')
    lines.append(json.dumps({"prompt": "only a question"}))
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_argv(data: Path, tiny_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "prepare",
        f"data.path={data}",
        f"target.path={tiny_dir}",
        f"target.cache_dir={tmp_path / 'cache'}",
        "draft.draft_vocab_size=64",
        "data.num_workers=1",
        *extra,
    ]


def test_prepare_prints_the_summary(data, tiny_dir, tmp_path, capsys):
    assert main(prepare_argv(data, tiny_dir, tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "rows read: 5, kept: 3" in printed
    assert "skipped 1 (malformed_json)" in printed
    assert f"{data}:3: " in printed  # the malformed row, by file and line
    assert "skipped 1 (no_assistant_turn)" in printed and f"{data}:5: " in printed
    assert "tokens: " in printed and "supervised: " in printed
    assert "draft vocab: 64 of 320 target tokens, coverage 100.00%" in printed
    assert str(tmp_path / "cache" / "datasets") in printed

    # A second run finds the cache entry and reports the same facts.
    assert main(prepare_argv(data, tiny_dir, tmp_path)) == 0
    assert capsys.readouterr().out == printed


def test_prepare_strict_stops_at_the_bad_row(data, tiny_dir, tmp_path, capsys):
    assert main(prepare_argv(data, tiny_dir, tmp_path, "data.strict=true")) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"draftforge prepare: error: {data}:3: ")
    assert "[malformed_json]" in error


def test_prepare_reads_a_config_file(data, tiny_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  path: {data}\n  num_workers: 1\ntarget:\n  path: {tiny_dir}\n")
    argv = ["prepare", str(config), f"target.cache_dir={tmp_path / 'cache'}"]
    assert main([*argv, "draft.draft_vocab_size=32"]) == 0
    assert "draft vocab: 32 of 320" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.path="], "data.path is empty"),
        (["draft.draft_vocab_size=1000"], "larger than the target vocabulary (320)"),
    ],
)
def test_prepare_config_errors_are_one_line(data, tiny_dir, tmp_path, capsys, extra, message):
    assert main(prepare_argv(data, tiny_dir, tmp_path, *extra)) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_regenerate_http_needs_a_model_name(tmp_path, capsys):
    argv = ["regenerate", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--backend", "http"]) == 2
    assert "--backend http needs --model" in capsys.readouterr().err


def test_regenerate_rejects_bad_settings(tmp_path, capsys):
    argv = ["regenerate", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["regenerate", "in.jsonl", "--out", "o", "run.yaml", "--seed", "3", "a.b=1", "c.d=2"],
        ["regenerate", "in.jsonl", "run.yaml", "a.b=1", "--out", "o", "c.d=2"],
        ["regenerate", "--out", "o", "in.jsonl", "run.yaml", "a.b=1", "c.d=2"],
    ],
)
def test_config_and_overrides_may_come_after_flags(argv):
    args = parse_args(build_parser(), argv)
    assert (args.input, args.config, args.overrides, args.out) == (
        "in.jsonl",
        "run.yaml",
        ["a.b=1", "c.d=2"],
        "o",
    )


def test_unknown_flags_are_still_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["regenerate", "in.jsonl", "--out", "o", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
