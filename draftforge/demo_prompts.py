"""The demo's built-in prompt set: hand-written templates and vocabularies, no downloads.

The CPU demo trains a draft for SmolLM2-135M-Instruct on that model's own answers, so it
needs prompts, not conversations. This module writes them from `assets/demo_prompts.json`,
whose template families and slot vocabularies were all written for draftforge; the news items,
reviews, emails, schedules and biographies in it are invented (real cities, fictional people
and events), and its explanatory paragraphs restate common knowledge in their own words.

The asset holds three tables, read once at import:

- "vocab": slot name -> values. A template slot `{name}` draws from it, and `{name_2}` draws
  a different value from the same vocabulary. A value that is a list is read with
  `{pair[0]}`, which keeps linked values (a book and its author, a rule and its consequence)
  together. A vocabulary written as {"from": low, "to": high} is the integers low..high.
- "train_families" and "heldout_families": category -> family name -> format string, in the
  order of CATEGORIES. They are separate so that evaluation never sees a training template.

`build_prompts()` expands the training families into a few thousand short, distinct requests
across ten categories, and `build_heldout()` expands the held-out families into about two
hundred evaluation prompts, so the draft is never measured on a template it was trained on.

Building the demo data starts here:

    python -m draftforge.demo_prompts data/demo          # writes train.jsonl and heldout.jsonl
    draftforge regenerate data/demo/train.jsonl target.path=smollm2 \
        --out data/demo/train_smollm2.jsonl
    draftforge eval --draft runs/demo --prompts data/demo/heldout.jsonl

Each JSONL row is {"id", "category", "family", "prompt"}: a prompt row every draftforge reader
accepts. Rows are interleaved across categories (and, within a category, across families), so
any prefix of the file keeps the mix: a shorter demo can read only the first N rows.
"""

import argparse
import json
import math
import os
import random
import re
import string
import sys
from collections.abc import Iterable, Iterator, Mapping
from itertools import zip_longest
from pathlib import Path

ASSET = Path(__file__).resolve().parent / "assets" / "demo_prompts.json"

# Equal quotas keep every category at a tenth of the set; 520 x 10 is enough data for a
# 135M target's draft on CPU without making regeneration take all day.
TRAIN_PER_CATEGORY = 520
HELDOUT_PER_CATEGORY = 20

Vocabulary = tuple[str | tuple[str, ...], ...]


def _vocabulary_values(entry: list[str | list[str]] | dict[str, int]) -> Vocabulary:
    """One "vocab" entry of the asset as slot values: a range becomes its integers as text."""
    if isinstance(entry, dict):
        return tuple(str(n) for n in range(entry["from"], entry["to"] + 1))
    return tuple(value if isinstance(value, str) else tuple(value) for value in entry)


_ASSET_DATA = json.loads(ASSET.read_text(encoding="utf-8"))
VOCAB: dict[str, Vocabulary] = {
    name: _vocabulary_values(entry) for name, entry in _ASSET_DATA["vocab"].items()
}
TRAIN_FAMILIES: dict[str, dict[str, str]] = _ASSET_DATA["train_families"]
HELDOUT_FAMILIES: dict[str, dict[str, str]] = _ASSET_DATA["heldout_families"]
CATEGORIES: tuple[str, ...] = tuple(TRAIN_FAMILIES)

_FORMATTER = string.Formatter()
_REPEAT_SUFFIX = re.compile(r"_\d+$")


def _slots(template: str) -> list[str]:
    """The distinct slot names of a template, in order: "{book[0]}" gives "book"."""
    names: list[str] = []
    for _, field, _, _ in _FORMATTER.parse(template):
        if field is None:
            continue
        name = re.split(r"[.\[]", field, maxsplit=1)[0]
        if name not in names:
            names.append(name)
    return names


def _vocabulary(slot: str) -> str:
    """The vocabulary a slot draws from: `name_2` draws from `name`."""
    return _REPEAT_SUFFIX.sub("", slot)


def _normalise(prompt: str) -> str:
    """The form duplicates are detected in: case and spacing do not make a new prompt."""
    return " ".join(prompt.lower().split())


