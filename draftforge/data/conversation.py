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

Turns in `conversations` and `messages` may use either `from`/`value` or `role`/`content`,
and carry what chat-completion servers write beside the content:

- assistant reasoning as `reasoning_content` (SGLang, vLLM), `reasoning` (newer vLLM) or
  `thinking` (gpt-oss), kept as `reasoning_content`;
- assistant `tool_calls`, in the OpenAI form (`{"id", "type": "function", "function":
  {"name", "arguments"}}`, arguments as JSON text or an object) or without the `function`
  wrapper; the content of an assistant turn that only calls tools or only reasons may be
  null;
- `tool_call_id` and `name` on `role: "tool"` results.
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


# Names of an assistant turn's reasoning in rows, first found wins.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant turn."""

    name: str
    arguments: dict[str, Any]
    id: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The OpenAI form with the arguments as an object, as chat templates read them."""
        call: dict[str, Any] = {
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if self.id:
            call["id"] = self.id
        return call


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str
    reasoning_content: str = ""  # assistant: the reasoning before the answer
    tool_calls: tuple[ToolCall, ...] = ()  # assistant
    tool_call_id: str = ""  # tool: the call this result answers
    name: str = ""  # tool: the tool that answered

    def as_dict(self) -> dict[str, Any]:
        """The chat-completions form (what servers and chat templates read); unset fields
        are left out."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [call.as_dict() for call in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


@dataclass
class Conversation:
    id: str
    messages: list[Message]
    source: str = field(default="", compare=False)  # "file:line" of the row, for reports

    def as_dicts(self) -> list[dict[str, Any]]:
        return [m.as_dict() for m in self.messages]


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


def _optional_string(item: Mapping[str, Any], key: str, what: str) -> str:
    value = item.get(key)
    return "" if value is None else _string(value, f"{what} '{key}'")


def _tool_call(call: object, what: str) -> ToolCall:
    if not isinstance(call, Mapping):
        raise RowError("bad_tool_call", f"{what} is a {type(call).__name__}, not an object")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise RowError("bad_tool_call", f"{what} 'function' is not an object")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise RowError("bad_tool_call", f"{what} arguments are not JSON: {err}") from None
    if not isinstance(arguments, Mapping):
        raise RowError("bad_tool_call", f"{what} arguments are not a JSON object")
    name = _string(function.get("name"), f"{what} name")
    return ToolCall(name, dict(arguments), _optional_string(call, "id", what))


def _message(item: Mapping[str, Any], i: int) -> Message:
    role = _role(item.get("from", item.get("role")), i)
    content = item.get("value", item.get("content"))
    if role == "tool":
        return Message(
            role,
            _string(content, f"turn {i} content"),
            tool_call_id=_optional_string(item, "tool_call_id", f"turn {i}"),
            name=_optional_string(item, "name", f"turn {i}"),
        )
    if role != "assistant":
        return Message(role, _string(content, f"turn {i} content"))
    key = next((k for k in REASONING_KEYS if item.get(k) is not None), None)
    reasoning = _string(item[key], f"turn {i} '{key}'") if key else ""
    calls = item.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RowError("bad_tool_call", f"turn {i} 'tool_calls' is not a list")
    tool_calls = tuple(_tool_call(c, f"turn {i} tool call {j}") for j, c in enumerate(calls))
    if content is None and (reasoning or tool_calls):
        content = ""
    return Message(role, _string(content, f"turn {i} content"), reasoning, tool_calls)


def _turns(items: object, key: str) -> list[Message]:
    if not isinstance(items, list):
        raise RowError("unknown_format", f"'{key}' is a {type(items).__name__}, not a list")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise RowError("unknown_format", f"turn {i} is a {type(item).__name__}, not an object")
        messages.append(_message(item, i))
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
    """A stable id from the messages alone: 16 hex digits of SHA-256.

    A message's reasoning and tool fields count only when set: a conversation without them
    has the id of its roles and contents alone.
    """
    items = []
    for m in messages:
        extra = {k: v for k, v in m.as_dict().items() if k not in ("role", "content")}
        items.append([m.role, m.content, extra] if extra else [m.role, m.content])
    payload = json.dumps(items, ensure_ascii=False)
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
