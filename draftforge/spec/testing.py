"""Tiny targets and hand-built drafts that agree with them often, for tests and benchmarks.

A random untrained draft is almost always rejected, which leaves long accepted paths and
cache compaction untested. Here the target is made nearly a bigram model (a scaled-up
embedding dominates the residual stream, a scaled-up head makes it confident; its attention
still matters near ties), and the "oracle" draft computes, by construction, what such a
target predicts from the current token alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from draftforge.models.eagle3 import Eagle3Draft, eagle3_config
from draftforge.target import Target, decoder_module
from draftforge.testing import tiny_target, tiny_tokenizer


def bigram_like_target(
    family: str = "llama",
    seed: int = 0,
    *,
    embed_scale: float = 3.0,
    head_scale: float = 30.0,
    dtype: torch.dtype = torch.float64,
    **overrides: object,
) -> nn.Module:
    """A tiny random target whose next token mostly depends on the current token only.

    float64 by default: greedy comparisons then never hinge on rounding between a one-token
    and a many-token forward.
    """
    model = tiny_target(family, seed, **overrides).to(dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(embed_scale)
        model.get_output_embeddings().weight.mul_(head_scale)
    model.generation_config.eos_token_id = None  # tests decode a fixed number of tokens
    return model


def chi_square_p(counts: Tensor, probs: Tensor) -> float:
    """p-value of observed counts against expected probabilities. Cells expected to hold
    fewer than 5 counts are pooled so the chi-square approximation holds; a count in a cell
    of probability zero returns 0."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return 0.0
    small = probs * n < 5
    counts = torch.cat([counts[~small], counts[small].sum()[None]])
    probs = torch.cat([probs[~small], probs[small].sum()[None]])
    expected = probs * n
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def as_target(model: nn.Module, aux_layers: list[int] | None = None) -> Target:
    """Wrap a tiny model with the tiny byte tokenizer; aux layers default to 0, 1, 2."""
    return Target(
        model=model, tokenizer=tiny_tokenizer(), aux_layers=aux_layers or [0, 1, 2], path="tiny"
    )


def oracle_draft(
    target: Target, draft_ids: Tensor | None = None, sharpness: float = 10.0
) -> Eagle3Draft:
    """A draft whose output at every step is the normalised embedding of its input token,
    read out by the target's own head (restricted to ``draft_ids``, default: all).

    How: query, key and value read the embedding half of the attention input; the query is
    scaled by ``sharpness`` so each index attends (almost) only to itself; the value also
    subtracts the normalised incoming hidden state, which cancels the residual of the
    previous step exactly (its RMS is the o_proj gain, 1). MLP and fc are zero.
    """
    config = eagle3_config(
        target.config,
        target.aux_layers,
        target.vocab_size if draft_ids is None else draft_ids.numel(),
    )
    hidden = config.hidden_size
    if config.num_attention_heads * config.head_dim != hidden:
        raise ValueError("oracle_draft needs num_attention_heads * head_dim == hidden_size")
    config.num_key_value_heads = config.num_attention_heads  # one value head per query head
    ids = torch.arange(target.vocab_size) if draft_ids is None else draft_ids
    dtype = target.model.dtype
    draft = Eagle3Draft(config).to(dtype)
    eye = torch.eye(hidden, dtype=dtype)
    head_weight, _ = target.lm_head()
    norm_weight = decoder_module(target.model).norm.weight
    with torch.no_grad():
        for param in draft.parameters():
            param.zero_()
        for norm in (draft.midlayer.input_layernorm, draft.midlayer.hidden_norm, draft.norm):
            norm.weight.fill_(1.0)
        draft.midlayer.post_attention_layernorm.weight.fill_(1.0)
        attn = draft.midlayer.self_attn
        attn.q_proj.weight[:, :hidden] = sharpness * eye
        attn.k_proj.weight[:, :hidden] = eye
        attn.v_proj.weight[:, :hidden] = eye
        attn.v_proj.weight[:, hidden:] = -eye
        attn.o_proj.weight.copy_(eye)
        draft.lm_head.weight.copy_(head_weight[ids] * norm_weight)
        draft.load_target_embedding(target.embed_weight())
    draft.set_vocab(ids)
    return draft.eval().requires_grad_(False)
