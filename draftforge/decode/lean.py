"""A lean forward of the standard dense decoder (Llama, Qwen2, Qwen3, Mistral without sliding
window) over a static KV cache: the decoding engine's target when the model fits.

Why: at batch 1 on a CPU a transformers forward spends much of its time outside the
arithmetic (cache objects, mask building, module calls), and its matmuls repack every weight
on every call (``benchmarks/decode.py`` prints both paths' step times). This forward reads the
HF model's own weights (matrices served by :mod:`draftforge.decode.fastlinear`, norms
and embedding as they are), calls the model's own rotary-embedding module (so every RoPE
scaling type stays right), and keeps K/V of all layers in one preallocated tensor
``[layers, 2, Hkv, capacity, D]`` written in place; it grows by doubling when a sequence
outruns it.

Which models: found by structure, not by name. The decoder layers must hold exactly the
attention (q/k/v/o linears, optionally per-head q/k RMS norms as Qwen3 has), a gated MLP and
the two RMS norms; the input embedding must be a plain ``nn.Embedding``, the head a linear;
every layer must be full attention. Because other families share these names with different
arithmetic (scaled embeddings, residual multipliers, ...), :func:`build_lean_target` then
checks the lean forward against the model's own on a few tokens (prefill, then a cached
continuation) and returns why not when they differ: the engine falls back to transformers.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from draftforge.decode import skinny
from draftforge.decode.fastlinear import Projection, fast_matmul
from draftforge.target import capture_layers, decoder_layers, decoder_module

_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
_QK_NORMS = {"q_norm", "k_norm"}
_MLP = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_LAYER = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' RMSNorm bit for bit: statistics in float32, then the weight."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def rope_tables(rotary: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and signed sin [T, 1, D] for :func:`rotate` from a model's own rotary embedding
    (whatever its scaling type) at ``positions`` [T]; ``x`` gives the dtype."""
    cos, sin = rotary(x, positions[None])
    half = sin.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos[0, :, None], signed[0, :, None]


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """RoPE as the Llama family applies it, ``x * cos + cat(-x2, x1) * sin``, bit for bit:
    cat(-x2, x1) * sin is cat(x2, x1) * cat(-sin1, sin2), and cat(x2, x1) is one roll."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _norm_eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if eps is not None else None


def lean_problem(model: nn.Module) -> str | None:
    """Why the lean forward cannot run ``model`` (structure only), or None."""
    name = type(model).__name__
    try:
        layers = decoder_layers(model)
        decoder = decoder_module(model)
    except Exception as err:  # no decoder layers found the usual ways
        return f"{name}: {err}"
    if type(model.get_input_embeddings()) is not nn.Embedding:
        return f"{name} scales or wraps its input embedding"
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        return f"{name} has no linear output head"
    if not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "norm"):
        return f"{name} has no shared rotary embedding or final norm"
    cache_layers = DynamicCache(config=model.config).layers
    if any(type(layer) is not DynamicLayer for layer in cache_layers):
        return f"{name} has sliding-window or linear-attention layers"
    for layer in layers:
        children = {n for n, _ in layer.named_children()}
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        if children != _LAYER or attn is None or mlp is None:
            return f"{name}'s decoder layers hold {sorted(children)}, not {sorted(_LAYER)}"
        parts = {n for n, _ in attn.named_children()}
        if not (parts == _ATTENTION or parts == _ATTENTION | _QK_NORMS):
            return f"{name}'s attention holds {sorted(parts)}"
        if not all(isinstance(getattr(attn, p), nn.Linear) for p in _ATTENTION):
            return f"{name}'s attention projections are not plain linears"
        if {n for n, _ in mlp.named_children()} != _MLP:
            return f"{name}'s MLP is not a gated MLP (gate/up/down)"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [getattr(attn, n) for n in sorted(parts & _QK_NORMS)]
        if any(_norm_eps(n) is None or not hasattr(n, "weight") for n in [*norms, decoder.norm]):
            return f"{name}'s norms are not RMS norms with a weight"
        if not hasattr(attn, "scaling") or not hasattr(attn, "head_dim"):
            return f"{name}'s attention has no scaling or head_dim"
    return None


@dataclass
class _Layer:
    """One decoder layer's weights as the lean forward reads them."""

    input_norm: Tensor
    input_eps: float
    post_norm: Tensor
    post_eps: float
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    act: Callable[[Tensor], Tensor]
    q_norm: Tensor | None
    k_norm: Tensor | None
    qk_eps: float
    scaling: float