def _expand(template: str, rng: random.Random) -> Iterator[str]:
    """Every distinct filling of `template`, in random order, drawn lazily.

    Slots that share a vocabulary get different values, so "{name} ... {name_2}" never
    names the same person twice. Knowing how many fillings exist ends a small family as soon
    as it is used up; the large ones are never enumerated.
    """
    slots = _slots(template)
    groups: dict[str, list[str]] = {}
    for slot in slots:
        groups.setdefault(_vocabulary(slot), []).append(slot)
    capacity = math.prod(math.perm(len(VOCAB[v]), len(members)) for v, members in groups.items())
    seen: set[tuple[object, ...]] = set()
    while len(seen) < capacity:
        values: dict[str, object] = {}
        for vocabulary, members in groups.items():
            values.update(zip(members, rng.sample(VOCAB[vocabulary], len(members)), strict=True))
        key = tuple(values[slot] for slot in slots)
        if key not in seen:
            seen.add(key)
            yield template.format(**values)


def _collect(
    families: Mapping[str, str],
    category: str,
    quota: int,
    seed: str,
    id_prefix: str,
    taken: set[str],
) -> list[dict[str, str]]:
    """Up to `quota` prompts for one category, one family at a time in turn.

    Taking one prompt per family per round keeps families equally represented, and an
    exhausted family simply drops out. Each family has its own random stream, seeded by its
    name, so adding or editing one family leaves every other family's prompts unchanged.
    `taken` (normalised prompts) is shared and updated, which removes duplicates across
    families and categories.
    """
    streams = [
        (family, _expand(template, random.Random(f"{seed}:{category}/{family}")))
        for family, template in families.items()
    ]
    items: list[dict[str, str]] = []
    while streams and len(items) < quota:
        alive = []
        for family, stream in streams:
            if len(items) == quota:
                break
            prompt = next((p for p in stream if _normalise(p) not in taken), None)
            if prompt is None:
                continue
            taken.add(_normalise(prompt))
            items.append(
                {
                    "id": f"{id_prefix}{category}-{len(items)}",
                    "category": category,
                    "family": f"{category}/{family}",
                    "prompt": prompt,
                }
            )
            alive.append((family, stream))
        streams = alive
    return items


def _interleave(groups: Iterable[list[dict[str, str]]]) -> list[dict[str, str]]:
    """Round-robin across categories, so that every prefix of the set keeps the mix."""
    return [item for row in zip_longest(*groups) for item in row if item is not None]


def build_prompts(seed: int = 0) -> list[dict[str, str]]:
    """The training prompts: {"id", "category", "family", "prompt"} dicts, deterministic in `seed`."""
    taken: set[str] = set()
    return _interleave(
        _collect(TRAIN_FAMILIES[c], c, TRAIN_PER_CATEGORY, f"train:{seed}", "", taken)
        for c in CATEGORIES
    )


def build_heldout(seed: int = 0) -> list[dict[str, str]]:
    """The evaluation prompts, from families the training set never uses.

    Every prompt also differs from every training prompt of the same seed (after
    normalisation), so no evaluation request was seen verbatim during training.
    """
    taken = {_normalise(item["prompt"]) for item in build_prompts(seed)}
    return _interleave(
        _collect(HELDOUT_FAMILIES[c], c, HELDOUT_PER_CATEGORY, f"heldout:{seed}", "heldout-", taken)
        for c in CATEGORIES
    )


def write_jsonl(items: Iterable[Mapping[str, str]], path: str | os.PathLike[str]) -> Path:
    """Write one JSON object per line, atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m draftforge.demo_prompts",
        description="Write the demo's built-in prompts: OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl.",
    )
    parser.add_argument("out_dir", help="folder to write train.jsonl and heldout.jsonl into")
    parser.add_argument("--seed", type=int, default=0, help="picks the slot fillings (default 0)")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    for name, items in (
        ("train.jsonl", build_prompts(args.seed)),
        ("heldout.jsonl", build_heldout(args.seed)),
    ):
        path = write_jsonl(items, out / name)
        print(f"{path}: {len(items)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
