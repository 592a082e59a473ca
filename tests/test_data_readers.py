"""Dataset readers: every row format and file type, stable ids, and bad rows counted."""

import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from draftforge.data import (
    Conversation,
    DataError,
    Message,
    Source,
    read_conversations,
)
from draftforge.data.conversation import ToolCall, content_id

U, A, S = "user", "assistant", "system"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def roles_and_texts(conv: Conversation):
    return [(m.role, m.content) for m in conv.messages]


def test_every_row_format(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "user", "value": "q2"},
                {"from": "assistant", "value": "a2"},
            ]
        },
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"data": ["q1", "a1", "q2", "a2"]},
        "a bare prompt",
        {"prompt": "p"},
        {"instruction": "i"},
        {"question": "q", "answer": "not used: prompt lists are for regeneration"},
        {"turns": ["t1", "t2"]},
    ]
    convs, report = read_conversations(
        write_jsonl(tmp_path / "d.jsonl", rows), require_assistant=False
    )
    assert report.rows_read == 8 and report.rows_kept == 8
    assert [roles_and_texts(c) for c in convs] == [
        [(S, "sys"), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2")],
        [(U, "q"), (A, "a")],
        [(U, "q1"), (A, "a1"), (U, "q2"), (A, "a2")],
        [(U, "a bare prompt")],
        [(U, "p")],
        [(U, "i")],
        [(U, "q")],
        [(U, "t1"), (U, "t2")],
    ]
    assert [c.source for c in convs] == [f"{tmp_path / 'd.jsonl'}:{i}" for i in range(1, 9)]


def test_forced_format(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        ],
    )
    convs, report = read_conversations(path, fmt="messages")
    assert len(convs) == 1 and report.skipped == {"unknown_format": 1}
    assert report.examples["unknown_format"] == [
        f"{path}:2: no 'messages' key for format 'messages'"
    ]


def test_file_types_and_folders(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "a.jsonl", [row])
    (tmp_path / "b.json").write_text(json.dumps([row, row]), encoding="utf-8")
    (tmp_path / "sub" / "c.jsonl.gz").write_bytes(gzip.compress(json.dumps(row).encode()))
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "sub" / "d.parquet")
    (tmp_path / "notes.txt").write_text("ignored: not a data file")
    convs, report = read_conversations(tmp_path)
    assert report.rows_read == 5 and len(convs) == 5
    assert [c.source.removeprefix(str(tmp_path)) for c in convs] == [
        "/a.jsonl:1",
        "/b.json#0",
        "/b.json#1",
        "/sub/c.jsonl.gz:1",
        "/sub/d.parquet#0",
    ]
    assert all(roles_and_texts(c) == [(U, "q"), (A, "a")] for c in convs)
    with pytest.raises(ValueError, match="unsupported file type"):
        Source.open(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):  # a missing file is not taken for a Hub name
        Source.open(tmp_path / "missing.jsonl")


def test_hub_datasets_go_through_load_dataset(monkeypatch):
    import datasets

    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    convs, _ = read_conversations("someone/chats", split="test")
    assert calls == [("someone/chats", "test")]
    assert convs[0].source == "someone/chats[test]#0"
    assert Source.open("someone/chats").fingerprint().startswith("hub:someone/chats:train:")


def test_ids_are_own_or_content_hashes_and_unique(tmp_path):
    pair = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [{"id": "row-7", **pair}, {"question_id": 81, **pair}, pair, pair]
    convs, _ = read_conversations(write_jsonl(tmp_path / "a.jsonl", rows))
    digest = content_id([Message(U, "q"), Message(A, "a")])
    assert [c.id for c in convs] == ["row-7", "81", digest, f"{digest}#2"]
    # The content id does not depend on the file, its name or the row's position.
    moved, _ = read_conversations(write_jsonl(tmp_path / "b.jsonl", [{"x": 1}, pair]))
    assert moved[0].id == digest