def _layer(layer: nn.Module, fast: bool) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    return _Layer(
        input_norm=layer.input_layernorm.weight.detach(),
        input_eps=_norm_eps(layer.input_layernorm) or 0.0,
        post_norm=layer.post_attention_layernorm.weight.detach(),
        post_eps=_norm_eps(layer.post_attention_layernorm) or 0.0,
        qkv=Projection([attn.q_proj, attn.k_proj, attn.v_proj], fast),
        o=Projection([attn.o_proj], fast),
        gate_up=Projection([mlp.gate_proj, mlp.up_proj], fast),
        down=Projection([mlp.down_proj], fast),
        act=mlp.act_fn,
        q_norm=None if q_norm is None else q_norm.weight.detach(),
        k_norm=None if k_norm is None else k_norm.weight.detach(),
        qk_eps=(_norm_eps(q_norm) or 0.0) if q_norm is not None else 0.0,
        scaling=float(attn.scaling),
    )


# model -> fast matmul -> its layers and head as the lean forward reads them: every engine on
# one model shares one copy of its joined or prepacked matrices (a frozen target's weights do
# not change).
_PREPARED: weakref.WeakKeyDictionary[
    nn.Module, dict[str | None, tuple[list[_Layer], Projection]]
] = weakref.WeakKeyDictionary()


def _prepared(model: nn.Module, fast: bool) -> tuple[list[_Layer], Projection]:
    weight = model.get_input_embeddings().weight
    per_model = _PREPARED.setdefault(model, {})
    key = fast_matmul(weight.dtype, weight.device) if fast else None
    if key not in per_model:
        layers = [_layer(layer, fast) for layer in decoder_layers(model)]
        per_model[key] = (layers, Projection([model.get_output_embeddings()], fast))
    return per_model[key]


