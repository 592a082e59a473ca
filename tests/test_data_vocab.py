"""Draft vocabulary: against a plain-Python reference, and its save/load round trip."""

import pytest
import torch

from draftforge.data import build_draft_vocab, load_draft_vocab, save_draft_vocab


def reference(ids, mask, target_vocab_size, draft_vocab_size):
    """Dict counting, sort by (-count, id), then by id: the rule written out by hand."""
    counts = {}
    for token, keep in zip(ids, mask, strict=True):
        if keep:
            counts[token] = counts.get(token, 0) + 1
    ranked = sorted(range(target_vocab_size), key=lambda t: (-counts.get(t, 0), t))
    chosen = sorted(ranked[:draft_vocab_size])
    total = sum(counts.values())
    coverage = sum(counts.get(t, 0) for t in chosen) / total if total else 0.0
    return [t - i for i, t in enumerate(chosen)], chosen, coverage


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    target_vocab, draft_vocab = 50, [5, 12, 40][seed % 3]
    # Few distinct values make ties likely; a narrow range leaves ids unseen.
    ids = torch.randint(0, [8, 30, 50][seed % 3], (300,), generator=g)
    mask = torch.rand(300, generator=g) < 0.6
    vocab = build_draft_vocab(
        ids, mask, target_vocab_size=target_vocab, draft_vocab_size=draft_vocab
    )
    d2t, chosen, coverage = reference(ids.tolist(), mask.tolist(), target_vocab, draft_vocab)
    assert vocab.d2t.dtype == torch.int64 and vocab.d2t.tolist() == d2t
    assert vocab.target_ids.tolist() == chosen
    assert vocab.t2d.dtype == torch.bool and vocab.t2d.nonzero().flatten().tolist() == chosen
    assert vocab.coverage == pytest.approx(coverage)


def test_ties_and_filling():
    ids = torch.tensor([9, 9, 7, 7, 3, 8, 8, 8])
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])  # token 8 is never supervised
    vocab = build_draft_vocab(ids, mask, target_vocab_size=10, draft_vocab_size=2)
    assert vocab.target_ids.tolist() == [7, 9]  # 7 and 9 tie on 2; 3 has 1
    assert vocab.coverage == pytest.approx(4 / 5)
    # More room than distinct tokens: the lowest unseen ids fill it.
    vocab = build_draft_vocab(ids, mask, target_vocab_size=10, draft_vocab_size=5)
    assert vocab.target_ids.tolist() == [0, 1, 3, 7, 9] and vocab.coverage == 1.0


def test_bad_sizes():
    ids, mask = torch.tensor([1, 2]), torch.tensor([True, True])
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_draft_vocab(ids, mask, target_vocab_size=4, draft_vocab_size=5)
    with pytest.raises(ValueError, match="target_vocab_size"):
        build_draft_vocab(ids, mask, target_vocab_size=2, draft_vocab_size=1)


def test_save_and_load(tmp_path):
    ids = torch.arange(100) % 17
    vocab = build_draft_vocab(ids, ids > 3, target_vocab_size=32, draft_vocab_size=8)
    save_draft_vocab(vocab, tmp_path / "vocab.safetensors")
    loaded = load_draft_vocab(tmp_path / "vocab.safetensors")
    assert torch.equal(loaded.d2t, vocab.d2t) and torch.equal(loaded.t2d, vocab.t2d)
    assert loaded.coverage == vocab.coverage
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.safetensors"]
