"""The draft's side of decoding: its KV cache and its steps (docs/architecture.md alignment).

The cache is one preallocated tensor ``[2, Hkv, capacity, D]`` written in place (it grows by
doubling). Entries ``[0, length)`` are the committed indices; during a round each tree level
writes its speculative keys right after them, level by level, so a level attends over one
slice of the cache with a mask (the committed part, its ancestors' speculative keys, itself).
The next extension simply overwrites the speculative region.

``lean=True`` computes the draft's decoder layer here from its weights, matrices served by the
same fast matmul as the lean target's (:mod:`draftforge.decode.fastlinear`) and attends with
the few-row kernel's attention where it serves (:mod:`draftforge.decode.skinny`); ``lean=False``
runs the draft module's own ``step`` (the code training runs) with this cache as its
attention (SDPA). ``half`` (lean, float32 on CPU where the few-row kernel reads float16) stores
the draft's matrices in float16: between two target forwards its weights are no longer in the
CPU's caches, so a draft step is bound by reading them, and half the bytes cost about half the
time. Proposals move by the rounding; what decoding emits does not (the target verifies every
token).

For a vision-language target with M-RoPE the draft rotates by the target's 3-row positions
(:meth:`Drafter.begin`): the prompt's rows, then ``index + delta`` on all rows, exactly the
positions training gave it (:mod:`draftforge.decode.vision`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from draftforge.decode import skinny
from draftforge.decode.fastlinear import Projection
from draftforge.decode.lean import rms_norm, rope_tables, rotate
from draftforge.models.eagle3 import Eagle3Draft

if TYPE_CHECKING:
    from draftforge.decode.vision import PromptPositions

# attend(q [Hq,T,D], k [Hkv,T,D], v [Hkv,T,D]) -> [Hq,T,D]
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class _Weights:
    """The draft's weights as the lean step reads them."""

    fc: Projection
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    head: Projection
    input_norm: Tensor
    hidden_norm: Tensor
    post_norm: Tensor
    norm: Tensor
    eps: float

    @classmethod
    def of(cls, draft: Eagle3Draft, half: bool) -> _Weights:
        layer = draft.midlayer
        attn, mlp = layer.self_attn, layer.mlp

        def projection(*linears: nn.Linear) -> Projection:
            return Projection(linears, fast=True, half=half)

        return cls(
            fc=projection(draft.fc),
            qkv=projection(attn.q_proj, attn.k_proj, attn.v_proj),
            o=projection(attn.o_proj),
            gate_up=projection(mlp.gate_proj, mlp.up_proj),
            down=projection(mlp.down_proj),
            head=projection(draft.lm_head),
            input_norm=layer.input_layernorm.weight.detach(),
            hidden_norm=layer.hidden_norm.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            norm=draft.norm.weight.detach(),
            eps=draft.config.rms_norm_eps,
        )


