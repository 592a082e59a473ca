"""Target-side probabilities and lossless verification of a draft tree, as pure tensor functions.

Everything here takes a leading batch dimension of independent trials. The engine calls it
with B = 1; the statistical tests call it with B = 10^5 to check losslessness directly.

Verification scheme (SpecInfer's multi-draft rejection sampling, as EAGLE uses it):

* Start at the root with r = p(root), the target's warped distribution there.
* Try the node's children in order. A child with token x, proposed from distribution q, is
  accepted with probability min(1, r(x) / q(x)); on rejection r <- norm(max(r - q, 0)) and the
  next sibling is tried. An accepted child becomes the current node and r is reset to the
  target's distribution at that node.
* When no child is accepted (or the node is a leaf) one token is sampled from r: the
  correction token after a rejection, the bonus token after a fully accepted path.

Each sibling is one ordinary rejection-sampling step from r with proposal q, so by the
standard lemma the token leaving a node is distributed exactly as r, hence as p; children
accepted further down carry on with the exact target distribution at that node. This needs
the i-th sibling's token to be distributed as its q *given everything tried before it*:

* chains (one child per node) sample each token from the draft's warped distribution q;
* trees pick children deterministically (the draft's top-k, then pruning by cumulative
  score): given the prefix the token is fixed, so its proposal is the point mass q = delta_x,
  acceptance is r(x) and the residual is r with x removed, renormalised. Pruning and
  sibling order may then depend on anything the draft computes without breaking the proof.
  (Sampling tree children from q instead would not survive score-based pruning: a child kept
  because it scored well is no longer distributed as q.)

Greedy decoding is the same walk with one-hot target distributions: a child is accepted iff
it is the target's argmax, and the token after the walk is that argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from draftforge.decode.errors import DecodeError


@dataclass(frozen=True)
class SamplingParams:
    """How the target samples: temperature 0 is greedy; top_k 0 and top_p 1 disable them."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise DecodeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DecodeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DecodeError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp(logits: Tensor, params: SamplingParams) -> Tensor:
    """[..., V] logits -> [..., V] probabilities the target samples from.

    Same order and semantics as transformers' generate: temperature, then top-k, then top-p
    (a token is dropped when the tokens more likely than it already hold >= top_p mass).
    Greedy gives a one-hot at the first argmax, as torch.argmax and generate do.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, greedy: bool, generator: torch.Generator | None = None) -> Tensor:
    """[B, V] -> [B] one token per row (argmax when greedy)."""
    if greedy:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def children_table(parents: list[int]) -> Tensor:
    """[T, K] children of each node in the order they are tried (-1 pads); node 0 is the root
    and every other node's parent comes before it."""
    kids: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents):
        if node == 0:
            continue
        if not 0 <= parent < node:
            raise DecodeError(f"node {node} has parent {parent}: parents must precede children")
        kids[parent].append(node)
    width = max(1, *(len(k) for k in kids))
    return torch.tensor([k + [-1] * (width - len(k)) for k in kids], dtype=torch.long)


def tree_depth(parents: list[int]) -> int:
    depth = [0] * len(parents)
    for node in range(1, len(parents)):
        depth[node] = depth[parents[node]] + 1
    return max(depth)


@dataclass
class Verdict:
    """Outcome of verifying one tree per trial.

    path [B, D]: accepted nodes by depth (-1 after the last one); accepted [B]: how many;
    token [B]: the correction or bonus token sampled after the path.
    """

    path: Tensor
    accepted: Tensor
    token: Tensor


def verify_tree(
    p: Tensor,
    tokens: Tensor,
    parents: list[int],
    proposal: Tensor | None,
    greedy: bool,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Walk the tree by sibling-by-sibling rejection sampling (see the module docstring).

    p [B, T, V]: the target's warped distribution at each node (node 0 = root); tokens [B, T]
    node tokens (the root's is unused); parents [T] shared topology; proposal [B, T, V]: the
    distribution each node's token was drawn from, or None for deterministic children
    (point-mass proposals).
    """
    b = p.shape[0]
    rows = torch.arange(b, device=p.device)
    kids = children_table(parents).to(p.device)  # [T, K]
    depth = tree_depth(parents)
    current = torch.zeros(b, dtype=torch.long, device=p.device)
    residual = p[:, 0]
    walking = torch.ones(b, dtype=torch.bool, device=p.device)
    path = torch.full((b, max(depth, 1)), -1, dtype=torch.long, device=p.device)
    for level in range(depth):
        moved = torch.zeros_like(walking)
        for slot in range(kids.shape[1]):
            child = kids[current, slot]
            trying = walking & ~moved & (child >= 0)
            node = child.clamp(min=0)
            x = tokens[rows, node]
            p_x = residual.gather(1, x[:, None])[:, 0]
            if proposal is None:
                accept_prob = p_x
                rejected_residual = residual.scatter(1, x[:, None], 0.0)
            else:
                q = proposal[rows, node]
                q_x = q.gather(1, x[:, None])[:, 0]
                # q(x) > 0 for a token drawn from q; the clamp only keeps padded rows finite.
                accept_prob = (p_x / q_x.clamp(min=torch.finfo(q.dtype).tiny)).clamp(max=1)
                rejected_residual = (residual - q).clamp(min=0)
            accept = trying & (torch.rand(b, generator=generator, device=p.device) < accept_prob)
            mass = rejected_residual.sum(-1, keepdim=True)
            # Zero residual mass means r <= q everywhere, i.e. r == q: then acceptance was
            # certain and no rejection can reach here (rounding aside, where r is kept).
            rejected_residual = torch.where(mass > 0, rejected_residual / mass, residual)
            residual = torch.where((trying & ~accept)[:, None], rejected_residual, residual)
            path[:, level] = torch.where(accept, child, path[:, level])
            current = torch.where(accept, child, current)
            moved |= accept
        residual = torch.where(moved[:, None], p[rows, current], residual)
        walking &= moved
    accepted = (path >= 0).sum(-1)
    return Verdict(path=path, accepted=accepted, token=sample(residual, greedy, generator))


def greedy_walk(best: list[int], tokens: list[int], parents: list[int]) -> tuple[list[int], int]:
    """:func:`verify_tree` at temperature 0, on plain lists: the accepted path and the token
    after it.

    ``best[i]`` is the target's argmax at node i. From the root, the walk moves to the first
    child (in order) whose token is the argmax at the current node, and stops where none is;
    the token after it is the argmax there. No tensor work per node: a verify forward's
    bookkeeping stays small next to the forward."""
    children: list[list[int]] = [[] for _ in parents]
    for node in range(1, len(parents)):
        children[parents[node]].append(node)
    path: list[int] = []
    node = 0
    while True:
        step = next((c for c in children[node] if tokens[c] == best[node]), None)
        if step is None:
            return path, best[node]
        path.append(step)
        node = step
