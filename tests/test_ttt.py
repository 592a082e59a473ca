"""The TTT objective against its definition: the naive unroll over one K*T sequence.

The reference below concatenates the keys of all steps into one sequence, builds the
explicit boolean mask, runs plain softmax attention, and aligns targets with Python loops
over (row, index), straight from docs/architecture.md. It is slow and obviously correct.
"""

import pytest
import torch

from draftforge import ttt
from draftforge.models import build_draft
from draftforge.testing import tiny_config

T = 24
STEPS_MAX = 7


def _draft(vocab_ids=None, dtype=torch.float64):
    draft = build_draft("eagle3", tiny_config("llama"), [0, 1, 2], 40).to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():  # norms get random weights too, so their grads matter
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
    if vocab_ids is not None:
        draft.set_vocab(vocab_ids)
    return draft


def _batch(packed: bool, dtype=torch.float64):
    """Two rows; packed: row 0 holds three samples, row 1 two samples and right padding."""
    gen = torch.Generator().manual_seed(2)
    b = 2
    if packed:
        lengths = [[7, 9, 8], [10, 9, 5]]  # the last "sample" of row 1 is padding
        seg_rows = []
        for row in lengths:
            seg_rows.append(torch.cat([torch.full((n,), i) for i, n in enumerate(row)]))
        segment_ids = torch.stack(seg_rows)
        position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    else:
        segment_ids = None
        position_ids = torch.arange(T).expand(b, T).clone()
    input_ids = torch.randint(0, 300, (b, T), generator=gen)
    loss_mask = torch.rand(b, T, generator=gen) < 0.7
    if packed:
        loss_mask[1, 19:] = False  # padding is never supervised
    else:
        loss_mask[1, 18:] = False  # right padding without segments
    aux = torch.randn(b, T, 3 * 64, generator=gen, dtype=dtype)
    teacher_logits = torch.randn(b, T, 320, generator=gen, dtype=dtype) * 3
    teacher_argmax = teacher_logits.argmax(-1)
    return dict(
        aux=aux,
        input_ids=input_ids,
        position_ids=position_ids,
        loss_mask=loss_mask,
        teacher_logits=teacher_logits,
        teacher_argmax=teacher_argmax,
        segment_ids=segment_ids,
    )