class Drafter:
    """An EAGLE-3 draft with a preallocated KV cache, one sequence at a time."""

    def __init__(
        self, draft: Eagle3Draft, lean: bool, capacity: int = 256, half: bool = False
    ) -> None:
        self.draft = draft
        config = draft.config
        self.weights = _Weights.of(draft, half) if lean else None
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.kv = draft.fc.weight.new_empty(2, self.kv_heads, 0, self.head_dim)
        self.attention_kernel = lean and skinny.attention_usable(
            self.kv.dtype, self.kv.device, self.head_dim
        )
        self.length = 0
        self.positions: PromptPositions | None = None
        self.reserve(capacity)

    @property
    def capacity(self) -> int:
        return self.kv.shape[2]

    def reserve(self, entries: int) -> None:
        """Room for ``entries`` entries (doubling), keeping everything written so far."""
        if entries <= self.capacity:
            return
        kv = self.kv.new_empty(2, self.kv_heads, max(entries, 2 * self.capacity), self.head_dim)
        kv[:, :, : self.capacity] = self.kv
        self.kv = kv

    def reset(self) -> None:
        self.length = 0
        self.positions = None

    def begin(self, positions: PromptPositions) -> None:
        """Rotate by a VL target's 3-row positions (the draft has an ``mrope_section``) from
        now until the next reset."""
        self.positions = positions

    def logits(self, hidden: Tensor) -> Tensor:
        """[F, H] -> draft-vocab logits [F, Vd]."""
        w = self.weights
        if w is None:
            return self.draft.logits(hidden)
        return w.head(rms_norm(hidden, w.norm, w.eps))

    @torch.no_grad()
    def extend(self, aux: Tensor, next_ids: Tensor, start: int) -> Tensor:
        """Commit indices start.. from real target features (aux [T, 3H] of positions start..,
        ``next_ids`` [T] the tokens one position later); return the last index's output
        hidden [H], which proposes the next tokens."""
        aux = aux.to(self.kv.dtype)
        hidden = self.draft.fc(aux) if self.weights is None else self.weights.fc(aux)
        n = next_ids.numel()
        prefix = self.length

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self._attend(q, k, v, prefix, prefix, None)

        positions = torch.arange(start, start + n, device=aux.device)
        out = self._step(hidden, next_ids, positions, attend)
        self.length = prefix + n
        return out[-1]

    @torch.no_grad()
    def tree_step(self, hidden: Tensor, ids: Tensor, position: int, seen: Tensor) -> Tensor:
        """One draft step for F frontier nodes (hidden [F, H], ids [F], all at RoPE
        ``position``); each sees the committed cache, the speculative keys ``seen`` [F, S]
        marks (its ancestors) and itself. S counts the speculative keys of this round so far:
        earlier levels wrote them at [length, length + S), in order; this one writes after."""
        width = ids.numel()
        own = torch.cat([seen, torch.eye(width, dtype=torch.bool, device=ids.device)], dim=1)
        slot = self.length + seen.shape[1]

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self._attend(q, k, v, slot, self.length, own)

        positions = torch.full((width,), position, device=ids.device)
        return self._step(hidden, ids, positions, attend)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, slot: int, prefix: int, own: Tensor | None
    ) -> Tensor:
        """Write k/v [Hkv, T, D] at ``slot`` and attend q [Hq, T, D] over the cache up to them:
        every row sees entries [0, prefix), and entries [prefix, slot + T) as ``own`` [T,
        slot + T - prefix] says (None: causal, ``slot == prefix``)."""
        t = k.shape[1]
        end = slot + t
        self.reserve(end)
        self.kv[0, :, slot:end] = k
        self.kv[1, :, slot:end] = v
        if self.attention_kernel:
            rows = q.transpose(0, 1)
            if rows.stride()[1:] != (self.head_dim, 1):
                rows = rows.contiguous()
            scale = self.head_dim**-0.5
            out = skinny.attend(rows, self.kv[0], self.kv[1], prefix, own, scale)
            return out.view(t, self.heads, self.head_dim).transpose(0, 1)
        mask = skinny.sdpa_mask(prefix, own, t, q.device) if t > 1 or own is not None else None
        # 4-D operands: torch's CPU flash kernel serves them.
        return F.scaled_dot_product_attention(
            q[None],
            self.kv[None, 0, :, :end],
            self.kv[None, 1, :, :end],
            attn_mask=mask,
            enable_gqa=self.heads != self.kv_heads,
        )[0]

    def _step(self, hidden: Tensor, ids: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        """The draft layer on T rows: hidden [T, H], ids [T], positions [T] -> [T, H]."""
        w = self.weights
        rows = positions[None] if self.positions is None else self.positions.at(positions)[:, None]
        if w is None:
            return self.draft.step(
                hidden[None],
                ids[None],
                rows,
                lambda q, k, v: attend(q[0], k[0], v[0])[None],
            )[0]
        draft = self.draft
        t = ids.numel()
        embeds = F.embedding(ids, draft.embed_tokens.weight).to(hidden.dtype)
        if self.positions is None:
            cos, sin = rope_tables(draft.rotary_emb, hidden, positions)
        else:
            cos, sin = _signed_tables(*draft.rotary(hidden, rows))
        x = torch.cat(
            [rms_norm(embeds, w.input_norm, w.eps), rms_norm(hidden, w.hidden_norm, w.eps)], -1
        )
        qkv = w.qkv(x).view(t, -1, self.head_dim)
        heads = self.heads + self.kv_heads  # queries and keys rotated together
        q, k = rotate(qkv[:, :heads], cos, sin).split([self.heads, self.kv_heads], dim=1)
        out = attend(q.transpose(0, 1), k.transpose(0, 1), qkv[:, heads:].transpose(0, 1))
        h = hidden + w.o(out.transpose(0, 1).reshape(t, -1))
        gate, up = w.gate_up.split(rms_norm(h, w.post_norm, w.eps))
        return h + w.down(draft.midlayer.mlp.act_fn(gate) * up)


def _signed_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin [1, T, D] as :func:`~draftforge.decode.lean.rotate` takes them: [T, 1, D],
    the first half of sin negated."""
    half = sin.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos[0, :, None], signed[0, :, None]
