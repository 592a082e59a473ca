"""Speculative decoding of one sequence with an EAGLE-3 draft over a Hugging Face target.

One round, with N tokens committed (the last one, the root, not yet in the target's cache):

1. Draft. The draft's KV cache holds one entry per committed index t < N-1, computed from the
   target's real aux features of position t and the embedding of token t+1 (docs/architecture.md
   alignment). Its output at index N-2 proposes depth-1 tokens; each deeper level feeds the
   frontier's tokens with their parent's hidden state at RoPE position N-2+depth, attending to
   the committed cache, to its own ancestors' speculative keys and to itself: exactly the TTT
   pattern (step-0 keys causally, then the "diagonal"). Trees expand top-k per frontier node
   and keep top-k as the next frontier (SGLang), then keep the best num_draft_tokens - 1 nodes
   by cumulative log-prob. Speculative draft keys live only for the round.
2. Verify. The target runs once over [root, nodes...] at positions N-1+depth with a 4D
   additive mask: every query sees the whole cache and its ancestors (a chain passes no mask
   and gets the ordinary causal one). Aux layers are captured by hooks in the same forward.
3. Accept. :func:`~draftforge.decode.sampling.verify_tree` walks the tree (greedy or lossless
   rejection sampling) and returns the accepted path and one more token.
4. Compact. The target cache keeps its prefix plus the root and the accepted path, moved into
   place; the draft cache is extended with the real aux features of those same positions, so
   both caches again describe exactly the committed sequence.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from draftforge.decode.errors import DecodeError
from draftforge.decode.sampling import SamplingParams, sample, verify_tree, warp
from draftforge.decode.tree import TreeShape, ancestor_mask, is_chain, select_nodes
from draftforge.drafts import check_compatible, draft_aux_layers
from draftforge.models.eagle3 import Eagle3Draft
from draftforge.target import Target, capture_layers


@dataclass
class Generation:
    """One decoded sequence and what it cost.

    tokens: new tokens (a stop token included when one ended the sequence); rounds: target
    verification forwards (the prefill is not one); verified: tokens those forwards produced,
    before truncation at a stop token or the length limit; attempts[d] / accepts[d]: how often
    verification reached a node at depth d with children, and accepted one of them.
    """

    tokens: list[int]
    prompt_tokens: int
    rounds: int = 0
    verified: int = 0
    attempts: list[int] = field(default_factory=list)
    accepts: list[int] = field(default_factory=list)
    seconds: float = 0.0
    stop: str = ""

    @property
    def acceptance_length(self) -> float | None:
        """Tokens per verification forward, bonus/correction token included (docs/architecture.md)."""
        return self.verified / self.rounds if self.rounds else None


@dataclass
class DraftTree:
    """One round's draft: node 0 is the root (last committed token); parents precede children.

    proposal [T, V]: the distribution each node's token was sampled from (sampled chains), or
    None when nodes are a deterministic function of the prefix (point-mass proposals).
    """

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    proposal: Tensor | None = None


class DraftCache:
    """The draft's keys and values [1, Hkv, L, D], one entry per committed index."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def with_new(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The cached keys and values followed by ``k`` / ``v``; the cache is unchanged."""
        if self.keys is None or self.values is None:
            return k, v
        return torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)


