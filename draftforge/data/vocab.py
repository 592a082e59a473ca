"""The draft vocabulary: the most frequent supervised target tokens.

Layout (the EAGLE-3 convention that SGLang and vLLM load): draft ids 0..D-1 map to target
ids sorted ascending, `target_id = i + d2t[i]`, and `t2d` marks the target ids that have a
draft id.

A saved vocabulary records, in its safetensors metadata, the sha256 of its content (each
tensor's dtype, shape and bytes, and the coverage); loading checks it, so a damaged file
is a `DamagedFile` instead of a wrong vocabulary.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from draftforge.data.report import DamagedFile


@dataclass(frozen=True)
class DraftVocab:
    d2t: torch.Tensor  # int64 [draft_vocab]: target_id = i + d2t[i]
    t2d: torch.Tensor  # bool [target_vocab]
    coverage: float  # share of the counted supervised tokens that are in the draft vocabulary

    @property
    def target_ids(self) -> torch.Tensor:
        """int64 [draft_vocab]: the target id of each draft id, ascending."""
        return torch.arange(len(self.d2t), dtype=torch.int64) + self.d2t


def count_supervised(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, target_vocab_size: int
) -> torch.Tensor:
    """int64 [target_vocab]: how often each token id is a supervised token."""
    ids = input_ids if input_ids.dtype in (torch.int32, torch.int64) else input_ids.long()
    if ids.numel() and int(ids.max()) >= target_vocab_size:
        raise ValueError(f"token id {int(ids.max())} >= target_vocab_size {target_vocab_size}")
    # Unsupervised positions land in one extra bin that is dropped: cheaper than
    # compacting the supervised ids out of a 10M-token array first.
    binned = torch.where(loss_mask.bool(), ids, target_vocab_size)
    return torch.bincount(binned, minlength=target_vocab_size + 1)[:target_vocab_size]


def draft_vocab_from_counts(counts: torch.Tensor, draft_vocab_size: int) -> DraftVocab:
    """The `draft_vocab_size` most frequent ids of `counts` (ties: lower id first).

    When fewer ids were seen, the lowest unseen ids fill the rest, so the size is exact.
    """
    target_vocab_size = len(counts)
    if not 0 < draft_vocab_size <= target_vocab_size:
        raise ValueError(
            f"draft_vocab_size must be in [1, {target_vocab_size}] (the target vocabulary), "
            f"got {draft_vocab_size}"
        )
    # A stable sort keeps equal counts in ascending id order: ties go to the lower id, and
    # the unseen ids (count 0) that fill a short vocabulary come lowest id first.
    order = torch.sort(counts, descending=True, stable=True).indices
    chosen = order[:draft_vocab_size].sort().values
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[chosen] = True
    total = int(counts.sum())
    coverage = int(counts[chosen].sum()) / total if total else 0.0
    d2t = chosen - torch.arange(draft_vocab_size, dtype=torch.int64)
    return DraftVocab(d2t=d2t, t2d=t2d, coverage=coverage)


def build_draft_vocab(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    target_vocab_size: int,
    draft_vocab_size: int,
) -> DraftVocab:
    """Draft vocabulary from flat token ids and their loss mask (any integer/bool dtypes)."""
    counts = count_supervised(input_ids, loss_mask, target_vocab_size)
    return draft_vocab_from_counts(counts, draft_vocab_size)


def _content_sha256(d2t: torch.Tensor, t2d: torch.Tensor, coverage: str) -> str:
    """sha256 of what a vocabulary file holds: each tensor's dtype, shape and bytes, and
    the coverage text; independent of how safetensors lays the file out."""
    digest = hashlib.sha256(coverage.encode())
    for tensor in (d2t, t2d):
        digest.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_draft_vocab(vocab: DraftVocab, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    coverage = repr(vocab.coverage)
    save_file(
        {"d2t": vocab.d2t.contiguous(), "t2d": vocab.t2d.contiguous()},
        str(tmp),
        metadata={"coverage": coverage, "sha256": _content_sha256(vocab.d2t, vocab.t2d, coverage)},
    )
    tmp.replace(path)  # atomic: readers never see a half-written file


def load_draft_vocab(path: str | Path) -> DraftVocab:
    """The vocabulary saved at `path`; `DamagedFile` when the file cannot be read or its
    content differs from the sha256 it records (`FileNotFoundError` when it is missing)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types on damaged files
        raise DamagedFile(f"{path} is damaged (not a readable safetensors file)") from err
    if "sha256" not in metadata:
        raise DamagedFile(f"{path} records no sha256 (an earlier draftforge wrote it)")
    coverage = metadata.get("coverage", "")
    if _content_sha256(d2t, t2d, coverage) != metadata["sha256"]:
        raise DamagedFile(f"{path} is damaged (its content differs from the sha256 it records)")
    return DraftVocab(d2t=d2t, t2d=t2d, coverage=float(coverage))