def _naive(draft, batch, steps, decay):
    """Returns per-step (ce_sum, correct, count) and the weighted normalised loss."""
    aux, ids, pos = batch["aux"], batch["input_ids"], batch["position_ids"]
    seg = batch["segment_ids"]
    b, t = ids.shape
    seg_ = seg if seg is not None else torch.zeros(b, t, dtype=torch.long)
    draft_ids = draft.draft_ids()
    probs = torch.softmax(batch["teacher_logits"][..., draft_ids], dim=-1)
    keys, values = [], []
    hq, hkv = draft.config.num_attention_heads, draft.config.num_key_value_heads

    def attend(q, k, v):
        keys.append(k)
        values.append(v)
        n_steps = len(keys)
        kk = torch.cat(keys, dim=2).repeat_interleave(hq // hkv, dim=1)  # [B,Hq,(k+1)T,D]
        vv = torch.cat(values, dim=2).repeat_interleave(hq // hkv, dim=1)
        allowed = torch.zeros(b, t, n_steps * t, dtype=torch.bool)
        for r in range(b):
            for i in range(t):
                for j in range(i + 1):  # step-0 keys: causal, same sample
                    allowed[r, i, j] = seg_[r, i] == seg_[r, j]
                for s in range(1, n_steps):  # later steps: the same index only
                    allowed[r, i, s * t + i] = True
        scores = q @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(scores, dim=-1) @ vv

    hidden = draft.fc(aux)
    rows = []
    for k in range(steps):
        step_ids = torch.zeros_like(ids)
        step_ids[:, : t - 1 - k] = ids[:, 1 + k :]
        hidden = draft.step(hidden, step_ids, pos + k, attend)
        logits = draft.logits(hidden)
        ce_sum = logits.new_zeros(())
        correct = count = 0
        for r in range(b):
            for i in range(t):
                p, predicted = i + 1 + k, i + 2 + k  # teacher position, predicted token
                if predicted >= t or not batch["loss_mask"][r, predicted]:
                    continue
                if seg_[r, predicted] != seg_[r, i]:
                    continue
                count += 1
                target = int(batch["teacher_argmax"][r, p])
                guess = int(draft_ids[logits[r, i].argmax()])
                correct += guess == target
                if draft.t2d[target]:
                    ce_sum = ce_sum - (probs[r, p] * torch.log_softmax(logits[r, i], -1)).sum()
        rows.append((ce_sum, correct, count))
    loss = sum(decay**k * ce / max(n, 1) for k, (ce, _, n) in enumerate(rows))
    return rows, loss


def _efficient(draft, batch, steps, decay, norms, **options):
    draft_ids = draft.draft_ids()
    probs = torch.softmax(batch["teacher_logits"][..., draft_ids], dim=-1)
    return draft(
        batch["aux"],
        batch["input_ids"],
        batch["position_ids"],
        batch["loss_mask"],
        probs,
        batch["teacher_argmax"],
        norms,
        batch["segment_ids"],
        steps=steps,
        decay=decay,
        **options,
    )


@pytest.mark.parametrize("steps", [1, 3, 7])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("head_memory_mb", [0, 512])  # the head's logits recomputed, or kept
def test_efficient_ttt_matches_naive_unroll(steps, packed, head_memory_mb):
    # A draft vocab that misses some teacher argmaxes exercises the out-of-vocab rule.
    vocab_ids = torch.sort(
        torch.randperm(320, generator=torch.Generator().manual_seed(3))[:40]
    ).values
    batch = _batch(packed)
    batch["teacher_argmax"][0, 5] = int(vocab_ids[3])  # and some that hit it
    batch["teacher_argmax"][1, 9] = int(vocab_ids[7])

    ref_draft = _draft(vocab_ids)
    rows, ref_loss = _naive(ref_draft, batch, steps, 0.8)
    ref_loss.backward()

    draft = _draft(vocab_ids)
    norms = ttt.step_counts(batch["loss_mask"], batch["segment_ids"], steps)
    assert norms.tolist() == [n for *_, n in rows]
    out = _efficient(draft, batch, steps, 0.8, norms, head_memory_mb=head_memory_mb)
    out.loss.backward()

    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        out.ce_sums, torch.stack([ce.detach() for ce, _, _ in rows]), rtol=1e-6, atol=1e-8
    )
    assert out.correct.tolist() == [c for _, c, _ in rows]
    for (name, p), p_ref in zip(draft.named_parameters(), ref_draft.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert draft.embed_tokens.weight.grad is None


@pytest.mark.parametrize("head_memory_mb", [0, 512])
def test_a_batch_without_supervised_tokens_adds_nothing(head_memory_mb):
    # A micro-batch of prompts only: the head sees no row, and every gradient is zero.
    batch = _batch(packed=True)
    batch["loss_mask"][:] = False
    draft = _draft()
    norms = ttt.step_counts(batch["loss_mask"], batch["segment_ids"], 3)
    out = _efficient(draft, batch, 3, 0.8, norms, head_memory_mb=head_memory_mb)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert out.correct.tolist() == [0, 0, 0] and out.ce_sums.tolist() == [0.0, 0.0, 0.0]
    for name, p in draft.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_the_teacher_rows_are_all_the_loss_reads(steps):
    # Teachers (and argmaxes) zeroed outside teacher_rows leave every step's loss and count
    # as they were: no step reads a row the capture or the online path leaves out.
    batch = _batch(packed=True)
    rows = ttt.teacher_rows(batch["loss_mask"], batch["segment_ids"])
    assert 0 < rows.sum() < rows.numel()
    norms = ttt.step_counts(batch["loss_mask"], batch["segment_ids"], steps)
    full = _efficient(_draft(), batch, steps, 0.8, norms)
    batch["teacher_logits"] = batch["teacher_logits"].masked_fill(~rows[..., None], 0.0)
    batch["teacher_argmax"] = batch["teacher_argmax"].masked_fill(~rows, 0)
    cut = _efficient(_draft(), batch, steps, 0.8, norms)
    assert torch.equal(cut.loss, full.loss) and torch.equal(cut.correct, full.correct)


def test_fp32_matches_fp64_reference():
    batch64 = _batch(True)
    batch32 = {
        k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in batch64.items()
    }
    ref_draft = _draft()
    _rows, ref_loss = _naive(ref_draft, batch64, 3, 0.8)
    ref_loss.backward()
    draft = _draft().float()
    norms = ttt.step_counts(batch32["loss_mask"], batch32["segment_ids"], 3)
    out = _efficient(draft, batch32, 3, 0.8, norms)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for p, p_ref in zip(draft.parameters(), ref_draft.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=1e-3, atol=1e-5)


def test_rope_position_of_step_k_is_t_plus_k():
    draft = _draft()
    batch = _batch(True)
    seen = []
    draft.rotary_emb.register_forward_hook(lambda _m, args, _out: seen.append(args[1].clone()))
    norms = ttt.step_counts(batch["loss_mask"], batch["segment_ids"], 4)
    _efficient(draft, batch, 4, 0.8, norms)
    assert len(seen) == 4
    for k, positions in enumerate(seen):
        assert torch.equal(positions, batch["position_ids"] + k)
    assert seen[0][0, 7].item() == 0  # positions restart in each packed sample


def test_step_k_loss_weight_is_decay_to_the_k():
    draft = _draft()
    batch = _batch(False)
    norms = ttt.step_counts(batch["loss_mask"], None, 5)
    out = _efficient(draft, batch, 5, 0.8, norms)
    per_step = out.ce_sums / norms
    expected = sum(0.8**k * per_step[k] for k in range(5))
    torch.testing.assert_close(out.loss, expected)
    assert ttt.step_weights(4, 0.8) == [1.0, 0.8, 0.8**2, 0.8**3]
    assert ttt.step_weights(3, 0.5) == [1.0, 0.5, 0.25]


def test_step_mask_alignment():
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    segs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    # step 0, index t predicts token t+2; it must be supervised and in t's sample.
    assert ttt.step_mask(loss_mask, None, 0).int().tolist() == [[1, 1, 1, 0, 1, 1, 0, 0]]
    assert ttt.step_mask(loss_mask, segs, 0).int().tolist() == [[1, 1, 1, 0, 0, 1, 0, 0]]
    assert ttt.step_mask(loss_mask, segs, 1).int().tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]


def test_acceptance_length_estimate():
    acc = torch.tensor([0.5, 0.5, 0.0, 1.0])
    assert ttt.acceptance_length(acc).item() == pytest.approx(1 + 0.5 + 0.25)
    assert ttt.acceptance_length(torch.ones(7)).item() == 8


ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    },
}


