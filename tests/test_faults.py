"""The fault-injection suite: faults and misuse that must end in one clear line, never in a
traceback, a silent loss or a useless result.

This section covers bad inputs to `draftforge prepare` (the same `prepare` runs inside
`train` and `capture`); other sections follow.
"""

import gzip
import json
from pathlib import Path

import pytest

from draftforge.cli import main
from draftforge.data import DataError, prepare
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
