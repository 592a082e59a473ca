"""The speculative engine on tiny targets, on both target paths (lean and transformers'):
greedy output identical to the target's own, draft KV path identical to the training unroll,
losslessness end to end, bad inputs. float64 targets keep greedy comparisons free of rounding;
float32 ones (with large logit margins) exercise the prepacked oneDNN matmuls."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from draftforge import checkpoint, ttt
from draftforge.config import Config, dump_config
from draftforge.decode import skinny
from draftforge.decode.drafter import Drafter
from draftforge.decode.engine import SpecEngine
from draftforge.decode.errors import DecodeError
from draftforge.decode.fastlinear import fast_matmul
from draftforge.decode.sampling import SamplingParams, warp
from draftforge.decode.tree import TreeShape
from draftforge.drafts import load_draft_for
from draftforge.models import build_draft
from draftforge.models.eagle3 import DraftShapeError
from draftforge.testing import (
    as_target,
    bigram_like_target,
    chi_square_p,
    oracle_draft,
    tiny_target,
)
from draftforge.ttt_attention import ttt_attention

NEW_TOKENS = 200
PROMPT_LEN = 16
HALF = skinny.usable(torch.float16, torch.device("cpu"))  # the lean draft's float16 matrices


pytestmark = pytest.mark.usefixtures("one_thread")


def random_draft(target, seed: int, draft_vocab: int = 300):
    """An untrained draft over a random subset of the target vocab (exercises d2t)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(target.vocab_size, generator=gen)[:draft_vocab].sort().values
    torch.manual_seed(seed)
    draft = build_draft("eagle3", target.config, target.aux_layers, draft_vocab)
    draft.load_target_embedding(target.embed_weight())
    draft.set_vocab(ids)
    return draft.to(target.model.dtype).eval()


