"""Tokenised dataset cache and `prepare`, on a tiny byte-level BPE tokenizer built in memory."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from draftforge.config import ConfigError, load_config
from draftforge.data import (
    ChatTemplate,
    DataError,
    Message,
    PrepareResult,
    load_draft_vocab,
    prepare,
    prepare_dataset,
)
from draftforge.features import prepare_data

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The same turns with a different wrapper, to check that a template change misses the cache.
BRACKETS = (
    "{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
)


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["user assistant system", "hello there, how are you today?"], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHATML
    )


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def chat(i):
    return {
        "id": f"c{i}",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"question {i}?"},
            {"role": "assistant", "content": f"answer {i}" + " more" * i},
        ],
    }


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [chat(i) for i in range(12)]
    rows[3] = {"messages": [{"role": "user", "content": "unanswered"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(path, tok, cache, **kwargs):
    return prepare_dataset(path, tok, cache_dir=cache, num_workers=1, progress=False, **kwargs)


def test_dataset_rows_match_the_template(data, tokenizer, tmp_path):
    ds = run(data, tokenizer, tmp_path / "cache")
    assert len(ds) == 11 and ds.ids[:4] == ["c0", "c1", "c2", "c4"]
    assert ds.report.skipped == {"no_assistant_turn": 1}
    ct = ChatTemplate(tokenizer)
    for i, row in zip([0, 1, 2, 4, 11], [ds[0], ds[1], ds[2], ds[3], ds[-1]], strict=True):
        messages = [Message(m["role"], m["content"]) for m in chat(i)["messages"]]
        ids, mask = ct.encode(messages)
        assert row["id"] == f"c{i}"
        assert row["input_ids"].dtype == torch.long and row["loss_mask"].dtype == torch.bool
        assert row["input_ids"].tolist() == ids and row["loss_mask"].int().tolist() == mask
    assert ds.stats["rows"] == 11
    assert ds.stats["tokens"] == len(ds.input_ids) == int(ds.offsets[-1])
    assert ds.stats["supervised_tokens"] == int(ds.loss_mask.sum()) > 0
    with pytest.raises(IndexError):
        ds[11]


def test_cache_key_follows_every_input(data, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    first = run(data, tokenizer, cache)
    assert run(data, tokenizer, cache).path == first.path  # same inputs: a hit

    other = {
        run(data, tokenizer, cache, chat_template=BRACKETS).path,
        run(data, tokenizer, cache, max_length=8).path,
        run(data, tokenizer, cache, last_turn_only=True).path,
        run(data, tokenizer, cache, supervise_empty_think=True).path,
        run(data, tokenizer, cache, fmt="messages").path,
        run(data, tokenizer, cache, chat_template_kwargs={"enable_thinking": False}).path,
    }
    changed_tok = make_tokenizer()
    changed_tok.add_tokens(["answer"])
    other.add(run(data, changed_tok, cache).path)
    data.write_text(data.read_text().replace("question 5", "question 6"))
    other.add(run(data, tokenizer, cache).path)
    assert first.path not in other and len(other) == 8
    assert not list(cache.glob(".tmp-*"))  # temporary folders were renamed or removed


def test_hit_reads_from_disk(data, tokenizer, tmp_path, monkeypatch):
    first = run(data, tokenizer, tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenise")

    monkeypatch.setattr(ChatTemplate, "encode", fail)
    again = run(data, tokenizer, tmp_path)
    assert torch.equal(again.input_ids, first.input_ids)
    assert again.report.to_dict() == first.report.to_dict()


def test_workers_give_the_same_result(data, tokenizer, tmp_path):
    one = run(data, tokenizer, tmp_path / "a")
    two = prepare_dataset(data, tokenizer, cache_dir=tmp_path / "b", num_workers=2, progress=False)
    assert one.path.name == two.path.name  # the worker count is not part of the key
    assert torch.equal(one.input_ids, two.input_ids) and torch.equal(one.loss_mask, two.loss_mask)
    assert one.ids == two.ids


def test_truncation_and_rows_without_targets(data, tokenizer, tmp_path):
    full = run(data, tokenizer, tmp_path)
    prompt_tokens = int(full[0]["loss_mask"].int().argmax())  # first supervised position
    cut = run(data, tokenizer, tmp_path, max_length=prompt_tokens + 2)
    assert len(cut) == len(full)
    for i in range(len(cut)):
        n = len(cut[i]["input_ids"])
        assert torch.equal(cut[i]["input_ids"], full[i]["input_ids"][:n])
        assert torch.equal(cut[i]["loss_mask"], full[i]["loss_mask"][:n])
    assert cut.stats["rows_truncated"] == len(cut)
    nothing = run(data, tokenizer, tmp_path, max_length=prompt_tokens)
    assert len(nothing) == 0 and nothing.report.skipped["no_supervised_tokens"] == 11
    assert nothing.report.examples["no_supervised_tokens"][0].startswith(f"{data}:1: ")


def test_template_failures_are_counted_or_strict(data, tokenizer, tmp_path):
    picky = "{{ raise_exception('no thanks') if messages[1]['content'] == 'question 2?' }}" + CHATML
    ds = run(data, tokenizer, tmp_path, chat_template=picky)
    assert ds.report.skipped == {"no_assistant_turn": 1, "template_error": 1}
    assert ds.report.examples["template_error"] == [f"{data}:3: no thanks"]
    answered = '"u"}, {"role": "assistant", "content": "a"}]'
    data.write_text(data.read_text().replace('"unanswered"}]', answered))
    with pytest.raises(DataError, match=rf"^{data}:3: no thanks \[template_error\]"):
        run(data, tokenizer, tmp_path, chat_template=picky, strict=True)


def test_prepare_builds_the_vocab_and_summary(data, tokenizer, tmp_path):
    result = prepare(
        data,
        tokenizer=tokenizer,
        cache_dir=tmp_path,
        num_workers=1,
        draft_vocab_size=16,
        progress=False,
    )
    ds = result.dataset
    assert result.vocab_path.parent == ds.path
    assert len(result.vocab.d2t) == 16 and len(result.vocab.t2d) == len(tokenizer)
    assert torch.equal(load_draft_vocab(result.vocab_path).d2t, result.vocab.d2t)
    assert 0 < result.vocab.coverage < 1
    text = result.summary()
    assert "rows read: 12, kept: 11" in text and "skipped 1 (no_assistant_turn)" in text
    assert f"{data}:4: no assistant message" in text
    assert f"supervised: {ds.stats['supervised_tokens']}" in text
    assert f"coverage {result.vocab.coverage:.2%}" in text
    again = prepare(
        data, tokenizer=tokenizer, cache_dir=tmp_path, draft_vocab_size=16, progress=False
    )
    assert again.vocab_path == result.vocab_path and again.vocab.coverage == result.vocab.coverage


def flip_byte(path: Path, tensor: str) -> None:
    """Invert the first data byte of `tensor` in a safetensors file."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header])[tensor]["data_offsets"]
    data[8 + header + start] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def prepare_tiny(data: Path, tokenizer: Any, cache: Path) -> PrepareResult:
    return prepare(
        data,
        tokenizer=tokenizer,
        cache_dir=cache,
        num_workers=1,
        draft_vocab_size=16,
        progress=False,
    )


