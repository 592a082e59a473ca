"""The one internal form of a conversation, and parsers from each dataset format into it.

Supported row formats (`fmt`):

- `sharegpt`:  {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}
- `messages`:  {"messages": [{"role": "user"|"assistant"|..., "content": str}, ...]}
- `ultrachat`: {"data": [user, assistant, user, ...]}  (alternating strings)
- `prompts`:   a bare string, {"prompt"|"instruction"|"question": str}, or
  {"turns": [str, ...]} (MT-Bench). Prompts become user-only conversations, for
  regeneration; MT-Bench turns become consecutive user messages whose answers the
  regenerator fills in.
- `auto`:      chosen per row from the keys above, in that order.

Turns in `conversations` and `messages` may use either `from`/`value` or `role`/`content`.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("auto", "sharegpt", "messages", "ultrachat", "prompts")

# Role names seen in the wild, lower-cased, mapped onto ROLES.
ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}

PROMPT_KEYS = ("prompt", "instruction", "question")
ID_KEYS = ("id", "question_id")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass
class Conversation:
    id: str
    messages: list[Message]
    source: str = field(default="", compare=False)  # "file:line" of the row, for reports

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


class RowError(ValueError):
    """A row that cannot become a conversation; `reason` is the report's counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def detect_format(row: object) -> str:
    """The format of one row, from its keys; raises RowError(unknown_format)."""
    if isinstance(row, str):
        return "prompts"
    if isinstance(row, Mapping):
        for key, fmt in (
            ("conversations", "sharegpt"),
            ("messages", "messages"),
            ("data", "ultrachat"),
        ):
            if key in row:
                return fmt
        if "turns" in row or any(key in row for key in PROMPT_KEYS):
            return "prompts"
        raise RowError("unknown_format", f"no known key among {sorted(row)[:8]}")
    raise RowError("unknown_format", f"row is a {type(row).__name__}, not an object or string")


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise RowError("non_string_content", f"{what} is a {type(value).__name__}, not a string")
    # Lone surrogates come from "\ud800"-style JSON escapes; they cannot be encoded to UTF-8
    # and would fail later, inside the tokenizer, without a row location.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError("invalid_utf8", f"{what}: {err.reason} at index {err.start}") from None
    return value


def _role(name: object, index: int) -> str:
    role = ROLE_ALIASES.get(name.lower()) if isinstance(name, str) else None
    if role is None:
        raise RowError("unknown_role", f"turn {index} has role {name!r}")
    return role


def _turns(items: object, key: str) -> list[Message]:
    if not isinstance(items, list):
        raise RowError("unknown_format", f"'{key}' is a {type(items).__name__}, not a list")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise RowError("unknown_format", f"turn {i} is a {type(item).__name__}, not an object")
        role = _role(item.get("from", item.get("role")), i)
        content = _string(item.get("value", item.get("content")), f"turn {i} content")
        messages.append(Message(role, content))
    return messages


def _prompts(row: str | Mapping[str, Any]) -> list[Message]:
    if isinstance(row, str):
        return [Message("user", _string(row, "prompt"))]
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list):
            raise RowError("non_string_content", "'turns' is not a list of strings")
        return [Message("user", _string(t, f"turn {i}")) for i, t in enumerate(turns)]
    for key in PROMPT_KEYS:
        if key in row:
            return [Message("user", _string(row[key], f"'{key}'"))]
    raise RowError("unknown_format", "no prompt key")


def parse_messages(row: object, fmt: str) -> list[Message]:
    """The messages of one row in format `fmt` ('auto' detects it); raises RowError."""
    if fmt == "auto":
        fmt = detect_format(row)
    if fmt == "prompts":
        if not isinstance(row, (str, Mapping)):
            raise RowError("unknown_format", f"row is a {type(row).__name__}")
        return _prompts(row)
    if not isinstance(row, Mapping):
        raise RowError("unknown_format", f"row is a {type(row).__name__}, not an object")
    key = {"sharegpt": "conversations", "messages": "messages", "ultrachat": "data"}[fmt]
    if key not in row:
        raise RowError("unknown_format", f"no '{key}' key for format {fmt!r}")
    if fmt == "ultrachat":
        items = row[key]
        if not isinstance(items, list):
            raise RowError("unknown_format", "'data' is not a list")
        return [
            Message("user" if i % 2 == 0 else "assistant", _string(text, f"turn {i}"))
            for i, text in enumerate(items)
        ]
    return _turns(row[key], key)


def content_id(messages: list[Message]) -> str:
    """A stable id from the messages alone: 16 hex digits of SHA-256."""
    payload = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def row_id(row: object, messages: list[Message]) -> str:
    """The row's own `id`/`question_id` when it has one, else `content_id(messages)`.

    A content hash rather than file name + line number: the id survives reordering,
    renaming and merging of files, so regenerated answers and captured shards still match
    their conversation. Identical conversations share a content id; the reader makes
    repeats unique.
    """
    if isinstance(row, Mapping):
        for key in ID_KEYS:
            value = row.get(key)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
                return str(value)
    return content_id(messages)


def parse_row(row: Any, fmt: str, *, require_assistant: bool) -> tuple[str, list[Message]]:
    """(id, messages) for one row, or RowError with the reason to count."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    messages = parse_messages(row, fmt)
    if not messages:
        raise RowError("empty_conversation", "no messages")
    if require_assistant and not any(m.role == "assistant" for m in messages):
        raise RowError("no_assistant_turn", "no assistant message to train on")
    return row_id(row, messages), messages
