"""`draftforge prepare`: read, template, mask, tokenise and cache a dataset, then build the
draft vocabulary from it."""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftforge.data.cache import TokenizedDataset, prepare_dataset
from draftforge.data.report import DamagedFile, DataError, DataReport
from draftforge.data.template import load_template
from draftforge.data.vocab import DraftVocab, build_draft_vocab, load_draft_vocab, save_draft_vocab
from draftforge.target import load_tokenizer


@dataclass
class PrepareResult:
    dataset: TokenizedDataset
    vocab: DraftVocab
    vocab_path: Path

    def summary(self) -> str:
        stats = self.dataset.stats
        tokens, supervised = stats["tokens"], stats["supervised_tokens"]
        share = supervised / tokens if tokens else 0.0
        return "\n".join(
            [
                f"dataset cache: {self.dataset.path}",
                *self.dataset.report.lines(),
                f"tokens: {tokens}, supervised: {supervised} ({share:.1%}), "
                f"rows cut at max_length: {stats['rows_truncated']}",
                f"draft vocab: {len(self.vocab.d2t)} of {len(self.vocab.t2d)} target tokens, "
                f"coverage {self.vocab.coverage:.2%} ({self.vocab_path})",
            ]
        )


def _nothing_usable(name: str, report: DataReport) -> str:
    """Why no row of `name` could be used, and what to do: a one-line error message."""
    if not report.rows_read:
        return (
            f"{name}: no usable conversations: 0 rows read; point data.path at a file or "
            "folder that holds conversations"
        )
    reasons = report.skipped.most_common()
    counts = ", ".join(f"{count} {reason}" for reason, count in reasons)
    return (
        f"{name}: no usable conversations: all {report.rows_read} rows were dropped "
        f"({counts}; e.g. {report.examples[reasons[0][0]][0]}); fix the rows, or the settings "
        "that reject them (data.format, data.max_length, data.chat_template)"
    )


def prepare(
    path: str | Path,
    *,
    split: str = "train",
    fmt: str = "auto",
    tokenizer: str | Path | Any,
    max_length: int = 2048,
    last_turn_only: bool = False,
    supervise_empty_think: bool = False,
    chat_template: str | Path | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    strict: bool = False,
    draft_vocab_size: int = 32000,
    target_vocab_size: int | None = None,
    progress: bool = True,
    progress_interval_s: float = 30.0,
) -> PrepareResult:
    """Tokenised dataset (cached) and its draft vocabulary (saved beside the cache entry).

    `chat_template` overrides the tokenizer's template: jinja text or a path to a file;
    `chat_template_kwargs` are variables for it (`enable_thinking`, ...).
    `target_vocab_size` is the length of `t2d`; pass the target model's `vocab_size` when
    its embedding is larger than the tokenizer (default: `len(tokenizer)`).
    Raises `DataError` when no row is left to train on.
    """
    tok = load_tokenizer(tokenizer)
    dataset = prepare_dataset(
        path,
        tok,
        split=split,
        fmt=fmt,
        max_length=max_length,
        last_turn_only=last_turn_only,
        supervise_empty_think=supervise_empty_think,
        chat_template=load_template(chat_template),
        chat_template_kwargs=chat_template_kwargs,
        cache_dir=cache_dir,
        num_workers=num_workers,
        strict=strict,
        progress=progress,
        progress_interval_s=progress_interval_s,
    )
    if not len(dataset):
        raise DataError(_nothing_usable(str(path), dataset.report))
    target_vocab_size = target_vocab_size or len(tok)
    vocab_path = dataset.path / f"draft_vocab_{draft_vocab_size}_of_{target_vocab_size}.safetensors"
    try:
        return PrepareResult(dataset, load_draft_vocab(vocab_path), vocab_path)
    except FileNotFoundError:
        pass
    except DamagedFile as err:
        print(f"dataset cache: {err}; building it again", flush=True)
    vocab = build_draft_vocab(
        dataset.input_ids,
        dataset.loss_mask,
        target_vocab_size=target_vocab_size,
        draft_vocab_size=draft_vocab_size,
    )
    save_draft_vocab(vocab, vocab_path)
    return PrepareResult(dataset, vocab, vocab_path)
