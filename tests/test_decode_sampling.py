"""Lossless verification, checked statistically on given distributions with 10^5+ draws.

The target is a table: p1 over the first token and p2[a] over the second given the first.
Whatever the draft proposes, the first two emitted tokens must be distributed as
p1(a) * p2[a](b). When the tree is rejected at the root, the second token comes from the next
round, whose first token is again distributed as the target's: here it is drawn from p2[a].
"""

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from draftforge.decode.errors import DecodeError
from draftforge.decode.sampling import (
    SamplingParams,
    children_table,
    greedy_walk,
    verify_tree,
    warp,
)
from draftforge.decode.tree import TreeShape, ancestor_mask, select_nodes
from draftforge.testing import chi_square_p

V = 8
DRAWS = 200_000


pytestmark = pytest.mark.usefixtures("one_thread")


def random_dist(gen: torch.Generator, *shape: int, zeros: int = 0) -> torch.Tensor:
    """Random distributions over V; ``zeros`` random entries per row get no mass."""
    logits = torch.randn(*shape, V, generator=gen, dtype=torch.float64) * 1.5
    if zeros:
        drop = torch.rand(*shape, V, generator=gen).argsort(-1)[..., :zeros]
        logits.scatter_(-1, drop, float("-inf"))
    return torch.softmax(logits, -1)


def emitted_pairs(verdict, tokens: torch.Tensor, p2: torch.Tensor, gen) -> torch.Tensor:
    """First two emitted tokens per trial: the accepted path, then the verdict's token, then
    (after a root rejection) the next round's first token drawn from p2[a]."""
    path_tokens = tokens.gather(1, verdict.path.clamp(min=0))
    first = torch.where(verdict.accepted >= 1, path_tokens[:, 0], verdict.token)
    next_round = torch.multinomial(p2[first], 1, generator=gen)[:, 0]
    second = torch.where(
        verdict.accepted >= 2,
        path_tokens[:, 1] if path_tokens.shape[1] > 1 else verdict.token,
        torch.where(verdict.accepted == 1, verdict.token, next_round),
    )
    return first * V + second


def test_chain_rejection_matches_target_and_min_overlap():
    gen = torch.Generator().manual_seed(1)
    p = random_dist(gen, 1)[0]
    q = random_dist(gen, 1, zeros=3)[0]  # the draft misses tokens the target can emit
    x = torch.multinomial(q, DRAWS, replacement=True, generator=gen)
    tokens = torch.stack([torch.zeros_like(x), x], 1)
    probs = torch.stack([p, random_dist(gen, 1)[0]])[None].expand(DRAWS, -1, -1)
    proposal = torch.stack([torch.zeros_like(q), q])[None].expand(DRAWS, -1, -1)
    verdict = verify_tree(probs, tokens, [-1, 0], proposal, greedy=False, generator=gen)
    first = torch.where(verdict.accepted == 1, x, verdict.token)
    assert chi_square_p(torch.bincount(first, minlength=V), p) > 1e-3
    rate = verdict.accepted.double().mean()
    expected = torch.minimum(p, q).sum()
    sigma = (expected * (1 - expected) / DRAWS).sqrt()
    assert abs(rate - expected) < 5 * sigma, (float(rate), float(expected))


def test_chain_two_tokens_lossless():
    gen = torch.Generator().manual_seed(2)
    p1, p2 = random_dist(gen, 1)[0], random_dist(gen, V)
    q1, q2 = random_dist(gen, 1, zeros=2)[0], random_dist(gen, V, zeros=2)
    p3 = random_dist(gen, V, V)  # the bonus distribution after two accepted tokens
    x1 = torch.multinomial(q1, DRAWS, replacement=True, generator=gen)
    x2 = torch.multinomial(q2[x1], 1, generator=gen)[:, 0]
    tokens = torch.stack([torch.zeros_like(x1), x1, x2], 1)
    probs = torch.stack([p1.expand(DRAWS, -1), p2[x1], p3[x1, x2]], 1)
    proposal = torch.stack([torch.zeros(DRAWS, V, dtype=q1.dtype), q1.expand(DRAWS, -1), q2[x1]], 1)
    verdict = verify_tree(probs, tokens, [-1, 0, 1], proposal, greedy=False, generator=gen)
    pairs = emitted_pairs(verdict, tokens, p2, gen)
    joint = p1[:, None] * p2
    assert chi_square_p(torch.bincount(pairs, minlength=V * V), joint) > 1e-3
    assert 0 < (verdict.accepted == 2).double().mean() < 1  # every branch was exercised


