"""Batched target forwards: length buckets of ``target.batch_tokens`` padded tokens give each
sample the features of its forward alone, on dense, MoE, latent-attention and sliding-window
families; online features and capture shards do not depend on the batching."""

import pytest
import torch

from draftforge.config import ConfigError, load_config
from draftforge.features import batched_features, collate, forward_groups, online_features
from draftforge.offline import shard_rows
from draftforge.target import Target
from draftforge.testing import tiny_target, tiny_tokenizer

# The tolerance of tests/test_target.py's padded-capture test: kernels of other shapes round
# differently, nothing more.
TOL = {"rtol": 1e-5, "atol": 1e-5}
# Uneven lengths, one longer than Gemma-3's and gpt-oss's 64-token sliding window, one of 1.
LENGTHS = [37, 5, 120, 64, 1, 90, 64, 12]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models on two shared cores run fastest, and steadiest, on one thread."""


def _target(family: str, **overrides) -> Target:
    return Target(tiny_target(family, **overrides), tiny_tokenizer(), [0, 1, 2], family)


def _samples(lengths: list[int]) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (n,)) for n in lengths]


def test_groups_cover_every_sample_once_within_the_budget():
    gen = torch.Generator().manual_seed(0)
    for count in (1, 2, 7, 50):
        lengths = torch.randint(1, 200, (count,), generator=gen).tolist()
        for budget in (1, 64, 199, 200, 512, 10_000):
            groups = forward_groups(lengths, budget)
            assert sorted(i for g in groups for i in g) == list(range(count))
            for g in groups:
                width = max(lengths[i] for i in g)
                assert lengths[g[0]] == width  # the first sample sets the padded width
                assert len(g) == 1 or len(g) * width <= budget
            # Greedy over the lengths in descending order: a group ends only when the next
            # sample would overflow it.
            order = [i for g in groups for i in g]
            assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
            for g in groups[:-1]:
                assert (len(g) + 1) * lengths[g[0]] > budget


def test_groups_edge_cases():
    assert forward_groups([], 100) == []
    assert forward_groups([30], 10) == [[0]]  # longer than the budget: alone
    assert forward_groups([30, 5, 5], 10) == [[0], [1, 2]]
    assert forward_groups([4, 4, 4], 1) == [[0], [1], [2]]  # budget 1: one sample a forward
    assert forward_groups([3, 9, 3, 9], 18) == [[1, 3], [0, 2]]  # ties keep their order


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("qwen2", {}),
        ("qwen3_moe", {}),
        ("deepseek_v3", {}),
        ("gpt_oss", {}),
        ("gemma3", {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    ],
)
def test_batched_features_equal_one_sample_forwards(family, overrides):
    target = _target(family, **overrides)
    samples = _samples(LENGTHS)
    alone = [target.features(s[None]) for s in samples]
    for budget in (1, 128, 300, 100_000):  # alone, pairs, mixed, everything in one forward
        batched = batched_features(target, samples, budget)
        assert len(batched) == len(samples)
        for (aux, last), (aux_1, last_1), s in zip(batched, alone, samples, strict=True):
            assert aux.shape == (len(s), 3 * target.hidden_size)
            torch.testing.assert_close(aux, aux_1[0], **TOL)
            torch.testing.assert_close(last, last_1[0], **TOL)


def test_batched_features_of_nothing_and_of_one_sample():
    target = _target("llama")
    assert batched_features(target, [], 100) == []
    (sample,) = _samples([17])
    [(aux, last)] = batched_features(target, [sample], 100)
    aux_1, last_1 = target.features(sample[None])
    assert torch.equal(aux, aux_1[0]) and torch.equal(last, last_1[0])  # the same forward


def test_online_features_do_not_depend_on_the_batching():
    target = _target("qwen3_moe")
    dataset = [
        {"input_ids": s, "loss_mask": torch.ones(len(s), dtype=torch.bool)}
        for s in _samples(LENGTHS)
    ]
    batch = collate(dataset, list(range(len(dataset))), 1024)
    draft_ids = torch.arange(0, 320, 2)
    alone = online_features(target, batch, draft_ids, 64, 1)
    batched = online_features(target, batch, draft_ids, 64, 256)
    assert alone.aux.shape == batched.aux.shape == (1, sum(LENGTHS), 3 * target.hidden_size)
    torch.testing.assert_close(batched.aux, alone.aux, **TOL)
    torch.testing.assert_close(batched.teacher_probs, alone.teacher_probs, **TOL)


def test_shard_split_is_the_per_sample_rule():
    """Shards close where the one-sample capture closed them: after the sample that brings
    the shard's bytes to ``shard_bytes``."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 50, (40,), generator=gen).tolist()
    for shard_bytes in (1, 100, 1_000, 5_000, 10**9):
        expected: list[list[int]] = []
        pending: list[int] = []
        for row in range(5, 40):
            pending.append(row)
            if sum(lengths[r] for r in pending) * 10 >= shard_bytes:
                expected.append(pending)
                pending = []
        expected += [pending] if pending else []
        assert shard_rows(range(5, 40), lengths, 10, shard_bytes) == expected
    assert shard_rows(range(0), lengths, 10, 100) == []


def test_batch_tokens_is_validated():
    cfg = load_config(None, ["target.path=x", "target.batch_tokens=0"])
    with pytest.raises(ConfigError, match=r"target\.batch_tokens must be >= 1"):
        cfg.validate()