def vocab_subset(target, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(target.vocab_size, generator=gen)[:size].sort().values


def prompts(count: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(
        0, vocab, (count, PROMPT_LEN), generator=torch.Generator().manual_seed(seed)
    )


def greedy_reference(target, ids: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """The target's own greedy continuation of equal-length prompts, batched."""
    out = target.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :].tolist()


# name -> (target builder, draft builder, shapes cycled over the prompts, prompt count):
# 24 distinct prompts in all, each decoded for 200 tokens.
CASES = {
    "llama-oracle": (
        lambda: as_target(bigram_like_target("llama", seed=1)),
        lambda t: oracle_draft(t, vocab_subset(t, 300, 0)),
        [
            TreeShape(4, 1),
            TreeShape(3, 2, 6),
            TreeShape(4, 3, 10),
            TreeShape(5, 4, 12),
            TreeShape(4, 3, 10, min_prob=0.3),
        ],
        10,
    ),
    "qwen2-oracle": (
        lambda: as_target(bigram_like_target("qwen2", seed=2)),
        lambda t: oracle_draft(t),
        [
            TreeShape(3, 1),
            TreeShape(3, 2, 4),
            TreeShape(4, 3, 8),
            TreeShape(2, 3, 7),
            TreeShape(4, 1, min_prob=0.4),
        ],
        10,
    ),
    "qwen3-oracle-fp32": (
        lambda: as_target(bigram_like_target("qwen3", seed=8, dtype=torch.float32)),
        lambda t: oracle_draft(t),
        [TreeShape(3, 1), TreeShape(4, 3, 10)],
        4,
    ),
    "llama-random": (
        lambda: as_target(bigram_like_target("llama", seed=3, embed_scale=1, head_scale=1)),
        lambda t: random_draft(t, seed=3),
        [TreeShape(3, 1), TreeShape(3, 2, 6)],
        3,
    ),
}


def spy_compactions(engine: SpecEngine) -> list[list[int]]:
    """Record the ``keep`` index of every cache compaction of ``engine``'s target path."""
    compactions: list[list[int]] = []
    real = engine.path.compact

    def spy(start, keep):
        compactions.append(keep.tolist())
        real(start, keep)

    engine.path.compact = spy
    return compactions


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "hf"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_output_is_the_targets_own(case, lean):
    make_target, make_draft, shapes, count = CASES[case]
    target = make_target()
    draft = make_draft(target)
    ids = prompts(count, seed=sorted(CASES).index(case), vocab=target.vocab_size)
    expected = greedy_reference(target, ids, NEW_TOKENS)
    compactions: list[list[int]] = []
    lengths = []
    for i in range(count):
        shape = shapes[i % len(shapes)]
        engine = SpecEngine(target, draft, shape, lean=lean)
        assert engine.path.name == ("lean" if lean else "hf")
        if lean and target.dtype == torch.float32:
            assert engine.path.matmul == fast_matmul(torch.float32, torch.device("cpu"))
        seen = spy_compactions(engine)
        gen = engine.generate(ids[i], NEW_TOKENS, stop_ids=())
        assert seen, "the spy saw no compaction"
        compactions += seen
        assert gen.tokens == expected[i], f"{case} prompt {i} {shape}"
        assert gen.stop == "length" and len(gen.tokens) == NEW_TOKENS
        lengths.append(gen.acceptance_length)
    mean_al = sum(lengths) / len(lengths)
    if case.endswith("random"):
        assert mean_al < 1.2, lengths  # an untrained draft is (almost) always rejected
    else:
        assert mean_al > 2.0, lengths
        assert max(len(k) for k in compactions) >= 4  # long accepted paths
        # A sibling other than the first was accepted: the cache rows had to be moved.
        assert any(k != list(range(len(k))) for k in compactions)


@pytest.mark.parametrize(
    ("lean", "dtype", "half"),
    [
        (True, torch.float64, False),
        (True, torch.float32, False),
        (False, torch.float64, False),
        (False, torch.float32, False),
        pytest.param(
            True,
            torch.float32,
            True,
            marks=pytest.mark.skipif(not HALF, reason="no float16 kernel here"),
        ),
    ],
)
def test_draft_cache_path_equals_the_training_unroll(lean, dtype, half):
    """Extend + tree steps with a KV cache give the hidden states TTT trains (alignment,
    RoPE positions t + k, the diagonal), starting from a cache small enough to grow. A
    ``half`` drafter gives those of the same draft with its matrices rounded to float16."""
    model = bigram_like_target("llama", seed=4, embed_scale=1, head_scale=1, dtype=dtype)
    target = as_target(model)
    served = random_draft(target, seed=4)
    draft = copy.deepcopy(served)  # the reference
    if half:
        with torch.no_grad():
            for linear in (m for m in draft.modules() if isinstance(m, nn.Linear)):
                linear.weight.copy_(linear.weight.half())
    steps, committed = 3, 10
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, target.vocab_size, (1, committed + steps + 1), generator=gen)
    aux, _ = target.features(ids)
    positions = torch.arange(ids.shape[1])[None]

    keys, values = [], []

    def ttt_attend(q, k, v):
        keys.append(k)
        values.append(v)
        return ttt_attention(q, keys[0], values[0], keys[1:], values[1:])

    with torch.no_grad():
        hidden = draft.fc(aux)
        expected = []
        for k in range(steps):
            hidden = draft.step(hidden, ttt.shift_left(ids, 1 + k), positions + k, ttt_attend)
            expected.append(hidden[0, committed - 1])

    drafter = Drafter(served, lean=lean, capacity=4, half=half)
    assert (drafter.weights is not None and drafter.weights.qkv.half) == half
    got = [drafter.extend(aux[0, :committed], ids[0, 1 : committed + 1], 0)]
    for k in range(1, steps):
        seen = torch.ones(1, k - 1, dtype=torch.bool)
        out = drafter.tree_step(got[-1][None], ids[0, committed + k][None], committed - 1 + k, seen)
        got.append(out[0])
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for k in range(steps):
        torch.testing.assert_close(got[k], expected[k], **tol)
    torch.testing.assert_close(drafter.logits(got[-1][None]), draft.logits(got[-1][None]), **tol)


@pytest.mark.parametrize(
    ("shape", "sampling", "lean", "dtype"),
    [
        (TreeShape(2, 1), SamplingParams(temperature=1.0), True, torch.float64),
        (TreeShape(2, 1), SamplingParams(temperature=1.0), False, torch.float64),
        (TreeShape(2, 2, 4), SamplingParams(0.8, top_p=0.9), True, torch.float64),
        (TreeShape(2, 2, 4), SamplingParams(0.8, top_p=0.9), False, torch.float64),
        (TreeShape(2, 1), SamplingParams(temperature=1.0), True, torch.float32),
        (TreeShape(2, 2, 4), SamplingParams(0.8, top_p=0.9), True, torch.float32),
        (TreeShape(2, 1, min_prob=0.3), SamplingParams(temperature=1.0), True, torch.float64),
        (TreeShape(2, 2, 4, min_prob=0.3), SamplingParams(temperature=1.0), True, torch.float64),
    ],
)
def test_sampling_end_to_end_matches_target_distribution(shape, sampling, lean, dtype):
    """The second token (the first one verification emits) over many runs, against the exact
    distribution sum_a p(a | prompt) p(b | prompt, a) computed from the target."""
    model = tiny_target("llama", seed=5, vocab_size=8).to(dtype)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # a few likely tokens: drafts get accepted and rejected
    target = as_target(model)
    draft = random_draft(target, seed=5, draft_vocab=6)  # two target tokens it can never propose
    prompt = torch.tensor([[1, 5, 2, 7, 3]])
    with torch.no_grad():
        first = warp(model(prompt).logits[0, -1], sampling)
        both = torch.cat([prompt.expand(8, -1), torch.arange(8)[:, None]], 1)
        second = warp(model(both).logits[:, -1], sampling)
    exact = (first[:, None] * second).sum(0)
    engine = SpecEngine(target, draft, shape, sampling, seed=0, lean=lean)
    runs = 300
    counts = torch.zeros(8)
    accepted = drafted = 0
    for _ in range(runs):
        gen = engine.generate(prompt[0], 2, stop_ids=())
        counts[gen.tokens[1]] += 1
        accepted += gen.accepts[0] if gen.accepts else 0
        drafted += gen.drafted
    assert chi_square_p(counts, exact) > 1e-3, (counts, exact * runs)
    assert 0 < accepted < runs  # both acceptance and rejection happened
    if shape.min_prob:  # the floor held some drafts back and let others through
        assert 0 < drafted < runs * (shape.draft_tokens - 1)


def test_stops_at_eos_and_at_the_position_limit():
    target = as_target(bigram_like_target("llama", seed=6))
    draft = oracle_draft(target)
    ids = prompts(1, seed=6, vocab=target.vocab_size)[0]
    full = SpecEngine(target, draft, TreeShape(3, 2, 6)).generate(ids, 40, stop_ids=())
    stop = full.tokens[0]
    at_once = SpecEngine(target, draft, TreeShape(3, 2, 6)).generate(ids, 40, stop_ids={stop})
    assert at_once.tokens == [stop] and at_once.stop == "eos" and at_once.rounds == 0
    assert at_once.acceptance_length is None
    later = full.tokens[5]
    cut = SpecEngine(target, draft, TreeShape(3, 2, 6)).generate(ids, 40, stop_ids={later})
    assert cut.tokens == full.tokens[: full.tokens.index(later) + 1]

    # 505 prompt tokens + 7 new ones fill the 512 positions; drafting shrinks to fit.
    limit = target.config.max_position_embeddings
    long_ids = torch.randint(0, 300, (1, limit - 7), generator=torch.Generator().manual_seed(0))
    gen = SpecEngine(target, draft, TreeShape(4, 2, 6)).generate(long_ids[0], 50, stop_ids=())
    assert gen.stop == "max_positions" and len(gen.tokens) == 7
    assert gen.tokens == greedy_reference(target, long_ids, 7)[0]


def test_an_engine_switched_to_a_shape_decodes_as_one_built_with_it():
    """``use_shape`` (one engine for a whole sweep): after decoding with other shapes, the
    switched engine emits, rounds and counts exactly what a fresh engine of that shape does,
    greedy and sampled from the same seed; it refuses what it cannot draft."""
    target = as_target(bigram_like_target("llama", seed=4))
    draft = random_draft(target, seed=4)
    ids = prompts(1, seed=4, vocab=target.vocab_size)[0]
    sampled = SamplingParams(temperature=0.9)
    for sampling in (SamplingParams(), sampled):
        switched = SpecEngine(target, draft, TreeShape(4, 3, 10), sampling, seed=1)
        switched.generate(ids, 30, stop_ids=())
        for shape in (TreeShape(2, 1), TreeShape(3, 2, 5), TreeShape(1, 1)):
            switched.use_shape(shape)
            switched.generator.manual_seed(1)
            got = switched.generate(ids, 40, stop_ids=())
            want = SpecEngine(target, draft, shape, sampling, seed=1).generate(ids, 40, stop_ids=())
            assert (got.tokens, got.rounds, got.attempts, got.accepts) == (
                want.tokens,
                want.rounds,
                want.attempts,
                want.accepts,
            )
    with pytest.raises(DecodeError, match="exceeds the draft vocabulary"):
        switched.use_shape(TreeShape(2, 301))
    with pytest.raises(DecodeError, match="built with a draft"):
        switched.use_shape(TreeShape(0))
    with pytest.raises(DecodeError, match="built with a draft"):
        SpecEngine(target).use_shape(TreeShape(2, 1))


def test_refuses_bad_prompts():
    target = as_target(bigram_like_target("llama", seed=7))
    engine = SpecEngine(target, oracle_draft(target))
    with pytest.raises(DecodeError, match="empty"):
        engine.generate([], 8)
    with pytest.raises(DecodeError, match="512 positions"):
        engine.generate(list(range(512)), 8)


def test_refuses_drafts_that_do_not_fit_the_target(tmp_path):
    target = as_target(tiny_target("llama", seed=0))
    narrow = as_target(tiny_target("llama", seed=0, hidden_size=32, intermediate_size=64))
    small_vocab = as_target(tiny_target("llama", seed=0, vocab_size=300))
    deep = as_target(tiny_target("llama", seed=0, num_hidden_layers=8), aux_layers=[1, 3, 6])
    with pytest.raises(DraftShapeError, match="hidden_size 32 != target hidden_size 64"):
        SpecEngine(target, random_draft(narrow, seed=0))
    with pytest.raises(DraftShapeError, match="vocab_size 300 != target vocab 320"):
        SpecEngine(target, random_draft(small_vocab, seed=0, draft_vocab=200))
    with pytest.raises(
        DraftShapeError, match=r"aux layers \[1, 3, 6\]: \[6\] outside the target's 4 layers"
    ):
        SpecEngine(target, random_draft(deep, seed=0))

    # The same check guards loading a training checkpoint, before any weight is assembled.
    draft = random_draft(narrow, seed=0)
    weights = {k: v for k, v in draft.state_dict().items() if not k.startswith("embed_tokens.")}
    extra = {
        "config.yaml": dump_config(Config()),
        "draft_config.json": draft.config.to_json_string(),
    }
    step = checkpoint.save_checkpoint(tmp_path / "checkpoints", 5, weights, {}, extra)
    with pytest.raises(DraftShapeError, match="hidden_size 32"):
        load_draft_for(step, target)


def _path_of(node: int, tokens: list[int], parents: list[int]) -> tuple[int, ...]:
    """A tree node named by its tokens from the root down (siblings differ in token)."""
    path: list[int] = []
    while node > 0:
        path.append(tokens[node])
        node = parents[node]
    return tuple(reversed(path))


@pytest.mark.parametrize("shape", [TreeShape(4, 1), TreeShape(4, 3, 10)], ids=["chain", "tree"])
def test_min_prob_drafts_the_nodes_whose_draft_probability_reaches_it(shape):
    """Every round, the engine drafts the whole shape too (min_prob 0, same state) and the
    probability of each of its nodes is worked out: the product along its path of the draft's
    softmax (chains: the top probability of each level's logits; trees: the candidates' scores
    as drafted). The round's tree must be exactly the whole tree's nodes that reach min_prob."""
    target = as_target(bigram_like_target("llama", seed=1))
    draft = oracle_draft(target, vocab_subset(target, 300, 0))
    floor = 0.3
    engine = SpecEngine(target, draft, dataclasses.replace(shape, min_prob=floor))
    cut_shape, drafted = engine.shape, []
    real_tree, real_logits, real_assemble = (
        engine._draft_tree,
        engine.drafter.logits,
        engine._assemble,
    )
    level_probs: list[float] = []
    candidates: dict[tuple[int, ...], float] = {}

    def logits(hidden):
        out = real_logits(hidden)
        level_probs.append(float(out.double().softmax(-1).max()))
        return out

    def assemble(root, tokens, scores, passed, parents, depths, proposals):
        parent_of = torch.cat(parents).tolist()
        for c in range(tokens.numel()):  # every candidate's path, from its ancestors' tokens
            path, node = [], c
            while node >= 0:
                path.append(int(tokens[node]))
                node = parent_of[node]
            candidates[tuple(reversed(path))] = float(scores[c].exp())
        return real_assemble(root, tokens, scores, passed, parents, depths, proposals)

    def spy(hidden, root, base, depth):
        level_probs.clear()
        candidates.clear()
        engine.shape = shape
        whole = real_tree(hidden, root, base, depth)
        engine.shape = cut_shape
        got = real_tree(hidden, root, base, depth)
        nodes = [_path_of(i, whole.tokens, whole.parents) for i in range(1, len(whole.tokens))]
        if shape.topk == 1:
            cumulative = torch.tensor(level_probs[: len(nodes)]).cumprod(0).tolist()
            want = {n for n, p in zip(nodes, cumulative, strict=True) if p >= floor}
        else:
            want = {n for n in nodes if candidates[n] >= floor}
        have = {_path_of(i, got.tokens, got.parents) for i in range(1, len(got.tokens))}
        assert have == want
        drafted.append(len(have))
        return got

    engine._draft_tree = spy
    engine.drafter.logits = logits
    engine._assemble = assemble
    ids = prompts(2, seed=11, vocab=target.vocab_size)
    for prompt in ids:
        gen = engine.generate(prompt, 60, stop_ids=())
        assert gen.tokens == greedy_reference(target, prompt[None], 60)[0]
    assert len(set(drafted)) >= 3 and max(drafted) <= shape.draft_tokens - 1  # cut variously
    assert 0 in drafted or shape.topk > 1  # rounds without drafting (in a tree of three, the
    # oracle's best child always reaches 0.3)


def test_min_prob_decides_a_sampled_level_before_its_token_is_drawn():
    """A sampled chain's level is drafted when the probability of the tokens drawn above it
    times the draft's top probability at it reaches min_prob: the drawn token's own
    probability must not decide (the verify would then accept from another proposal than the
    one it was drawn from). Worked out from the draft's logits at every level, every round."""
    target = as_target(bigram_like_target("llama", seed=1))
    draft = oracle_draft(target, vocab_subset(target, 300, 0))
    floor = 0.3
    shape = TreeShape(4, 1, min_prob=floor)
    engine = SpecEngine(target, draft, shape, SamplingParams(temperature=1.0), seed=3)
    real_tree, real_logits = engine._draft_tree, engine.drafter.logits
    rows: list[torch.Tensor] = []  # the draft's probabilities at each level of the round
    drafted: list[int] = []
    cut_by_drawn = 0  # rounds where the drawn token's probability would have decided otherwise

    def logits(hidden):
        out = real_logits(hidden)
        rows.append(out[0].double().softmax(-1))
        return out

    def spy(hidden, root, base, depth):
        nonlocal cut_by_drawn
        rows.clear()
        got = real_tree(hidden, root, base, depth)
        drawn = [int((draft.draft_ids() == t).nonzero()) for t in got.tokens[1:]]
        above, want = 1.0, 0
        for level, row in enumerate(rows):
            if above * float(row.max()) < floor:
                break
            want += 1
            if level < len(drawn):
                cut_by_drawn += above * float(row[drawn[level]]) < floor
                above *= float(row[drawn[level]])
        assert len(got.tokens) - 1 == want
        drafted.append(want)
        return got

    engine._draft_tree = spy
    engine.drafter.logits = logits
    for prompt in prompts(3, seed=12, vocab=target.vocab_size):
        engine.generate(prompt, 60, stop_ids=())
    assert cut_by_drawn > 0  # the two rules disagree on some rounds: this test tells them apart
    assert len(set(drafted)) >= 3