@pytest.mark.parametrize("topk", [1, 2, 3, 5])
def test_tree_sibling_rejection_lossless(topk):
    """Deterministic children (point-mass proposals): root children are the draft's top-k;
    the first child has top-k children of its own, the second one child."""
    gen = torch.Generator().manual_seed(10 + topk)
    p1, p2 = random_dist(gen, 1)[0], random_dist(gen, V)
    bonus = random_dist(gen, V, V)
    draft_order = torch.randperm(V, generator=gen)  # the draft's ranking of tokens
    parents, tokens = [-1], [0]
    for c in range(topk):
        parents.append(0)
        tokens.append(int(draft_order[c]))
    for g in range(topk):
        parents.append(1)
        tokens.append(int(draft_order[(g + 3) % V]))
    if topk > 1:
        parents.append(2)
        tokens.append(int(draft_order[0]))
    node_tokens = torch.tensor(tokens)
    probs = [p1]
    for node in range(1, len(tokens)):
        parent = parents[node]
        probs.append(p2[tokens[node]] if parent == 0 else bonus[tokens[parent], tokens[node]])
    probs = torch.stack(probs)[None].expand(DRAWS, -1, -1)
    batch_tokens = node_tokens[None].expand(DRAWS, -1)
    verdict = verify_tree(probs, batch_tokens, parents, None, greedy=False, generator=gen)
    pairs = emitted_pairs(verdict, batch_tokens, p2, gen)
    joint = p1[:, None] * p2
    assert chi_square_p(torch.bincount(pairs, minlength=V * V), joint) > 1e-3
    # Rejecting a child removes its token from the residual: a rejected token is never
    # emitted as the correction at the same node.
    first = torch.where(verdict.accepted >= 1, batch_tokens[:, 1], verdict.token)
    rejected_at_root = verdict.accepted == 0
    assert not torch.isin(first[rejected_at_root], node_tokens[1 : 1 + topk]).any()


def test_greedy_walk_follows_the_argmax():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 6, V, generator=gen)
    p = warp(logits, SamplingParams())
    argmax = logits.argmax(-1)[0].tolist()
    # root -> {1, 2}; 1 -> {3}; 2 -> {4, 5}. Node 2 carries the root's argmax, node 4 node 2's.
    parents = [-1, 0, 0, 1, 2, 2]
    wrong = [(a + 1) % V for a in argmax]
    tokens = torch.tensor([[0, wrong[0], argmax[0], 0, argmax[2], wrong[2]]])
    verdict = verify_tree(p, tokens, parents, None, greedy=True, generator=gen)
    assert verdict.path[0].tolist() == [2, 4]
    assert int(verdict.token[0]) == argmax[4]
    assert greedy_walk(argmax, tokens[0].tolist(), parents) == ([2, 4], argmax[4])


def test_greedy_walk_is_the_tree_walk_at_temperature_0():
    """The engine's list walk equals verify_tree on one-hot targets: random trees (chains,
    bushes, single roots), tokens drawn from a vocabulary of 3 so that siblings repeat tokens
    and match often, logits with ties (the first argmax wins in both)."""
    gen = torch.Generator().manual_seed(11)
    for _ in range(300):
        size = int(torch.randint(1, 9, (1,), generator=gen))
        parents = [-1] + [
            int(torch.randint(0, node, (1,), generator=gen)) for node in range(1, size)
        ]
        logits = torch.randint(0, 3, (1, size, 3), generator=gen).float()  # ties are common
        tokens = torch.randint(0, 3, (1, size), generator=gen)
        verdict = verify_tree(warp(logits, SamplingParams()), tokens, parents, None, True, gen)
        path, token = greedy_walk(logits[0].argmax(-1).tolist(), tokens[0].tolist(), parents)
        assert path == verdict.path[0, : int(verdict.accepted[0])].tolist()
        assert token == int(verdict.token[0])


def test_warp_matches_transformers_processors():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6)]:
        processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1:
            processors.append(TopPLogitsWarper(top_p))
        expected = torch.softmax(processors(None, logits.clone()), -1)
        got = warp(logits, SamplingParams(temperature, top_p, top_k))
        torch.testing.assert_close(got, expected)
    greedy = warp(logits, SamplingParams())
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.all(greedy.sum(-1) == 1)


def test_tree_helpers():
    assert children_table([-1, 0, 0, 1]).tolist() == [[1, 2], [3, -1], [-1, -1], [-1, -1]]
    assert ancestor_mask([-1, 0, 0, 1]).int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 1, 0, 1],
    ]
    # Scores never increase down a path; ties keep the shallower node, so parents stay in.
    scores = torch.tensor([-0.1, -0.5, -0.1, -0.2, -0.9])
    depths = torch.tensor([1, 1, 2, 2, 2])
    assert select_nodes(scores, depths, 3).tolist() == [0, 2, 3]
    with pytest.raises(DecodeError, match="parents must precede"):
        children_table([-1, 2, 0])


def test_shape_and_sampling_settings_are_checked():
    assert TreeShape(3, 1).draft_tokens == 4
    assert TreeShape(3, 4).candidates == 4 + 2 * 16
    assert TreeShape(0).drafting is False
    with pytest.raises(DecodeError, match="chain"):
        TreeShape(3, 1, 8)
    with pytest.raises(DecodeError, match=r"num_draft_tokens 40 must be in 1\.\.37"):
        TreeShape(3, 4, 40)
    with pytest.raises(DecodeError, match="top_p"):
        SamplingParams(1.0, top_p=0.0)
