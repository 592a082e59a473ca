"""Token ids and loss masks from a tokenizer's own chat template, for any template.

The model must learn to produce, for every assistant turn, the turn's text and the
end-of-turn token(s) it emits to stop (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...), but not
the assistant header (`<|im_start|>assistant\\n`), which the serving engine writes into the
prompt, nor anything of system, user or tool turns.

The turns are located by rendering, not by per-family patterns:

1. Render the whole conversation, once as is and once with a private-use marker after
   each message's content (before its trailing whitespace, so `| trim` templates still
   trim). Removing the markers must give the plain rendering back; the marker positions
   are where each message's content ends. (Content holding the marker pattern itself
   fails this check and is reported, never mis-masked.)
2. Start of assistant turn i: render messages[:i] with the generation prompt (marked the
   same way). What follows the previous message's content there (its closing plus the
   generation prompt) is the prompt suffix that the serving engine writes; it is found
   in the full rendering after the same message, and generation starts right after it.
   Matching the suffix instead of requiring messages[:i] to be a prefix of the whole
   keeps templates that rewrite history working (Qwen3 drops old reasoning; Mistral puts
   the system prompt in the last user turn).
3. End of assistant turn i: render messages[:i+1] (turn i last) and take what the
   template writes after the content: the end-of-turn text is that tail up to and
   including its first special token, or the tail without trailing whitespace when it
   has none (so `<|im_end|>` is supervised and the newline after it is not).
4. Tokenise the full rendering with offsets; a token is supervised when it overlaps a
   turn's character span.

Reasoning templates: the generation prompt is also rendered with `enable_thinking=False`
(Qwen3's switch for "no reasoning"). If that longer prompt, ending in an empty
`<think>\\n\\n</think>\\n\\n`, matches, the empty think block belongs to the prompt and is
not supervised, unless `supervise_empty_think`. A think block with reasoning in it is
always supervised. Last, the prompt is rendered with `enable_thinking=True`: a turn that
the template writes without a think block while the configured prompt pre-fills one (Qwen3
with `chat_template_kwargs` `enable_thinking: false`, on turns before the last) starts after
the plain header.

Reasoning and tools: messages reach the template in the chat-completions form
(`Message.as_dict`), the reasoning also as `thinking`, the name gpt-oss's template reads.
Reasoning that the template writes into an assistant turn lies between the generation
prompt and the answer, so it is supervised with the answer (where the template keeps it:
Qwen3's drops the reasoning of turns before the last user message, DeepSeek-R1's all of
it). Tool results are tool turns and never supervised. An assistant turn that calls tools
is marked after the name of its last call rather than after its content (templates test the
content, which may be empty, but not the name); its end-of-turn text is the rest of the call
up to the first special token, so a template that writes a special token inside a call
(gpt-oss's `<|channel|>`) would end the supervised span early. A template that leaves the
calls out fails the row (`tool_calls_not_rendered`) rather than train on a turn without them.

`chat_template_kwargs` are extra template variables (`enable_thinking`, ...) passed to every
rendering; they are part of the dataset cache key.
"""

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from draftforge.config import ConfigError
from draftforge.data.conversation import Message, RowError

# Private-use code points: templates pass them through and real text almost never holds
# this pattern; the number is the message index.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


# Arguments of `apply_chat_template` that draftforge sets itself: not template variables.
_RESERVED_KWARGS = (
    "conversation",
    "chat_template",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "return_dict",
    "return_tensors",
)


def template_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of `chat_template_kwargs`, refused when it sets an argument draftforge sets."""
    taken = sorted(set(kwargs or {}) & set(_RESERVED_KWARGS))
    if taken:
        raise ConfigError(
            f"data.chat_template_kwargs: {', '.join(taken)} cannot be set there; it holds "
            "variables for the template, such as enable_thinking"
        )
    return dict(kwargs or {})


def template_message(message: Message) -> dict[str, Any]:
    """A message as chat templates read it: the chat-completions form, with the reasoning
    also under gpt-oss's name for it."""
    out = message.as_dict()
    if message.reasoning_content:
        out["thinking"] = message.reasoning_content
    return out


def load_template(template: str | Path | None) -> str | None:
    """A chat template given inline or as a path to a jinja file (None stays None).

    A string without jinja tags is a path, so a mistyped path fails instead of becoming a
    template that writes the path for every conversation.
    """
    if template is None:
        return None
    if isinstance(template, Path) or not ("{{" in template or "{%" in template):
        return Path(template).expanduser().read_text(encoding="utf-8")
    return template