def damage(case: str, result: PrepareResult) -> str:
    """Damage one file of `result`'s cache entry as `case` says; the line prepare must print."""
    tokens, meta = result.dataset.path / "tokens.safetensors", result.dataset.path / "meta.json"
    entry_again, vocab_again = "building the entry again", "building it again"
    if case == "tokens flipped":
        flip_byte(tokens, "input_ids")
        return f"dataset cache: {tokens} is damaged (sha256 differs from meta.json); {entry_again}"
    if case == "tokens truncated":
        size = tokens.stat().st_size
        truncate(tokens)
        why = f"{size // 2} bytes, meta.json records {size}"
        return f"dataset cache: {tokens} is damaged ({why}); {entry_again}"
    if case == "meta garbage":
        meta.write_bytes(b"\xff\xfe\x00garbage\x80")
        return f"dataset cache: {meta} is damaged (not valid JSON); {entry_again}"
    if case == "meta edited":  # still valid JSON: a row id changed
        meta.write_text(meta.read_text().replace('"c1"', '"c7"', 1))
        why = "its content differs from its checksum"
        return f"dataset cache: {meta} is damaged ({why}); {entry_again}"
    if case == "meta without checksums":  # as draftforge wrote it before checksums
        content = json.loads(meta.read_text())
        for name in ("files", "checksum"):
            content.pop(name, None)
        meta.write_text(json.dumps(content))
        why = "records no checksums (an earlier draftforge wrote it)"
        return f"dataset cache: {meta} {why}; {entry_again}"
    if case == "vocab truncated":
        truncate(result.vocab_path)
        why = "is damaged (not a readable safetensors file)"
        return f"dataset cache: {result.vocab_path} {why}; {vocab_again}"
    if case == "vocab without sha256":  # as draftforge wrote it before checksums
        vocab = result.vocab
        metadata = {"coverage": repr(vocab.coverage)}
        save_file({"d2t": vocab.d2t, "t2d": vocab.t2d}, str(result.vocab_path), metadata=metadata)
        why = "records no sha256 (an earlier draftforge wrote it)"
        return f"dataset cache: {result.vocab_path} {why}; {vocab_again}"
    assert case == "vocab flipped"
    flip_byte(result.vocab_path, "d2t")
    why = "is damaged (its content differs from the sha256 it records)"
    return f"dataset cache: {result.vocab_path} {why}; {vocab_again}"


