"""Loss masks from chat templates: golden cases for five template families, and properties.

The tokenizer is SmolLM2's real one (the shared `smollm2_tokenizer` fixture). The other
families' templates are jinja files in tests/data_templates/ written to reproduce each
format; their control tokens are added to the tokenizer as special tokens, as they are in
the families' own tokenizers.
"""

import copy
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from draftforge.config import ConfigError
from draftforge.data import ChatTemplate, Message, RowError, ToolCall, load_template

TEMPLATES = Path(__file__).parent / "data_templates"

# Family -> (template file, special tokens to add, non-special tokens to add, named tokens).
FAMILIES = {
    "llama3": (
        "llama3.jinja",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        [],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
    "qwen3": ("qwen3.jinja", [], ["<think>", "</think>"], {}),
    "mistral": (
        "mistral_v03.jinja",
        ["[INST]", "[/INST]"],
        [],
        {"bos_token": "<s>", "eos_token": "</s>"},
    ),
    "gemma3": ("gemma3.jinja", ["<start_of_turn>", "<end_of_turn>"], [], {"bos_token": "<bos>"}),
    # Qwen3's own tokenizer has these as added tokens that are not special.
    "qwen3_tools": (
        "qwen3_tools.jinja",
        [],
        [
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
        ],
        {},
    ),
}


class Families(dict):
    """family -> (tokenizer with the family's control tokens, template text)."""

    def __repr__(self):  # hypothesis prints its arguments; the tokenizers would fill pages
        return f"Families({sorted(self)})"


@pytest.fixture(scope="session")
def family_tokenizers(smollm2_tokenizer):
    out = Families(chatml=(smollm2_tokenizer, smollm2_tokenizer.chat_template))
    for name, (file, specials, plain, named) in FAMILIES.items():
        tok = copy.deepcopy(smollm2_tokenizer)
        tok.add_special_tokens({**named, "additional_special_tokens": specials})
        tok.add_tokens(plain)
        out[name] = (tok, load_template(TEMPLATES / file))
    return out


def pieces(tokenizer, ids, mask):
    """Maximal runs of equal mask value, decoded: [(text, supervised), ...]."""
    out = []
    for value, run in itertools.groupby(zip(ids, mask, strict=True), key=lambda p: p[1]):
        text = tokenizer.decode([i for i, _ in run], clean_up_tokenization_spaces=False)
        out.append((text, value))
    return out


SYSTEM = Message("system", "You are a careful assistant.")
CONVERSATION = [
    SYSTEM,
    Message("user", "What is 2+2?"),
    Message("assistant", "2+2 equals 4."),
    Message("user", "And doubled?"),
    Message("assistant", "Doubled, it is 8."),
]

GOLDEN = {
    # SmolLM2's own template (ChatML, as Qwen2.5 also writes it): the header
    # "<|im_start|>assistant\n" is prompt; the answer and its <|im_end|> are supervised, the
    # newline after <|im_end|> is not.
    "chatml": [
        (
            "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            0,
        ),
        ("2+2 equals 4.<|im_end|>", 1),
        ("\n<|im_start|>user\nAnd doubled?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("Doubled, it is 8.<|im_end|>", 1),
        ("\n", 0),
    ],
    # Llama 3: "<|start_header_id|>assistant<|end_header_id|>\n\n" is prompt, <|eot_id|> ends
    # every answer.
    "llama3": [
        (
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "You are a careful assistant.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            0,
        ),
        ("2+2 equals 4.<|eot_id|>", 1),
        (
            "<|start_header_id|>user<|end_header_id|>\n\nAnd doubled?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            0,
        ),
        ("Doubled, it is 8.<|eot_id|>", 1),
    ],
    # Qwen3 (thinking): the final answer gets an empty think block from the template; it is
    # what the enable_thinking=False prompt pre-fills, so it stays unsupervised.
    "qwen3": [
        (
            "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            0,
        ),
        ("2+2 equals 4.<|im_end|>", 1),
        (
            "\n<|im_start|>user\nAnd doubled?<|im_end|>\n<|im_start|>assistant\n"
            "<think>\n\n</think>\n\n",
            0,
        ),
        ("Doubled, it is 8.<|im_end|>", 1),
        ("\n", 0),
    ],
    # Mistral v0.3: answers follow "[/INST]" after a space the model writes, and end in </s>.
    # The template only writes the system text into a final user turn, so it is absent here.
    "mistral": [
        ("<s>[INST] What is 2+2?[/INST]", 0),
        (" 2+2 equals 4.</s>", 1),
        ("[INST] And doubled?[/INST]", 0),
        (" Doubled, it is 8.</s>", 1),
    ],
    # Gemma 3: the system text opens the first user turn; "<start_of_turn>model\n" is prompt,
    # <end_of_turn> is supervised and the newline after it is not.
    "gemma3": [
        (
            "<bos><start_of_turn>user\nYou are a careful assistant.\n\nWhat is 2+2?<end_of_turn>\n"
            "<start_of_turn>model\n",
            0,
        ),
        ("2+2 equals 4.<end_of_turn>", 1),
        ("\n<start_of_turn>user\nAnd doubled?<end_of_turn>\n<start_of_turn>model\n", 0),
        ("Doubled, it is 8.<end_of_turn>", 1),
        ("\n", 0),
    ],
}


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_golden_masks(family_tokenizers, family):
    tok, template = family_tokenizers[family]
    ids, mask = ChatTemplate(tok, template).encode(CONVERSATION)
    assert pieces(tok, ids, mask) == GOLDEN[family]
    # The token ids are exactly the template's own tokenisation of the conversation.
    dicts = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    assert ids == tok.apply_chat_template(dicts, chat_template=template)["input_ids"]


QWEN3_REASONING = [
    SYSTEM,
    Message("user", "What is 2+2?"),
    Message("assistant", "<think>\nSmall sum.\n</think>\n\n2+2 equals 4."),
    Message("user", "And doubled?"),
    Message("assistant", "<think>\nTwice 4.\n</think>\n\nDoubled, it is 8."),
]


def test_qwen3_reasoning_is_supervised_and_old_reasoning_dropped(family_tokenizers):
    tok, template = family_tokenizers["qwen3"]
    ids, mask = ChatTemplate(tok, template).encode(QWEN3_REASONING)
    assert pieces(tok, ids, mask)[1:4] == [
        ("2+2 equals 4.<|im_end|>", 1),  # reasoning of earlier turns is not rendered at all
        ("\n<|im_start|>user\nAnd doubled?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("<think>\nTwice 4.\n</think>\n\nDoubled, it is 8.<|im_end|>", 1),
    ]


AGENT = [
    SYSTEM,
    Message("user", "Weather in Paris?"),
    Message(
        "assistant",
        "",
        reasoning_content="Ask the weather tool.",
        tool_calls=(ToolCall("get_weather", {"city": "Paris"}, "call_1"),),
    ),
    Message("tool", "18 C, sunny", tool_call_id="call_1", name="get_weather"),
    Message("assistant", "It is 18 C and sunny.", reasoning_content="The tool says 18 C."),
]
AGENT_PROMPT = (
    "<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
)


def test_reasoning_and_tool_calls_are_supervised_tool_results_not(family_tokenizers):
    """`reasoning_content` is written in the turn's think block and supervised with the answer
    and the tool call; the tool's result and every header are not."""
    tok, template = family_tokenizers["qwen3_tools"]
    ids, mask = ChatTemplate(tok, template).encode(AGENT)
    assert pieces(tok, ids, mask) == [
        (AGENT_PROMPT, 0),
        (
            "<think>\nAsk the weather tool.\n</think>\n\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
            1,
        ),
        (
            "\n<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n",
            0,
        ),
        ("<think>\nThe tool says 18 C.\n</think>\n\nIt is 18 C and sunny.<|im_end|>", 1),
        ("\n", 0),
    ]
    dicts = [m.as_dict() for m in AGENT]
    assert ids == tok.apply_chat_template(dicts, chat_template=template)["input_ids"]


def test_enable_thinking_false_reaches_the_template(family_tokenizers):
    """chat_template_kwargs go to every rendering: with thinking off this template leaves the
    reasoning out, and the empty think block its prompt pre-fills is not supervised."""
    tok, template = family_tokenizers["qwen3_tools"]
    ct = ChatTemplate(tok, template, chat_template_kwargs={"enable_thinking": False})
    no_think = "<think>\n\n</think>\n\n"
    assert ct.render(AGENT[:2], generation_prompt=True) == AGENT_PROMPT + no_think
    ids, mask = ct.encode(AGENT)
    assert pieces(tok, ids, mask) == [
        (AGENT_PROMPT, 0),
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            "<|im_end|>",
            1,
        ),
        (
            "\n<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
            f"<|im_start|>assistant\n{no_think}",
            0,
        ),
        ("It is 18 C and sunny.<|im_end|>", 1),
        ("\n", 0),
    ]


def test_a_template_without_tools_fails_tool_call_rows(smollm2_tokenizer):
    # SmolLM2's template writes role and content only: the call would vanish from the turn.
    with pytest.raises(RowError) as err:
        ChatTemplate(smollm2_tokenizer).encode(AGENT)
    assert err.value.reason == "tool_calls_not_rendered"


def test_template_kwargs_cannot_set_what_draftforge_sets(smollm2_tokenizer):
    with pytest.raises(ConfigError, match="add_generation_prompt, tokenize cannot be set"):
        ChatTemplate(
            smollm2_tokenizer, chat_template_kwargs={"tokenize": True, "add_generation_prompt": 1}
        )


def test_qwen3_supervise_empty_think(family_tokenizers):
    tok, template = family_tokenizers["qwen3"]
    ct = ChatTemplate(tok, template, supervise_empty_think=True)
    ids, mask = ct.encode(CONVERSATION)
    assert pieces(tok, ids, mask)[2:4] == [
        ("\n<|im_start|>user\nAnd doubled?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("<think>\n\n</think>\n\nDoubled, it is 8.<|im_end|>", 1),
    ]


def test_last_turn_only(smollm2_tokenizer):
    ct = ChatTemplate(smollm2_tokenizer, last_turn_only=True)
    ids, mask = ct.encode(CONVERSATION)
    supervised = [text for text, value in pieces(smollm2_tokenizer, ids, mask) if value]
    assert supervised == ["Doubled, it is 8.<|im_end|>"]


def test_truncation_keeps_mask_aligned(smollm2_tokenizer):
    ct = ChatTemplate(smollm2_tokenizer)
    ids, mask = ct.encode(CONVERSATION)
    for length in (1, 17, len(ids) - 3, len(ids), len(ids) + 5):
        assert ct.encode(CONVERSATION, max_length=length) == (ids[:length], mask[:length])


def test_template_from_file_or_text(family_tokenizers):
    tok, _ = family_tokenizers["llama3"]
    ct = ChatTemplate(tok, load_template(str(TEMPLATES / "llama3.jinja")))
    assert ct.render(CONVERSATION[:2]).startswith("<|begin_of_text|><|start_header_id|>system")
    assert load_template("{{ 'x' }}") == "{{ 'x' }}"
    with pytest.raises(FileNotFoundError):
        load_template("no/such/template.jinja")


def test_template_errors_become_row_errors(family_tokenizers, smollm2_tokenizer):
    tok, template = family_tokenizers["gemma3"]
    with pytest.raises(RowError) as err:  # Gemma's template demands alternating turns
        ChatTemplate(tok, template).encode([Message("user", "a"), Message("user", "b")])
    assert err.value.reason == "template_error"
    with pytest.raises(RowError) as err:  # nothing precedes the answer: there is no prompt
        ChatTemplate(smollm2_tokenizer).encode([Message("assistant", "a")])
    assert err.value.reason == "span_not_found"


def test_tokenizer_without_template_is_rejected(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        ChatTemplate(tok)


# --- properties --------------------------------------------------------------------------

# SmolLM2's vocabulary lacks a few byte tokens (some C0 controls, the UTF-8 lead bytes of
# planes 4-15), so the text stays in what it can encode; "\n\t\r" come in separately.
CHARACTERS = st.characters(
    codec="utf-8", max_codepoint=0x3FFFF, exclude_categories=("Cs", "Co", "Cc")
)
CONTENT = st.one_of(
    st.text(CHARACTERS, max_size=24),
    st.text(st.sampled_from("ab \n\t"), max_size=8),
    st.sampled_from(["", "\n", "  ", "\n\nHi\n", "é😀中", "x\r\ny "]),
)
ROLE_SEQUENCES = st.lists(st.sampled_from(["user", "assistant", "tool"]), min_size=1, max_size=5)


@st.composite
def conversations(draw, alternating):
    """System optional, then a user turn, then either any mix of roles with at least one
    assistant turn, or (for templates that demand it) strictly alternating turns."""
    if alternating:
        roles = ["user", "assistant"] * draw(st.integers(1, 3))
    else:
        roles = ["user", *draw(ROLE_SEQUENCES.filter(lambda r: "assistant" in r))]
    if draw(st.booleans()):
        roles.insert(0, "system")
    return [Message(role, draw(CONTENT)) for role in roles]


# family -> (end-of-turn text, whether the template demands alternating turns)
PROPERTY_FAMILIES = {
    "chatml": ("<|im_end|>", False),
    "llama3": ("<|eot_id|>", False),
    "qwen3": ("<|im_end|>", False),
    "qwen3_tools": ("<|im_end|>", False),
    "mistral": ("</s>", True),
    "gemma3": ("<end_of_turn>", True),
}


@pytest.mark.parametrize("family", sorted(PROPERTY_FAMILIES))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cut=st.floats(0, 1.2))
def test_mask_properties(family_tokenizers, family, data, cut):
    eot, alternating = PROPERTY_FAMILIES[family]
    messages = data.draw(conversations(alternating), label="messages")
    tok, template = family_tokenizers[family]
    ct = ChatTemplate(tok, template)
    ids, mask = ct.encode(messages)
    text, spans = ct.spans(messages)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(ids)

    # Every supervised token overlaps an assistant span; every token inside one is supervised.
    for (start, end), value in zip(offsets, mask, strict=True):
        overlaps = any(start < e and max(end, start + 1) > s for s, e in spans)
        inside = any(s <= start and end <= e for s, e in spans)
        assert value == overlaps
        assert not inside or value

    # One supervised run per assistant turn, in order; each decodes to the turn's text as
    # the template writes it (templates may trim or pad whitespace) plus the end-of-turn
    # token, after at most some header whitespace that the tokenizer merged into the first
    # supervised token. Any header or user text in it would break the equality.
    answers = [m.content for m in messages if m.role == "assistant"]
    runs = [
        [i for i, _ in run]
        for value, run in itertools.groupby(enumerate(mask), key=lambda p: p[1])
        if value
    ]
    assert len(runs) == len(answers) == len(spans)
    for run, answer, (s, e) in zip(runs, answers, spans, strict=True):
        decoded = tok.decode([ids[i] for i in run], clean_up_tokenization_spaces=False)
        first, last = offsets[run[0]][0], offsets[run[-1]][1]
        assert decoded == text[first:last]
        assert last == e and first <= s and not text[first:s].strip()
        body = text[s : e - len(eot)]
        assert text[s:e].endswith(eot)
        assert body.strip() == answer.strip()
        if family == "chatml":
            assert body == answer

    # Truncation cuts both lists at the same place.
    length = max(1, int(cut * len(ids)))
    assert ct.encode(messages, max_length=length) == (ids[:length], mask[:length])