def _attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """q [1,Hq,T,D], k/v [1,Hkv,S,D], visible [T,S] bool -> [1,Hq,T,D]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=visible, enable_gqa=q.shape[1] != k.shape[1]
    )


def compact_cache(cache: DynamicCache, start: int, keep: Tensor) -> None:
    """Keep the first ``start`` entries and then entries ``start + keep``, in that order.

    The kept rows are gathered (a copy) before being written over the region they come from,
    and the layer then holds a view of the shortened tensor: no reallocation of the prefix.
    """
    end = start + keep.numel()
    for layer in cache.layers:
        for name in ("keys", "values"):
            states = getattr(layer, name)
            states[..., start:end, :] = states[..., start + keep, :]
            setattr(layer, name, states[..., :end, :])


def default_stop_ids(target: Target) -> frozenset[int]:
    """End-of-sequence ids of the target's generation config and tokenizer."""
    ids: set[int] = set()
    eos = getattr(target.model.generation_config, "eos_token_id", None)
    if eos is not None:
        ids.update(eos if isinstance(eos, list) else [eos])
    tok_eos = getattr(target.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(tok_eos)
    return frozenset(ids)


def stop_reason(tokens: list[int], stops: frozenset[int], max_new_tokens: int) -> str:
    """Why decoding ends after ``tokens``: "eos" after a stop token, "length" at the limit;
    "" while it goes on."""
    if tokens and tokens[-1] in stops:
        return "eos"
    if len(tokens) >= max_new_tokens:
        return "length"
    return ""


class SpecEngine:
    """Speculative decoding (batch size 1) of ``target`` with ``draft``.

    ``draft=None`` or ``shape.num_steps == 0`` decodes without drafting (one token per target
    forward through the same code path): the baseline speculation is measured against.
    """

    def __init__(
        self,
        target: Target,
        draft: Eagle3Draft | None = None,
        shape: TreeShape | None = None,
        sampling: SamplingParams | None = None,
        seed: int = 0,
    ) -> None:
        self.target = target
        self.model = target.model
        self.shape = shape or TreeShape()
        self.sampling = sampling or SamplingParams()
        self.draft = draft if draft is not None and self.shape.drafting else None
        self.aux_layers = target.aux_layers
        if self.draft is not None:
            check_compatible(self.draft.config, target)
            self.aux_layers = draft_aux_layers(self.draft.config) or target.aux_layers
            self.draft_ids = self.draft.draft_ids()
            if self.shape.topk > self.draft_ids.numel():
                raise DecodeError(
                    f"topk {self.shape.topk} exceeds the draft vocabulary "
                    f"({self.draft_ids.numel()} tokens)"
                )
        layers = DynamicCache(config=self.model.config).layers
        if any(type(layer) is not DynamicLayer for layer in layers):
            raise DecodeError(
                f"{type(self.model).__name__} has sliding-window or linear-attention layers; "
                "the speculative engine supports full-attention targets (Llama, Qwen, Mistral "
                "without sliding window, ...)"
            )
        self.max_positions: int = target.config.max_position_embeddings
        self.stop_ids = default_stop_ids(target)
        self.generator = torch.Generator(device=target.device).manual_seed(seed)

    # ------------------------------------------------------------------------- public

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int = 256,
        stop_ids: Collection[int] | None = None,
    ) -> Generation:
        """Decode up to ``max_new_tokens`` after the prompt; stop after a stop token (default:
        the target's EOS ids) or when the target's positions run out."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise DecodeError("the prompt is empty: a target needs at least one token to continue")
        if len(prompt) >= self.max_positions:
            raise DecodeError(
                f"the prompt has {len(prompt)} tokens and the target takes at most "
                f"{self.max_positions} positions, which leaves no room to generate: shorten it "
                "(`draftforge eval` truncates long prompts from the left)"
            )
        if max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = self.stop_ids if stop_ids is None else frozenset(stop_ids)
        steps = self.shape.num_steps
        result = Generation(
            tokens=[], prompt_tokens=len(prompt), attempts=[0] * steps, accepts=[0] * steps
        )
        start = time.perf_counter()
        device = self.target.device

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor(prompt, device=device)
        positions = torch.arange(len(prompt), device=device)
        logits, aux = self._target_forward(cache, ids, positions, last_only=True)
        token = int(sample(warp(logits, self.sampling), self.sampling.greedy, self.generator))
        result.tokens.append(token)
        draft_cache = DraftCache()
        hidden = None
        if self.draft is not None:
            hidden = self._extend_draft(draft_cache, aux, [*prompt[1:], token], 0)

        result.stop = stop_reason(result.tokens, stops, max_new_tokens)
        while not result.stop:
            committed = len(prompt) + len(result.tokens)
            if committed >= self.max_positions:
                result.stop = "max_positions"
                break
            # Nodes at depth d sit at position committed - 1 + d, which must stay in range.
            depth = min(steps, self.max_positions - 1 - committed)
            tree = self._draft_tree(draft_cache, hidden, token, committed - 2, depth)
            path, token, aux = self._verify(cache, tree, committed - 1)
            self._count(result, tree, path)
            new = [tree.tokens[i] for i in path] + [token]
            if self.draft is not None:
                hidden = self._extend_draft(draft_cache, aux, new, committed - 1)
            for t in new:
                result.tokens.append(t)
                result.stop = stop_reason(result.tokens, stops, max_new_tokens)
                if result.stop:
                    break
        result.seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------------- target

    def _target_forward(
        self,
        cache: DynamicCache,
        ids: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """logits [T, V] ([1, V] when ``last_only``: a prefill needs no more) and, when
        drafting, the concatenated aux states [T, 3H]."""
        kwargs = {
            "input_ids": ids[None],
            "position_ids": positions[None],
            "attention_mask": mask,
            "past_key_values": cache,
            "use_cache": True,
            "logits_to_keep": 1 if last_only else 0,
        }
        if self.draft is None:
            return self._call_model(kwargs), None
        with capture_layers(self.model, self.aux_layers) as captured:
            logits = self._call_model(kwargs)
        return logits, torch.cat(captured, dim=-1)[0]

    def _call_model(self, kwargs: dict) -> Tensor:
        """The target's logits for the one sequence of ``kwargs``."""
        # transformers 5.2x warns on every forward that passes `past_key_values`, naming `cache`
        # as its successor, yet a cache passed as `cache` is not used by that version's models:
        # keep the working argument without a warning per decoded token.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="`past_key_values` is deprecated", category=FutureWarning
            )
            return self.model(**kwargs).logits[0]

    def _verify(
        self, cache: DynamicCache, tree: DraftTree, root_position: int
    ) -> tuple[list[int], int, Tensor | None]:
        """One target forward over the tree; returns the accepted path (node indices), the
        token after it, and the aux states of the root and the path (the new draft inputs)."""
        device = self.target.device
        prefix = cache.get_seq_length()
        ids = torch.tensor(tree.tokens, device=device)
        positions = root_position + torch.tensor(tree.depths, device=device)
        mask = None
        if not is_chain(tree.parents):
            visible = torch.cat(
                [torch.ones(len(ids), prefix, dtype=torch.bool), ancestor_mask(tree.parents)], 1
            ).to(device)
            dtype = self.model.dtype
            mask = torch.zeros(visible.shape, dtype=dtype, device=device)
            mask = mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]
        logits, aux = self._target_forward(cache, ids, positions, mask)
        proposal = None if tree.proposal is None else tree.proposal[None]
        verdict = verify_tree(
            warp(logits, self.sampling)[None],
            ids[None],
            tree.parents,
            proposal,
            self.sampling.greedy,
            self.generator,
        )
        accepted = int(verdict.accepted[0])
        path = verdict.path[0, :accepted].tolist()
        keep = torch.tensor([0, *path], device=device)
        compact_cache(cache, prefix, keep)
        return path, int(verdict.token[0]), None if aux is None else aux[keep]

    # ------------------------------------------------------------------------- draft

    def _extend_draft(
        self, cache: DraftCache, aux: Tensor, next_ids: list[int], start: int
    ) -> Tensor:
        """Append indices start.. to the draft cache from real target features (aux [T, 3H]
        of positions start.., next_ids the tokens one position later); return the last
        index's output hidden [H], which proposes the next tokens."""
        draft = self.draft
        device = aux.device
        hidden = draft.fc(aux.to(draft.fc.weight.dtype))[None]
        n = len(next_ids)
        positions = torch.arange(start, start + n, device=device)[None]
        prefix = cache.length

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            keys, values = cache.with_new(k, v)
            cache.keys, cache.values = keys, values
            visible = torch.ones(n, prefix + n, dtype=torch.bool, device=device).tril(prefix)
            return _attention(q, keys, values, visible)

        ids = torch.tensor(next_ids, device=device)[None]
        return draft.step(hidden, ids, positions, attend)[0, -1]

    def _draft_tree(
        self, cache: DraftCache, hidden: Tensor | None, root: int, base: int, depth: int
    ) -> DraftTree:
        """Draft up to ``depth`` levels below ``root``; ``base`` is the last committed index."""
        if hidden is None or depth == 0:
            return DraftTree(tokens=[root], parents=[-1], depths=[0])
        draft = self.draft
        topk = self.shape.topk
        device = hidden.device
        # Candidates, level by level: token (target id), cumulative score, parent (-1: root).
        tokens: list[Tensor] = []
        scores: list[Tensor] = []
        parents: list[Tensor] = []
        depths: list[Tensor] = []
        proposals: list[Tensor] = []  # sampled chains only
        children, child_scores, q = self._children(draft.logits(hidden[None]), hidden.new_zeros(1))
        tokens.append(children[0])
        scores.append(child_scores[0])
        parents.append(torch.full((topk,), -1, device=device))
        depths.append(torch.ones(topk, dtype=torch.long, device=device))
        if q is not None:
            proposals.append(q)
        frontier = torch.arange(topk, device=device)  # candidate ids
        frontier_hidden = hidden.expand(topk, -1)
        visible = torch.zeros(topk, 0, dtype=torch.bool, device=device)  # speculative keys seen
        spec_keys: list[Tensor] = []
        spec_values: list[Tensor] = []
        count = topk
        all_tokens = tokens[0]
        all_scores = scores[0]
        for level in range(2, depth + 1):
            width = frontier.numel()
            out = self._tree_step(
                cache,
                (spec_keys, spec_values),
                frontier_hidden,
                all_tokens[frontier],
                base + level - 1,
                visible,
            )
            children, child_scores, q = self._children(draft.logits(out), all_scores[frontier])
            tokens.append(children.flatten())
            scores.append(child_scores.flatten())
            parents.append(frontier.repeat_interleave(topk))
            depths.append(torch.full((width * topk,), level, device=device))
            if q is not None:
                proposals.append(q)
            best = child_scores.flatten().topk(min(topk, width * topk)).indices
            slot = best // topk  # which frontier node each new frontier node hangs under
            frontier = count + best
            frontier_hidden = out[slot]
            visible = torch.cat([visible[slot], F.one_hot(slot, width).bool()], dim=1)
            count += width * topk
            all_tokens = torch.cat(tokens)
            all_scores = torch.cat(scores)
        return self._assemble(root, all_tokens, all_scores, parents, depths, proposals)

    def _tree_step(
        self,
        cache: DraftCache,
        speculative: tuple[list[Tensor], list[Tensor]],
        hidden: Tensor,
        ids: Tensor,
        position: int,
        seen: Tensor,
    ) -> Tensor:
        """One draft step for the F frontier nodes (hidden [F, H], ids [F], all at RoPE
        ``position``); each sees the committed cache, the speculative keys ``seen`` [F, S]
        marks (its ancestors) and itself. Appends their keys to ``speculative``."""
        spec_keys, spec_values = speculative
        width = ids.numel()
        device = ids.device

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            keys, values = cache.with_new(
                torch.cat([*spec_keys, k], dim=2), torch.cat([*spec_values, v], dim=2)
            )
            spec_keys.append(k)
            spec_values.append(v)
            visible = torch.cat(
                [
                    torch.ones(width, cache.length, dtype=torch.bool, device=device),
                    seen,
                    torch.eye(width, dtype=torch.bool, device=device),
                ],
                dim=1,
            )
            return _attention(q, keys, values, visible)

        positions = torch.full((1, width), position, device=device)
        return self.draft.step(hidden[None], ids[None], positions, attend)[0]

    def _children(
        self, logits: Tensor, base_scores: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Children of each of F nodes from their draft logits [F, Vd].

        Returns target ids [F, k], cumulative scores [F, k] (parent score + draft log-prob)
        and, for sampled chains, the proposal each child was drawn from over the target
        vocab [F, V] (zero outside the draft vocab)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        if self.shape.topk == 1 and not self.sampling.greedy:
            q_draft = warp(logits, self.sampling)
            picked = sample(q_draft, False, self.generator)[:, None]
            q = q_draft.new_zeros(q_draft.shape[0], self.target.vocab_size)
            q[:, self.draft_ids] = q_draft
        else:
            picked = logp.topk(self.shape.topk, dim=-1).indices
            q = None
        return self.draft_ids[picked], base_scores[:, None] + logp.gather(1, picked), q

    def _assemble(
        self,
        root: int,
        tokens: Tensor,
        scores: Tensor,
        parents: list[Tensor],
        depths: list[Tensor],
        proposals: list[Tensor],
    ) -> DraftTree:
        """Keep the best candidates and renumber them as tree nodes 1..M under the root."""
        parent_of = torch.cat(parents).tolist()
        depth_of = torch.cat(depths)
        budget = min(self.shape.draft_tokens - 1, tokens.numel())
        chosen = select_nodes(scores, depth_of, budget).tolist()
        node_of = {c: i + 1 for i, c in enumerate(chosen)}
        proposal = None
        if proposals:
            rows = torch.cat(proposals)[chosen]
            proposal = torch.cat([rows.new_zeros(1, rows.shape[1]), rows])
        return DraftTree(
            tokens=[root, *tokens[chosen].tolist()],
            parents=[-1, *(node_of.get(parent_of[c], 0) for c in chosen)],
            depths=[0, *depth_of[chosen].tolist()],
            proposal=proposal,
        )

    # ------------------------------------------------------------------------- bookkeeping

    @staticmethod
    def _count(result: Generation, tree: DraftTree, path: list[int]) -> None:
        result.rounds += 1
        result.verified += len(path) + 1
        has_children = {p for p in tree.parents if p >= 0}
        node = 0
        for depth in range(len(path) + 1):
            if depth < len(path):
                result.attempts[depth] += 1
                result.accepts[depth] += 1
                node = path[depth]
            elif node in has_children:
                result.attempts[depth] += 1