@pytest.mark.parametrize(
    "case",
    [
        "tokens flipped",
        "tokens truncated",
        "meta garbage",
        "meta edited",
        "meta without checksums",
        "vocab truncated",
        "vocab flipped",
        "vocab without sha256",
    ],
)
def test_a_damaged_file_is_named_and_built_again(
    case: str, data: Path, tokenizer: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Loaded tensors map the file, so the undamaged build lives in a cache of its own.
    undamaged = prepare_tiny(data, tokenizer, tmp_path / "undamaged")
    cache = tmp_path / "cache"
    line = damage(case, prepare_tiny(data, tokenizer, cache))
    capsys.readouterr()
    again = prepare_tiny(data, tokenizer, cache)
    assert capsys.readouterr().out.splitlines() == [line]
    for name in ("input_ids", "loss_mask", "offsets"):
        assert torch.equal(getattr(again.dataset, name), getattr(undamaged.dataset, name))
    assert again.dataset.ids == undamaged.dataset.ids
    assert again.dataset.stats == undamaged.dataset.stats
    assert torch.equal(again.vocab.d2t, undamaged.vocab.d2t)
    assert torch.equal(again.vocab.t2d, undamaged.vocab.t2d)
    assert again.vocab.coverage == undamaged.vocab.coverage
    # Repaired on disk, in the same entry: the next run reads it without a word.
    assert prepare_tiny(data, tokenizer, cache).dataset.path == again.dataset.path
    assert capsys.readouterr().out == ""
    assert not list(cache.glob(".tmp-*"))


QWEN3_TOOLS = Path(__file__).parent / "data_templates" / "qwen3_tools.jinja"
REASONING_ROWS = [
    {
        "id": "think",
        "messages": [
            {"role": "user", "content": "hello there?"},
            {"role": "assistant", "content": "how are you", "reasoning_content": "a greeting"},
        ],
    },
    {
        "id": "tool",
        "messages": [
            {"role": "user", "content": "today?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "date", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "monday"},
            {"role": "assistant", "content": "monday"},
        ],
    },
]


def test_chat_template_kwargs_from_the_config_change_rendering_and_key(tmp_path):
    """data.chat_template_kwargs reaches the template through `prepare_data`, and a change
    builds its own cache entry instead of reusing the other one."""
    path = tmp_path / "think.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REASONING_ROWS))
    tok = make_tokenizer()
    base = [
        f"data.path={path}",
        f"data.chat_template={QWEN3_TOOLS}",
        f"target.cache_dir={tmp_path}",
        "draft.draft_vocab_size=16",
        "data.num_workers=1",
    ]
    off = [*base, "data.chat_template_kwargs={enable_thinking: false}"]
    thinking = prepare_data(load_config(None, base), tok, len(tok)).dataset
    no_thinking = prepare_data(load_config(None, off), tok, len(tok)).dataset
    assert thinking.path != no_thinking.path
    assert prepare_data(load_config(None, off), tok, len(tok)).dataset.path == no_thinking.path
    meta = json.loads((no_thinking.path / "meta.json").read_text())
    assert meta["settings"]["chat_template_kwargs"] == {"enable_thinking": False}

    def supervised(ds: Any, row: int) -> str:
        return tok.decode(ds[row]["input_ids"][ds[row]["loss_mask"]])

    assert len(thinking) == len(no_thinking) == 2
    assert supervised(thinking, 0) == "<think>\na greeting\n</think>\n\nhow are you<|im_end|>"
    assert supervised(no_thinking, 0) == "how are you<|im_end|>"
    # The tool call is supervised, the tool's result is not.
    call = '<tool_call>\n{"name": "date", "arguments": {}}\n</tool_call><|im_end|>'
    assert supervised(thinking, 1) == f"{call}monday<|im_end|>"
    with pytest.raises(ConfigError, match=r"data\.chat_template_kwargs: expected dict"):
        load_config(None, ["data.chat_template_kwargs=[enable_thinking]"])