BAD_LINES = [
    (b'{"messages": [', "malformed_json"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', "unknown_role"),
    (b'{"messages": []}', "empty_conversation"),
    (b'{"messages": [{"role": "user", "content": "only a question"}]}', "no_assistant_turn"),
    (b'{"messages": [{"role": "user", "content": ["a", "list"]}]}', "non_string_content"),
    (b'{"conversations": [{"from": "human", "value": null}]}', "non_string_content"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_utf8"),
    (b'{"something": "else"}', "unknown_format"),
    (b"[1, 2]", "unknown_format"),
]


@pytest.fixture
def bad_file(tmp_path):
    good = b'{"messages": [{"role": "user", "content": "q"}, {"role": "gpt", "content": "a"}]}'
    lines = [good] + [line for line, _ in BAD_LINES] + [b"", good]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_rows_are_counted_with_locations(bad_file):
    convs, report = read_conversations(bad_file)
    assert len(convs) == 2
    assert report.rows_read == 2 + len(BAD_LINES)  # the blank line is not a row
    expected = {}
    for _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.skipped) == expected
    # The first examples per reason name the file and line (the good row is line 1).
    for number, (_, reason) in enumerate(BAD_LINES, start=2):
        assert any(e.startswith(f"{bad_file}:{number}: ") for e in report.examples[reason])
    text = "\n".join(report.lines())
    assert f"skipped 2 (invalid_utf8), e.g.\n    {bad_file}:8: byte" in text


def test_prompt_lists_may_lack_answers(bad_file):
    _, report = read_conversations(bad_file, require_assistant=False)
    assert "no_assistant_turn" not in report.skipped


def test_examples_are_capped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("nope\n" * 10)
    _, report = read_conversations(path)
    assert report.skipped == {"malformed_json": 10}
    assert len(report.examples["malformed_json"]) == 3


def test_strict_stops_at_the_first_bad_row(bad_file):
    with pytest.raises(DataError, match=rf"^{bad_file}:2: .*\[malformed_json\]$"):
        read_conversations(bad_file, strict=True)


def test_unreadable_json_file_counts_once(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"messages": ')
    convs, report = read_conversations(path)
    assert convs == [] and report.skipped == {"malformed_json": 1}
    assert report.examples["malformed_json"][0].startswith(f"{path}: ")


# --- reasoning and tools -----------------------------------------------------------------

AGENT_ROW = {
    "id": "agent",
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            # The OpenAI form: null content, arguments as JSON text; `reasoning` as newer vLLM
            # names it.
            "role": "assistant",
            "content": None,
            "reasoning": "Ask the weather tool.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "18 C", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "assistant", "content": "It is 18 C.", "reasoning_content": "Tool says 18."},
    ],
}
AGENT_MESSAGES = [
    Message(U, "Weather in Paris?"),
    Message(
        A,
        "",
        reasoning_content="Ask the weather tool.",
        tool_calls=(ToolCall("get_weather", {"city": "Paris"}, "call_1"),),
    ),
    Message("tool", "18 C", tool_call_id="call_1", name="get_weather"),
    Message(A, "It is 18 C.", reasoning_content="Tool says 18."),
]


def test_reasoning_and_tool_calls_are_read(tmp_path):
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            # Without the `function` wrapper, arguments as an object; gpt-oss's `thinking`.
            {
                "from": "gpt",
                "value": "",
                "thinking": "Ask the weather tool.",
                "tool_calls": [
                    {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
                ],
            },
            {"from": "function", "value": "18 C", "tool_call_id": "call_1", "name": "get_weather"},
            {"from": "gpt", "value": "It is 18 C.", "reasoning_content": "Tool says 18."},
        ]
    }
    convs, report = read_conversations(write_jsonl(tmp_path / "d.jsonl", [AGENT_ROW, sharegpt]))
    assert report.rows_kept == 2
    assert convs[0].messages == convs[1].messages == AGENT_MESSAGES
    # One reasoning field, in the chat-completions form servers and templates read.
    assert convs[0].as_dicts()[1] == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Ask the weather tool.",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                "id": "call_1",
            }
        ],
    }
    # Reasoning and tool fields are part of the content id; plain conversations keep theirs.
    assert content_id(AGENT_MESSAGES) != content_id(
        [Message(m.role, m.content) for m in convs[0].messages]
    )
    plain = [Message(U, "q"), Message(A, "a")]
    expected = hashlib.sha256(json.dumps([[U, "q"], [A, "a"]]).encode()).hexdigest()[:16]
    assert content_id(plain) == expected


@pytest.mark.parametrize(
    "call",
    [
        {"function": {"name": "f", "arguments": "{not json"}},
        {"function": {"name": "f", "arguments": "[1, 2]"}},
        {"function": "f"},
        "f()",
    ],
)
def test_bad_tool_calls_are_counted(tmp_path, call):
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
    }
    convs, report = read_conversations(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert convs == [] and report.skipped == {"bad_tool_call": 1}
