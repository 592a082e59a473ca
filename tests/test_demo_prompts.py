"""The demo's built-in prompt set: size, balance, determinism and train/held-out separation."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from draftforge import demo_prompts
from draftforge.data.conversation import parse_messages
from draftforge.demo_prompts import (
    CATEGORIES,
    HELDOUT_FAMILIES,
    TRAIN_FAMILIES,
    VOCAB,
    build_heldout,
    build_prompts,
    main,
)

EVAL_PROMPTS = Path(demo_prompts.__file__).parent / "assets" / "eval_prompts.jsonl"


def normalise(text):
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def train():
    return build_prompts()


@pytest.fixture(scope="module")
def heldout():
    return build_heldout()


def test_counts(train, heldout):
    assert len(train) >= 4000
    assert 150 <= len(heldout) <= 300


def test_deterministic_and_seeded(train, heldout):
    assert build_prompts(0) == train
    assert build_heldout(0) == heldout
    other = build_prompts(1)
    # Another seed refills the slots but keeps the shape: same ids, categories and families.
    assert [p["prompt"] for p in other] != [p["prompt"] for p in train]
    assert [(p["id"], p["family"]) for p in other][:50] == [(p["id"], p["family"]) for p in train][
        :50
    ]


def test_item_shape_and_ids(train, heldout):
    for items, prefix in ((train, ""), (heldout, "heldout-")):
        for item in items:
            assert set(item) == {"id", "category", "family", "prompt"}
            assert item["category"] in CATEGORIES
            assert item["family"].startswith(item["category"] + "/")
            assert re.fullmatch(rf"{prefix}{item['category']}-\d+", item["id"]), item["id"]
        ids = [item["id"] for item in items]
        assert len(ids) == len(set(ids))
    assert not {p["id"] for p in train} & {p["id"] for p in heldout}


def test_no_duplicates(train, heldout):
    for items in (train, heldout):
        texts = [normalise(p["prompt"]) for p in items]
        assert len(texts) == len(set(texts))


def test_category_balance(train, heldout):
    for items in (train, heldout):
        counts = Counter(p["category"] for p in items)
        assert set(counts) == set(CATEGORIES)
        assert max(counts.values()) <= 0.2 * len(items), counts


def test_prefixes_keep_the_mix(train):
    # Rows are interleaved, so a demo reading only the first rows still sees every category.
    assert {p["category"] for p in train[: len(CATEGORIES)]} == set(CATEGORIES)


def test_prompt_lengths(train, heldout):
    for item in train + heldout:
        text = item["prompt"]
        assert text.strip() == text and text, item
        assert not re.search(r"\{[a-z_]+(\[\d\])?\}", text), item  # every slot was filled
        limit = 1200 if item["category"] == "extraction" else 400
        assert len(text) <= limit, item


def test_train_and_heldout_share_no_prompt(train, heldout):
    assert not {normalise(p["prompt"]) for p in train} & {normalise(p["prompt"]) for p in heldout}


def test_heldout_families_are_disjoint_from_training(train, heldout):
    train_families = {p["family"] for p in train}
    heldout_families = {p["family"] for p in heldout}
    assert not train_families & heldout_families
    # Disjoint names would mean little if a template were reused under another name.
    train_templates = {t for families in TRAIN_FAMILIES.values() for t in families.values()}
    heldout_templates = {t for families in HELDOUT_FAMILIES.values() for t in families.values()}
    assert not train_templates & heldout_templates


def test_family_coverage(train, heldout):
    assert set(TRAIN_FAMILIES) == set(HELDOUT_FAMILIES) == set(CATEGORIES)
    for category in CATEGORIES:
        assert len(TRAIN_FAMILIES[category]) >= 30, category
    # Every family written contributes: none is dead or shadowed by duplicates.
    assert {p["family"] for p in train} == {
        f"{c}/{name}" for c, families in TRAIN_FAMILIES.items() for name in families
    }
    assert {p["family"] for p in heldout} == {
        f"{c}/{name}" for c, families in HELDOUT_FAMILIES.items() for name in families
    }


def test_vocabularies_are_clean():
    for name, values in VOCAB.items():
        assert len(values) == len(set(values)), name
        assert not re.search(r"_\d+$", name), name  # `_2` suffixes mean "another value"


def test_shipped_eval_prompts_are_not_training_prompts(train, heldout):
    rows = [json.loads(line) for line in EVAL_PROMPTS.read_text().splitlines() if line.strip()]
    shipped = {normalise(m["content"]) for row in rows for m in row["messages"]}
    assert not shipped & {normalise(p["prompt"]) for p in train + heldout}


def test_main_writes_both_files(tmp_path, train, heldout):
    assert main([str(tmp_path / "demo")]) == 0
    written = {}
    for name in ("train.jsonl", "heldout.jsonl"):
        lines = (tmp_path / "demo" / name).read_text(encoding="utf-8").splitlines()
        written[name] = [json.loads(line) for line in lines]
    assert written["train.jsonl"] == train
    assert written["heldout.jsonl"] == heldout
    assert not list((tmp_path / "demo").glob("*.tmp"))
    # draftforge's own reader takes each row as a single user turn.
    messages = parse_messages(written["heldout.jsonl"][0], "auto")
    assert [(m.role, m.content) for m in messages] == [("user", heldout[0]["prompt"])]