class ChatTemplate:
    """Renders conversations with a chat template and marks what the model must generate."""

    def __init__(
        self,
        tokenizer: Any,
        template: str | None = None,
        *,
        last_turn_only: bool = False,
        supervise_empty_think: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast (Rust `tokenizers`) tokenizer is needed for character offsets")
        self.tokenizer = tokenizer
        self.template = template if template is not None else tokenizer.chat_template
        if not self.template:
            raise ValueError("the tokenizer has no chat template; pass chat_template=")
        self.last_turn_only = last_turn_only
        self.kwargs = template_kwargs(chat_template_kwargs)
        # Template variables to render each generation prompt with, tried in order until one
        # is found before the answer (see the module docstring); enable_thinking only for
        # templates that read it.
        reads_thinking = "enable_thinking" in self.template
        overrides: list[dict[str, Any]] = (
            [{"enable_thinking": False}] if reads_thinking and not supervise_empty_think else []
        )
        overrides.append({})
        if reads_thinking:
            overrides.append({"enable_thinking": True})
        self._prompt_variants: list[dict[str, Any]] = []
        for override in overrides:
            variant = {**self.kwargs, **override}
            if variant not in self._prompt_variants:
                self._prompt_variants.append(variant)
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials.update(tokenizer.all_special_tokens)
        specials.discard("")
        longest_first = sorted(specials, key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, longest_first))) if specials else None

    def render(
        self, messages: list[Message], *, generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """The template's text for `messages`; template failures become RowError.

        `kwargs` are template variables on top of `chat_template_kwargs`.
        """
        dicts = [template_message(m) for m in messages]
        return self._render_dicts(dicts, generation_prompt, kwargs)

    def _render_dicts(
        self, messages: list[dict[str, Any]], generation_prompt: bool, kwargs: dict[str, Any]
    ) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **{**self.kwargs, **kwargs},
            )
        except (jinja2.TemplateError, ValueError, TypeError) as err:
            # raise_exception() in templates (e.g. "roles must alternate") lands here
            raise RowError("template_error", str(err)) from None

    def _render_marked(
        self, messages: list[Message], generation_prompt: bool, **kwargs: Any
    ) -> tuple[str, list[int | None]]:
        """The rendering without markers, and where each message's content ends in it, or
        its last tool call's name (None for a message the template leaves out)."""
        dicts = []
        for k, m in enumerate(messages):
            message = template_message(m)
            if m.tool_calls:
                message["tool_calls"][-1]["function"]["name"] += _MARK.format(k)
            else:
                # Before trailing whitespace, so that templates which trim still trim it; at
                # the end of all-whitespace content, so that templates which strip leading
                # newlines (Qwen3 on answers) still strip them.
                body = m.content.rstrip() or m.content
                message["content"] = body + _MARK.format(k) + m.content[len(body) :]
            dicts.append(message)
        marked = self._render_dicts(dicts, generation_prompt, kwargs)
        ends: list[int | None] = [None] * len(messages)
        pieces, removed, last = [], 0, 0
        for match in _MARK_RE.finditer(marked):
            k = int(match.group(1))
            if k >= len(messages) or ends[k] is not None:
                raise RowError("span_not_found", f"the template writes message {k} twice")
            pieces.append(marked[last : match.start()])
            ends[k] = match.start() - removed
            removed += match.end() - match.start()
            last = match.end()
        pieces.append(marked[last:])
        return "".join(pieces), ends

    def spans(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans [start, end) to supervise."""
        text = self.render(messages)
        unmarked, ends = self._render_marked(messages, generation_prompt=False)
        if unmarked != text:
            raise RowError("span_not_found", "the template output depends on the content's end")
        turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
        if self.last_turn_only:
            turns = turns[-1:]
        spans = []
        for i in turns:
            end = ends[i]
            if end is None and messages[i].tool_calls:
                raise RowError(
                    "tool_calls_not_rendered",
                    f"the template does not write the tool calls of assistant message {i}",
                )
            if end is None:
                raise RowError("span_not_found", f"the template leaves out assistant message {i}")
            start = self._generation_start(messages, i, text, ends, end)
            spans.append((start, end + len(self._end_of_turn(messages, i, text, end))))
        return text, spans

    def _generation_start(
        self, messages: list[Message], i: int, text: str, ends: list[int | None], end: int
    ) -> int:
        """Where the model starts writing assistant message i (whose content ends at `end`)."""
        if i == 0:
            raise RowError(
                "span_not_found", "an assistant turn with nothing before it has no prompt"
            )
        for kwargs in self._prompt_variants:
            prompt, prompt_ends = self._render_marked(messages[:i], True, **kwargs)
            # The last earlier message that both renderings contain anchors the suffix.
            placed = [k for k in range(i) if ends[k] is not None and prompt_ends[k] is not None]
            suffix = prompt[prompt_ends[placed[-1]] :] if placed else prompt
            region_start = ends[placed[-1]] if placed else 0
            # First occurrence: the template's own text comes before the assistant content.
            found = text.find(suffix, region_start, end)
            if found >= 0:
                return found + len(suffix)
        raise RowError(
            "span_not_found",
            f"the generation prompt {suffix!r} is not before assistant message {i}",
        )

    def _end_of_turn(self, messages: list[Message], i: int, text: str, end: int) -> str:
        """The text after assistant message i's content that the model must also write."""
        if i == len(messages) - 1:
            tail = text[end:]
        else:
            closed, closed_ends = self._render_marked(messages[: i + 1], False)
            closed_end = closed_ends[i]
            if closed_end is None:
                raise RowError("span_not_found", f"the template leaves out assistant message {i}")
            tail = closed[closed_end:]
        match = self._special.search(tail) if self._special else None
        eot = tail[: match.end()] if match else tail.rstrip()
        if not text.startswith(eot, end):
            raise RowError(
                "span_not_found", f"assistant message {i} ends with {eot!r} only when it is last"
            )
        return eot

    def encode(
        self, messages: list[Message], max_length: int | None = None
    ) -> tuple[list[int], list[int]]:
        """(input_ids, loss_mask) for a conversation, truncated to `max_length` tokens.

        loss_mask[t] = 1 when input_ids[t] is a token the model must generate.
        """
        text, spans = self.spans(messages)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = encoding["input_ids"]
        offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts = offsets[:, 0]
        # Zero-width tokens count as covering their start character.
        ends = np.maximum(offsets[:, 1], starts + 1)
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            # Overlap, not containment: a token straddling an edge (a byte-level piece of a
            # character, whitespace merged across the boundary) is still one to produce.
            mask |= (starts < end) & (ends > start)
        return ids[:max_length], mask[:max_length].astype(np.int64).tolist()
