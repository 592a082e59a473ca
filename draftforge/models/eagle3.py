"""The EAGLE-3 draft: fc over three target layers, one Llama decoder layer, a draft-vocab head.

Parameter names are exactly the ones SGLang's ``LlamaForCausalLMEagle3`` reads (``fc``,
``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``), so export is a key check, not a
rename. Norm, MLP and rotary embedding are transformers' own Llama modules, which gives every
RoPE scaling type Llama/Qwen targets use (default, linear, dynamic, llama3, yarn).

A vision-language target with M-RoPE (Qwen2.5-VL: ``mrope_section`` in its text config's
RoPE parameters) places tokens with 3-row position ids (temporal, height, width). The draft
then rotates as that language model does: the same positions, each frequency pair taking the
row its section names. SGLang's ``LlamaForCausalLMEagle3`` does the same for such drafts (a
``mrope_section`` in the draft config switches it to the target's ``mrope_positions``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from draftforge import ttt
from draftforge.ttt_attention import ttt_attention

# attend(q [B,Hq,T,D], k [B,Hkv,T,D], v [B,Hkv,T,D]) -> [B,Hq,T,D]: the caller decides which
# keys a query sees (TTT pattern in training, KV cache when decoding).
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]
# The TTT attention at step k: (q, k0, v0, k_diag, v_diag, *, segment_ids) -> [B,Hq,T,D]; see
# draftforge.ttt_attention. Other implementations plug in here for benchmarks.
TTTAttention = Callable[..., Tensor]
SGLANG_ARCH = "LlamaForCausalLMEagle3"  # SGLang's class for an EAGLE-3 draft, named in our config


class DraftShapeError(ValueError):
    """The draft cannot be built for this target; the message names the field."""


def _rope_parameters(target_config: object) -> dict:
    rope = getattr(target_config, "rope_parameters", None) or {
        "rope_type": "default",
        "rope_theta": 10000.0,
    }
    if "rope_type" not in rope:  # per-layer-type parameters (e.g. Gemma-3): use full attention's
        rope = rope.get("full_attention", next(iter(rope.values())))
    rope = dict(rope)
    if str(getattr(target_config, "model_type", "")).startswith("qwen3_vl"):
        # transformers' Qwen3-VL interleaves its M-RoPE rows whatever the config says
        rope["mrope_interleaved"] = True
    return rope


def eagle3_config(
    layer: LlamaConfig,
    *,
    draft_vocab_size: int,
    target_hidden_size: int,
    aux_layers: list[int] | None,
) -> LlamaConfig:
    """The draft's config: the one decoder layer ``layer`` describes, no biases, an untied head,
    and EAGLE-3's fields in the names SGLang's config reader uses."""
    return LlamaConfig(
        architectures=[SGLANG_ARCH],
        hidden_size=layer.hidden_size,
        intermediate_size=layer.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=layer.num_attention_heads,
        num_key_value_heads=layer.num_key_value_heads,
        head_dim=layer.head_dim,
        hidden_act=layer.hidden_act,
        rms_norm_eps=layer.rms_norm_eps,
        max_position_embeddings=layer.max_position_embeddings,
        rope_parameters=dict(layer.rope_parameters),
        vocab_size=layer.vocab_size,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        draft_vocab_size=draft_vocab_size,
        target_hidden_size=target_hidden_size,
        eagle_config={"eagle_aux_hidden_state_layer_ids": aux_layers},
    )


def eagle3_config_for_target(
    target_config: object,
    aux_layers: list[int],
    draft_vocab_size: int,
    intermediate_size: int | None = None,
) -> LlamaConfig:
    """A new draft's config, derived from the target's: same width, heads, norm eps and RoPE."""
    hidden = target_config.hidden_size
    heads = target_config.num_attention_heads
    head_dim = getattr(target_config, "head_dim", None) or hidden // heads
    if getattr(target_config, "kv_lora_rank", None):
        head_dim = hidden // heads  # an MLA target's head dims are not a Llama layer's
    vocab = target_config.vocab_size
    if draft_vocab_size < 1:
        raise DraftShapeError(f"draft.draft_vocab_size must be positive, got {draft_vocab_size}")
    layer = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate_size or target_config.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(target_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_act="silu",
        rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-6),
        max_position_embeddings=target_config.max_position_embeddings,
        rope_parameters=_rope_parameters(target_config),
        vocab_size=vocab,
    )
    return eagle3_config(
        layer,
        draft_vocab_size=min(draft_vocab_size, vocab),
        target_hidden_size=hidden,
        aux_layers=list(aux_layers),
    )


def mrope_tables(table: Tensor, section: list[int], interleaved: bool = False) -> Tensor:
    """One rotary table ``[B, T, D]`` from per-row tables ``[3, B, T, D]`` of 3-row positions:
    frequency pair j reads row r when j lies in ``section[r]`` (pairs counted over half the
    head), in both halves of the head, which rotate-half RoPE lays out twice. Interleaved
    (Qwen3-VL): pair j reads row ``j % 3`` while that row has pairs of its section left
    (``j < 3 * section[r]``), else the temporal row."""
    pairs = torch.repeat_interleave(
        torch.arange(len(section)), torch.tensor(section, dtype=torch.long)
    )
    if interleaved:
        j = torch.arange(len(pairs))
        row = j % 3
        pairs = torch.where(j < 3 * torch.tensor(section)[row], row, 0)
    pairs = pairs.to(table.device)
    index = torch.cat([pairs, pairs]).expand(1, *table.shape[1:])
    return table.gather(0, index)[0]


class Eagle3Attention(nn.Module):
    """Attention over ``[embed ; hidden]`` (width 2H); who attends to whom is ``attend``'s job."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        width = 2 * config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = attend(q, k, v)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Eagle3DecoderLayer(nn.Module):
    """One Llama layer whose attention reads cat[input_layernorm(embed), hidden_norm(h)] and
    whose residual is the un-normalised h."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, embeds: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, attend: Attend
    ) -> Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, cos, sin, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


@dataclass
class TTTOutput:
    """loss: the weighted, normalised objective (differentiable); ce_sums / correct: [K]
    per-step sums over this micro-batch (detached), for logging against global counts."""

    loss: Tensor
    ce_sums: Tensor
    correct: Tensor


class Eagle3Draft(nn.Module):
    """EAGLE-3 draft model; ``forward`` runs the whole K-step TTT unroll and its loss."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.embed_tokens.weight.requires_grad_(False)  # the target's, frozen
        self.fc = nn.Linear(3 * config.target_hidden_size, hidden, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        rope = config.rope_parameters or {}
        self.mrope_section: list[int] | None = rope.get("mrope_section")
        self.mrope_interleaved = bool(rope.get("mrope_interleaved", False))
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.set_vocab(torch.arange(config.draft_vocab_size))

    def set_vocab(self, draft_ids: Tensor) -> None:
        """Set the draft vocabulary from its sorted target ids: d2t[i] = id_i - i, t2d = mask."""
        draft_ids = draft_ids.to(self.d2t.device)
        self.d2t.copy_(draft_ids - torch.arange(draft_ids.numel(), device=draft_ids.device))
        self.t2d.zero_()
        self.t2d[draft_ids] = True

    def draft_ids(self) -> Tensor:
        """[Vd] target ids of the draft vocabulary."""
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def load_target_embedding(self, weight: Tensor) -> None:
        self.embed_tokens.weight.data.copy_(weight)

    def load_target_head(self, weight: Tensor) -> None:
        """Start the output head from the target's head [V, H]: its rows of the draft vocab."""
        self.lm_head.weight.data.copy_(weight[self.draft_ids().to(weight.device)])

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden))

    def step(
        self, hidden: Tensor, input_ids: Tensor, position_ids: Tensor, attend: Attend
    ) -> Tensor:
        """One draft step: hidden [B,T,H] and the next tokens' ids -> new hidden [B,T,H]."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        cos, sin = self.rotary(hidden, position_ids)
        return self.midlayer(embeds, hidden, cos, sin, attend)

    def rotary(self, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin ``[B, T, D]`` at ``position_ids``: ``[B, T]``, or ``[3, B, T]`` M-RoPE
        rows for a draft whose target rotates by ``mrope_section``."""
        if position_ids.dim() == 2:
            return self.rotary_emb(hidden, position_ids)
        if self.mrope_section is None:
            raise DraftShapeError("3-row position ids need a draft with rope mrope_section")
        cos, sin = self.rotary_emb(hidden, position_ids.flatten(0, 1))
        rows = (*position_ids.shape, -1)
        return (
            mrope_tables(cos.view(rows), self.mrope_section, self.mrope_interleaved),
            mrope_tables(sin.view(rows), self.mrope_section, self.mrope_interleaved),
        )

    def forward(
        self,
        aux: Tensor,
        input_ids: Tensor,
        position_ids: Tensor,
        loss_mask: Tensor,
        teacher_probs: Tensor,
        teacher_argmax: Tensor,
        norms: Tensor,
        segment_ids: Tensor | None = None,
        *,
        steps: int = 7,
        decay: float = 0.8,
        attention: TTTAttention = ttt_attention,
        head_memory_mb: int = 512,
    ) -> TTTOutput:
        """The TTT unroll on a packed batch.

        aux [B,T,3Ht] target aux states; input_ids, position_ids (restarting per sample),
        loss_mask (token t supervised), teacher_argmax [B,T]; teacher_probs [B,T,Vd] the
        target's distribution at each position; norms [K] the global per-step supervised
        counts the loss of step k is divided by; segment_ids [B,T] sample of each index.
        attention: the TTT attention (benchmarks swap in baselines); head_memory_mb: above
        this many MiB for all steps' logit gradients, they are recomputed in backward.
        """
        t = input_ids.shape[1]
        hidden = self.fc(aux)
        keys: list[Tensor] = []  # step-0 keys/values, then each later step's (the diagonal)
        values: list[Tensor] = []

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            keys.append(k)
            values.append(v)
            return attention(q, keys[0], values[0], keys[1:], values[1:], segment_ids=segment_ids)

        # Keep each step's d(loss)/d(logits) when all K of them fit the budget (no
        # recomputation in backward); past it, recompute them (long sequences, big vocabs).
        # Without autograd (evaluation) there is no backward to keep anything for.
        head_bytes = steps * input_ids.numel() * self.lm_head.out_features * aux.element_size()
        keep_head_grad = torch.is_grad_enabled() and head_bytes <= head_memory_mb * 2**20
        loss = aux.new_zeros((), dtype=torch.float32)
        ce_sums, correct = [], []
        for k, weight in enumerate(ttt.step_weights(steps, decay)):
            ids = ttt.shift_left(input_ids, 1 + k)
            hidden = self.step(hidden, ids, position_ids + k, attend)
            n = max(t - 1 - k, 0)  # indices whose teacher position t+1+k exists
            mask = ttt.step_mask(loss_mask, segment_ids, k)[:, :n]
            ce_sum, right = ttt.step_loss_terms(
                self.norm(hidden[:, :n]),
                self.lm_head.weight,
                teacher_probs[:, 1 + k :],
                teacher_argmax[:, 1 + k :],
                mask,
                self.d2t,
                self.t2d,
                keep_grad=keep_head_grad,
            )
            loss = loss + weight * ce_sum / norms[k].clamp(min=1)
            ce_sums.append(ce_sum.detach())
            correct.append(right)
        return TTTOutput(loss=loss, ce_sums=torch.stack(ce_sums), correct=torch.stack(correct))