class LeanTarget:
    """The target's forward over a static KV cache (see the module docstring).

    ``forward`` appends T tokens (at any RoPE positions, seeing the whole cache plus the
    ``tree`` mask among themselves) and returns logits and the aux layers' outputs;
    ``compact`` keeps a prefix and chosen entries after it, moved into place.

    ``compile``: run each layer's projections and MLP through ``torch.compile`` (one graph
    serves every layer; the cache writes and attention stay eager). Inductor cannot take
    oneDNN-packed weights or the few-row kernel, so compiled layers use the model's weights
    with ``F.linear``. ``matmul`` says which matmul serves the projections (see
    :mod:`draftforge.decode.fastlinear`; None: ``F.linear``); ``attention_kernel`` whether the
    few-row kernel's attention serves (:mod:`draftforge.decode.skinny`), else torch's SDPA.
    """

    name = "lean"

    def __init__(
        self, model: nn.Module, aux_layers: list[int], capacity: int = 256, compile: bool = False
    ) -> None:
        config = model.config.get_text_config()
        decoder = decoder_module(model)
        weight = model.get_input_embeddings().weight
        self.compiled = compile
        if compile:
            self._project = torch.compile(self._project, dynamic=True)
            self._feed = torch.compile(self._feed, dynamic=True)
        self.layers, self.head = _prepared(model, fast=not compile)
        self.matmul = self.head.matmul
        self.embed = weight.detach()
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm.weight.detach()
        self.norm_eps = _norm_eps(decoder.norm) or 0.0
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.aux_layers = list(aux_layers)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = self.layers[0].qkv.sizes[0] // self.heads
        self.attention_kernel = skinny.attention_usable(weight.dtype, weight.device, self.head_dim)
        self.kv = weight.new_empty(len(self.layers), 2, self.kv_heads, 0, self.head_dim)
        self.length = 0
        self.reserve(capacity)

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    def reserve(self, entries: int) -> None:
        """Make room for ``entries`` cache entries (doubling), keeping what is cached."""
        if entries <= self.capacity:
            return
        capacity = max(entries, 2 * self.capacity)
        shape = (len(self.layers), 2, self.kv_heads, capacity, self.head_dim)
        kv = self.embed.new_empty(shape)
        if self.length:
            kv[:, :, :, : self.length] = self.kv[:, :, :, : self.length]
        self.kv = kv

    def reset(self) -> None:
        self.length = 0

    def compact(self, start: int, keep: Tensor) -> None:
        """Keep entries [0, start) and then ``start + keep``, in that order (all layers)."""
        end = start + keep.numel()
        self.kv[:, :, :, start:end] = self.kv[:, :, :, start + keep]
        self.length = end

    @torch.no_grad()
    def forward(
        self, ids: Tensor, positions: Tensor, tree: Tensor | None, last_only: bool, aux: bool
    ) -> tuple[Tensor, Tensor | None]:
        """ids/positions [T]; tree [T, T] bool (who sees whom among the new tokens; None: causal).

        Returns logits [T, V] (the last row only when ``last_only``) and, when ``aux``, the
        aux layers' outputs concatenated [T, len(aux_layers) * H]."""
        t = ids.numel()
        start = self.length
        self.reserve(start + t)
        x = F.embedding(ids, self.embed)
        cos, sin = rope_tables(self.rotary, x, positions)
        own = None if tree is None else tree.to(x.device)  # None: causal among the new tokens
        if self.attention_kernel and own is not None:
            own = own.to(torch.uint8).contiguous()  # as the kernel reads it, once for all layers
        elif not self.attention_kernel and t > 1:
            own = skinny.sdpa_mask(start, own, t, x.device)
        captured: dict[int, Tensor] = {}
        for index, layer in enumerate(self.layers):
            x = self._layer(layer, self.kv[index], x, cos, sin, own, start)
            if aux and index in self.aux_layers:
                captured[index] = x
        self.length = start + t
        if last_only:
            x = x[-1:]
        logits = self.head(rms_norm(x, self.norm, self.norm_eps))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if not aux:
            return logits, None
        return logits, torch.cat([captured[i] for i in self.aux_layers], dim=-1)

    def _layer(
        self,
        layer: _Layer,
        cache: Tensor,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        start: int,
    ) -> Tensor:
        """One decoder layer on T new rows. ``mask``: on the kernel path which new token sees
        which ([T, T], None: causal); else SDPA's whole mask [T, start + T] (None at T = 1)."""
        q, k, v = self._project(layer, x, cos, sin)
        end = start + x.shape[0]
        cache[0, :, start:end] = k.transpose(0, 1)
        cache[1, :, start:end] = v.transpose(0, 1)
        if self.attention_kernel:
            out = skinny.attend(q, cache[0], cache[1], start, mask, layer.scaling)
            return self._feed(layer, x, out)
        # 4-D operands: torch's CPU flash kernel serves them (3-D ones go to the math path).
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            cache[None, 0, :, :end],
            cache[None, 1, :, :end],
            attn_mask=mask,
            scale=layer.scaling,
            enable_gqa=self.heads != self.kv_heads,
        )[0]
        return self._feed(layer, x, out.transpose(0, 1).reshape(x.shape[0], -1))

    def _project(
        self, layer: _Layer, x: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries [T, Hq, D], keys and values [T, Hkv, D] of one layer, RoPE applied."""
        t, heads, kv_heads = x.shape[0], self.heads, self.kv_heads
        qkv = layer.qkv(rms_norm(x, layer.input_norm, layer.input_eps)).view(t, -1, self.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
            q = rotate(rms_norm(q, layer.q_norm, layer.qk_eps), cos, sin)
            k = rotate(rms_norm(k, layer.k_norm, layer.qk_eps), cos, sin)
        else:  # queries and keys rotated together
            q, k = rotate(qkv[:, : heads + kv_heads], cos, sin).split([heads, kv_heads], dim=1)
            v = qkv[:, heads + kv_heads :]
        return q, k, v

    def _feed(self, layer: _Layer, x: Tensor, attended: Tensor) -> Tensor:
        """The rest of the layer after attention ([T, Hq * D]): output projection, MLP."""
        x = x + layer.o(attended)
        gate, up = layer.gate_up.split(rms_norm(x, layer.post_norm, layer.post_eps))
        return x + layer.down(layer.act(gate) * up)


# The probe's tolerance on max |lean - model| / max(|model|, 1), per dtype: summation order
# differs (fused projections, prepacked matmuls), the arithmetic must not.
_PROBE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-3}


def build_lean_target(
    model: nn.Module, aux_layers: list[int], compile: bool = False
) -> LeanTarget | str:
    """The lean forward of ``model``, or why it cannot stand in for the model's own."""
    problem = lean_problem(model)
    if problem is not None:
        return problem
    lean = LeanTarget(model, aux_layers, capacity=8, compile=compile)
    problem = _disagreement(lean, model)
    lean.reset()
    return lean if problem is None else problem


@torch.no_grad()
def _disagreement(lean: LeanTarget, model: nn.Module) -> str | None:
    """Where the lean forward differs from the model's own on 4 tokens and then 2 more over
    the cache, or None."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lean.embed.shape[0], (6,), generator=gen).to(lean.embed.device)
    positions = torch.arange(6, device=ids.device)
    cache = DynamicCache(config=model.config)
    for part in (slice(0, 4), slice(4, 6)):
        with capture_layers(model, lean.aux_layers) as captured, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
            out = model(
                input_ids=ids[None, part], position_ids=positions[None, part], past_key_values=cache
            )
        want = {"logits": out.logits[0], "aux": torch.cat(captured, dim=-1)[0]}
        logits, aux = lean.forward(ids[part], positions[part], None, False, aux=True)
        for what, got in (("logits", logits), ("aux", aux)):
            expected = want[what]
            scale = expected.abs().max().clamp(min=1)
            error = float((got.to(expected.dtype) - expected).abs().max() / scale)
            if not error <= _PROBE_TOLERANCE.get(expected.dtype, 5e-2):
                return (
                    f"the lean forward's {what} differ from {type(model).__name__}'s own on a "
                    f"probe (relative error {error:.2g})"
                )
    return None