@pytest.mark.parametrize("rope", sorted(ROPE_TYPES))
def test_draft_uses_the_targets_rope_scaling(rope):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    target_config = tiny_config("llama", rope_parameters=ROPE_TYPES[rope])
    draft = build_draft("eagle3", target_config, [0, 1, 2], 40).double()
    assert draft.config.rope_parameters["rope_type"] == rope
    x = torch.zeros(1, 5, 64, dtype=torch.float64)
    positions = torch.arange(5)[None] + 3
    expected = LlamaRotaryEmbedding(target_config)(x, positions)
    for got, want in zip(draft.rotary_emb(x, positions), expected, strict=True):
        torch.testing.assert_close(got, want)
    batch = _batch(False)
    out = _efficient(draft, batch, 3, 0.8, ttt.step_counts(batch["loss_mask"], None, 3))
    assert torch.isfinite(out.loss)


def test_attention_implementation_is_pluggable():
    from draftforge.ttt_attention import ttt_attention

    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[3]))  # the number of diagonal keys = the step index
        return ttt_attention(*args, **kwargs)

    draft, batch = _draft(), _batch(True)
    norms = ttt.step_counts(batch["loss_mask"], batch["segment_ids"], 4)
    probs = torch.softmax(batch["teacher_logits"][..., draft.draft_ids()], dim=-1)
    args = [batch[k] for k in ("aux", "input_ids", "position_ids", "loss_mask")]
    draft(
        *args,
        probs,
        batch["teacher_argmax"],
        norms,
        batch["segment_ids"],
        steps=4,
        attention=counting,
    )
    assert calls == [0, 1, 2, 3]


@pytest.mark.parametrize("keep_grad", [False, True])
def test_chunked_head_loss_matches_plain_soft_cross_entropy(keep_grad):
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(13, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    probs = torch.softmax(torch.randn(13, 11, dtype=torch.float64, generator=gen), -1)
    row_weights = (torch.rand(13, generator=gen) < 0.6).double()
    total, preds = ttt.head_soft_cross_entropy(
        h, w, probs, row_weights, chunk=4, keep_grad=keep_grad
    )
    total.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits = h2 @ w2.T
    expected = (-(probs * torch.log_softmax(logits, -1)).sum(-1) * row_weights).sum()
    expected.backward()
    torch.testing.assert_close(total, expected)
    assert torch.equal(preds, logits.argmax(-1))
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
