"""Speculative decoding of one sequence with an EAGLE-3 draft over a Hugging Face target.

One round, with N tokens committed (the last one, the root, not yet in the target's cache):

1. Draft. The draft's KV cache holds one entry per committed index t < N-1, computed from the
   target's real aux features of position t and the embedding of token t+1 (docs/architecture.md
   alignment). Its output at index N-2 proposes depth-1 tokens; each deeper level feeds the
   frontier's tokens with their parent's hidden state at RoPE position N-2+depth, attending to
   the committed cache, to its own ancestors' speculative keys and to itself: exactly the TTT
   pattern (step-0 keys causally, then the "diagonal"). Trees expand top-k per frontier node
   and keep top-k as the next frontier (SGLang), then keep the best num_draft_tokens - 1 nodes
   by cumulative log-prob; with ``shape.min_prob`` only nodes whose cumulative probability
   reaches it, and drafting stops at a level without one. Speculative draft keys live only for
   the round.
2. Verify. The target runs once over [root, nodes...] at positions N-1+depth with a 4D
   additive mask: every query sees the whole cache and its ancestors (a chain passes no mask
   and gets the ordinary causal one). Aux layers are captured by hooks in the same forward.
3. Accept. :func:`~draftforge.decode.sampling.verify_tree` walks the tree (lossless rejection
   sampling; :func:`~draftforge.decode.sampling.greedy_walk`, the same walk on the argmaxes,
   at temperature 0) and returns the accepted path and one more token.
4. Compact. The target cache keeps its prefix plus the root and the accepted path, moved into
   place; the draft cache is extended with the real aux features of those same positions, so
   both caches again describe exactly the committed sequence.

The target runs on one of two paths (:mod:`draftforge.decode.paths`): the lean static-cache
forward of :mod:`draftforge.decode.lean` when the model is a standard dense decoder, else
transformers' own forward; the draft runs through :class:`~draftforge.decode.drafter.Drafter`.
``lean=None`` picks the lean path when it can serve the model, ``True`` insists, ``False``
keeps transformers' forward and the draft module's own step (the reference the lean path is
tested against). A vision-language target (:mod:`draftforge.decode.vision`) runs on
transformers' forward: its prefill carries the prompt's images, and the target and the draft
both take the 3-row M-RoPE positions its language model uses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from draftforge.decode.drafter import Drafter
from draftforge.decode.errors import DecodeError
from draftforge.decode.paths import choose_target_path
from draftforge.decode.sampling import SamplingParams, greedy_walk, sample, verify_tree, warp
from draftforge.decode.tree import TreeShape, ancestor_mask, is_chain, select_nodes
from draftforge.decode.vision import (
    ImageInputs,
    VisionTargetPath,
    prompt_positions,
    vision_target_path,
)
from draftforge.drafts import check_compatible, draft_aux_layers
from draftforge.models.eagle3 import Eagle3Draft
from draftforge.target import Target, is_vision_config


@dataclass
class Generation:
    """One decoded sequence and what it cost.

    tokens: new tokens (a stop token included when one ended the sequence); rounds: target
    verification forwards (the prefill is not one); verified: tokens those forwards produced,
    before truncation at a stop token or the length limit; drafted: draft tokens they
    verified (the roots not counted); attempts[d] / accepts[d]: how often verification
    reached a node at depth d with children, and accepted one of them. seconds: the whole
    call; prefill_seconds: its part up to the first new token (the target's prefill and the
    draft's pass over the prompt), which drafting cannot shorten.
    """

    tokens: list[int]
    prompt_tokens: int
    rounds: int = 0
    verified: int = 0
    drafted: int = 0
    attempts: list[int] = field(default_factory=list)
    accepts: list[int] = field(default_factory=list)
    seconds: float = 0.0
    prefill_seconds: float = 0.0
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
    ``lean``: the target path (see the module docstring); a lean draft keeps its matrices in
    float16 where the CPU's few-row kernel reads them (:class:`Drafter`'s ``half``).
    ``path_note`` says why the lean forward is not used when it was wanted and the model did
    not allow it. ``compile``: run the lean forward's layers through ``torch.compile``
    (minutes of compiling on a small CPU; see benchmarks/decode.py for whether it pays).
    """

    def __init__(
        self,
        target: Target,
        draft: Eagle3Draft | None = None,
        shape: TreeShape | None = None,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        lean: bool | None = None,
        compile: bool = False,
    ) -> None:
        self.target = target
        self.shape = shape or TreeShape()
        self.sampling = sampling or SamplingParams()
        self.draft = draft if draft is not None and self.shape.drafting else None
        self.aux_layers = target.aux_layers
        self.drafter: Drafter | None = None
        if self.draft is not None:
            check_compatible(self.draft.config, target)
            self.aux_layers = draft_aux_layers(self.draft.config) or target.aux_layers
            self.draft_ids = self.draft.draft_ids()
            self._check_topk(self.shape)
            self.drafter = Drafter(self.draft, lean=lean is not False, half=True)
        if is_vision_config(target.model_config):
            self._check_vision_draft()
            self.path, self.path_note = vision_target_path(
                target.model, self.aux_layers, lean, compile
            )
        else:
            self.path, self.path_note = choose_target_path(
                target.model, self.aux_layers, lean, compile
            )
        self.max_positions: int = target.config.max_position_embeddings
        self.stop_ids = default_stop_ids(target)
        self.generator = torch.Generator(device=target.device).manual_seed(seed)

    # ------------------------------------------------------------------------- public

    def use_shape(self, shape: TreeShape) -> None:
        """Draft with ``shape`` from the next :meth:`generate` on: one engine (one copy of the
        target's fast weights) serves a sweep. It must have been built drafting."""
        if self.drafter is None or not shape.drafting:
            raise DecodeError(
                "use_shape switches between drafting shapes of an engine built with a draft; "
                "decode without drafting with an engine built so (draft=None or num_steps=0)"
            )
        self._check_topk(shape)
        self.shape = shape

    def _check_topk(self, shape: TreeShape) -> None:
        if shape.topk > self.draft_ids.numel():
            raise DecodeError(
                f"topk {shape.topk} exceeds the draft vocabulary ({self.draft_ids.numel()} tokens)"
            )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int = 256,
        stop_ids: Collection[int] | None = None,
        images: ImageInputs | None = None,
    ) -> Generation:
        """Decode up to ``max_new_tokens`` after the prompt; stop after a stop token (default:
        the target's EOS ids) or when the target's positions run out. ``images``: the
        prompt's images, for a vision-language target."""
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
        self._reset(min(len(prompt) + max_new_tokens, self.max_positions))

        ids = torch.tensor(prompt, device=device)
        self._begin(ids, images)
        positions = torch.arange(len(prompt), device=device)
        logits, aux = self.path.forward(ids, positions, None, True, self.drafter is not None)
        token = int(sample(warp(logits, self.sampling), self.sampling.greedy, self.generator))
        result.tokens.append(token)
        hidden = None
        if self.drafter is not None:
            hidden = self.drafter.extend(aux, torch.tensor([*prompt[1:], token], device=device), 0)
        result.prefill_seconds = time.perf_counter() - start

        result.stop = stop_reason(result.tokens, stops, max_new_tokens)
        while not result.stop:
            committed = len(prompt) + len(result.tokens)
            if committed >= self.max_positions:
                result.stop = "max_positions"
                break
            # Nodes at depth d sit at position committed - 1 + d, which must stay in range.
            depth = min(steps, self.max_positions - 1 - committed)
            tree = self._draft_tree(hidden, token, committed - 2, depth)
            path, token, aux = self._verify(tree, committed - 1)
            self._count(result, tree, path)
            new = [tree.tokens[i] for i in path] + [token]
            if self.drafter is not None:
                hidden = self.drafter.extend(aux, torch.tensor(new, device=device), committed - 1)
            for t in new:
                result.tokens.append(t)
                result.stop = stop_reason(result.tokens, stops, max_new_tokens)
                if result.stop:
                    break
        result.seconds = time.perf_counter() - start
        return result

    def _check_vision_draft(self) -> None:
        """A VL target's draft must rotate as its language model does (M-RoPE)."""
        mrope = (getattr(self.target.config, "rope_parameters", None) or {}).get("mrope_section")
        if self.draft is not None and mrope and self.draft.mrope_section is None:
            raise DecodeError(
                "the target rotates by M-RoPE positions (mrope_section "
                f"{mrope}) and the draft has no mrope_section in its rope parameters: use a "
                "draft trained for this target"
            )

    def _begin(self, ids: Tensor, images: ImageInputs | None) -> None:
        """Give the target path and the draft the prompt's images and positions."""
        if not isinstance(self.path, VisionTargetPath):
            if images is not None:
                raise DecodeError(f"{self.target.path} is not a vision-language target: no images")
            return
        positions = prompt_positions(self.target.model, ids, images)
        self.path.begin(positions, images)
        if self.drafter is not None and self.drafter.draft.mrope_section is not None:
            self.drafter.begin(positions)

    def _reset(self, committed: int) -> None:
        """Empty caches with room for ``committed`` entries and one round's tree."""
        self.path.reset()
        self.path.reserve(committed + self.shape.draft_tokens)
        if self.drafter is not None:
            self.drafter.reset()
            self.drafter.reserve(committed + self.shape.candidates)

    # ------------------------------------------------------------------------- target

    def _verify(self, tree: DraftTree, root_position: int) -> tuple[list[int], int, Tensor | None]:
        """One target forward over the tree; returns the accepted path (node indices), the
        token after it, and the aux states of the root and the path (the new draft inputs)."""
        device = self.target.device
        prefix = self.path.length
        ids = torch.tensor(tree.tokens, device=device)
        positions = root_position + torch.tensor(tree.depths, device=device)
        mask = None if is_chain(tree.parents) else ancestor_mask(tree.parents).to(device)
        logits, aux = self.path.forward(ids, positions, mask, False, self.drafter is not None)
        if self.sampling.greedy:
            path, token = greedy_walk(logits.argmax(-1).tolist(), tree.tokens, tree.parents)
        else:
            proposal = None if tree.proposal is None else tree.proposal[None]
            verdict = verify_tree(
                warp(logits, self.sampling)[None],
                ids[None],
                tree.parents,
                proposal,
                False,
                self.generator,
            )
            path = verdict.path[0, : int(verdict.accepted[0])].tolist()
            token = int(verdict.token[0])
        keep = torch.tensor([0, *path], device=device)
        self.path.compact(prefix, keep)
        return path, token, None if aux is None else aux[keep]

    # ------------------------------------------------------------------------- draft

    def _draft_tree(self, hidden: Tensor | None, root: int, base: int, depth: int) -> DraftTree:
        """Draft up to ``depth`` levels below ``root``; ``base`` is the last committed index.
        Levels whose every gate falls below ``shape.min_prob`` end the drafting."""
        drafter = self.drafter
        alone = DraftTree(tokens=[root], parents=[-1], depths=[0])
        if drafter is None or hidden is None or depth == 0:
            return alone
        topk = self.shape.topk
        gated = self.shape.min_prob > 0  # else no gate is read: every candidate passes
        floor = math.log(self.shape.min_prob) if gated else -math.inf
        device = hidden.device
        # Candidates, level by level: token (target id), cumulative score, gate, parent (-1: root).
        tokens: list[Tensor] = []
        scores: list[Tensor] = []
        gates: list[Tensor] = []
        parents: list[Tensor] = []
        depths: list[Tensor] = []
        proposals: list[Tensor] = []  # sampled chains only
        children, child_scores, gate, q = self._children(
            drafter.logits(hidden[None]), hidden.new_zeros(1)
        )
        if gated and float(gate.max()) < floor:
            return alone
        tokens.append(children[0])
        scores.append(child_scores[0])
        gates.append(gate[0])
        parents.append(torch.full((topk,), -1, device=device))
        depths.append(torch.ones(topk, dtype=torch.long, device=device))
        if q is not None:
            proposals.append(q)
        frontier = torch.arange(topk, device=device)  # candidate ids
        frontier_hidden = hidden.expand(topk, -1)
        visible = torch.zeros(topk, 0, dtype=torch.bool, device=device)  # speculative keys seen
        count = topk
        all_tokens = tokens[0]
        all_scores = scores[0]
        for level in range(2, depth + 1):
            width = frontier.numel()
            out = drafter.tree_step(
                frontier_hidden, all_tokens[frontier], base + level - 1, visible
            )
            children, child_scores, gate, q = self._children(
                drafter.logits(out), all_scores[frontier]
            )
            if gated and float(gate.max()) < floor:
                break
            tokens.append(children.flatten())
            scores.append(child_scores.flatten())
            gates.append(gate.flatten())
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
        passed = int((torch.cat(gates) >= floor).sum()) if gated else all_tokens.numel()
        return self._assemble(root, all_tokens, all_scores, passed, parents, depths, proposals)

    def _children(
        self, logits: Tensor, base_scores: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Children of each of F nodes from their draft logits [F, Vd].

        Returns target ids [F, k], cumulative scores [F, k] (parent score + draft log-prob),
        gates [F, k] (what ``shape.min_prob`` is held against) and, for sampled chains, the
        proposal each child was drawn from over the target vocab [F, V] (zero outside the
        draft vocab). A deterministic child's gate is its score. A sampled child's is its
        parent's score plus the draft's largest log-prob: whether it is drafted must not
        depend on which token was drawn, or the verify would accept from a proposal other
        than ``q``. Along any path gates never rise, so the nodes that pass hang together."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        if self.shape.topk == 1 and not self.sampling.greedy:
            q_draft = warp(logits, self.sampling)
            picked = sample(q_draft, False, self.generator)[:, None]
            q = q_draft.new_zeros(q_draft.shape[0], self.target.vocab_size)
            q[:, self.draft_ids] = q_draft
            gates = base_scores[:, None] + logp.max(dim=-1, keepdim=True).values
        else:
            picked = logp.topk(self.shape.topk, dim=-1).indices
            q = None
        scores = base_scores[:, None] + logp.gather(1, picked)
        return self.draft_ids[picked], scores, scores if q is None else gates, q

    def _assemble(
        self,
        root: int,
        tokens: Tensor,
        scores: Tensor,
        passed: int,
        parents: list[Tensor],
        depths: list[Tensor],
        proposals: list[Tensor],
    ) -> DraftTree:
        """Keep the best candidates (at most the ``passed`` whose gates reach
        ``shape.min_prob``: the best by score) and renumber them as tree nodes 1..M under the
        root."""
        parent_of = torch.cat(parents).tolist()
        depth_of = torch.cat(depths)
        budget = min(self.shape.draft_tokens - 1, tokens.numel(), passed)
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
        result.drafted += len(tree.tokens) - 1
        has_children = {p for p in tree.parents if p >= 0}
        node = 0
        for depth in range(len(path) + 1):
            if depth < len(path):
                result.attempts[depth] += 1
                result.accepts[depth] += 1
                node = path[depth]
            elif node in has_children:
                result.attempts[depth] += 1
