"""The lean target forward against a naive reference (a whole-sequence transformers forward,
no cache) on Llama, Qwen2 and Qwen3 layouts: prefill, a tree verify with its ancestor mask,
compaction of the accepted path and a continuation; the transformers path runs the same
scenario. Which models fall back, the fast matmuls (the few-row kernel, prepacked oneDNN)
against F.linear, and the kernel's attention against SDPA."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from draftforge.decode import fastlinear, skinny
from draftforge.decode.errors import DecodeError
from draftforge.decode.fastlinear import Projection, fast_matmul, onednn_usable
from draftforge.decode.lean import LeanTarget
from draftforge.decode.paths import HFTargetPath, choose_target_path
from draftforge.decode.tree import ancestor_mask
from draftforge.target import capture_layers
from draftforge.testing import _COMMON, tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")

AUX = [0, 2, 3]
PARENTS = [-1, 0, 0, 1, 2, 1]  # the root, two children, grandchildren under both
KEEP = [0, 2, 4]  # the accepted path root -> node 2 -> node 4 (a second sibling: rows move)
CPU = torch.device("cpu")
ONEDNN = onednn_usable(torch.float32, CPU)
SKINNY = skinny.usable(torch.float32, CPU)
HALF = skinny.usable(torch.float16, CPU)  # float16 weights: where the CPU converts them (F16C)


def perturbed(family: str, dtype: torch.dtype) -> nn.Module:
    """A tiny target whose norm weights and biases are random too (they start as ones and
    zeros), so a forward that skipped one would differ."""
    model = tiny_target(family, seed=3, attention_bias=True).to(dtype)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=gen, dtype=dtype))
    return model


@torch.no_grad()
def naive(model: nn.Module, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and aux states of the last token of ``ids``, from one forward without cache."""
    with capture_layers(model, AUX) as captured:
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
    return logits, torch.cat(captured, dim=-1)[0, -1]


def tree_ancestry(node: int) -> list[int]:
    """The nodes from the root down to ``node``."""
    chain = [node]
    while PARENTS[chain[0]] >= 0:
        chain.insert(0, PARENTS[chain[0]])
    return chain


@pytest.mark.parametrize("path", ["lean", "hf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "qwen3"])
def test_forward_tree_and_compaction_match_a_whole_sequence_forward(family, dtype, path):
    model = perturbed(family, dtype)
    target = LeanTarget(model, AUX, capacity=4) if path == "lean" else HFTargetPath(model, AUX)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-4}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 320, (7,), generator=gen).tolist()

    def check(logits, aux, sequences):
        for row, ids in enumerate(sequences):
            want_logits, want_aux = naive(model, ids)
            torch.testing.assert_close(logits[row], want_logits, **tol)
            torch.testing.assert_close(aux[row], want_aux, **tol)

    # Prefill: the last row's logits only, every row's aux states.
    logits, aux = target.forward(torch.tensor(prompt), torch.arange(7), None, True, True)
    assert logits.shape[0] == 1 and aux.shape == (7, 3 * model.config.hidden_size)
    check(logits, aux[-1:], [prompt])
    for i in range(7):
        torch.testing.assert_close(aux[i], naive(model, prompt[: i + 1])[1], **tol)

    # A tree after it: the root at position 7, node i at 7 + depth(i), seeing its ancestors.
    tree = torch.randint(0, 320, (len(PARENTS),), generator=gen).tolist()
    depths = [len(tree_ancestry(i)) - 1 for i in range(len(PARENTS))]
    logits, aux = target.forward(
        torch.tensor(tree), 7 + torch.tensor(depths), ancestor_mask(PARENTS), False, True
    )
    check(logits, aux, [prompt + [tree[j] for j in tree_ancestry(i)] for i in range(len(tree))])

    # Keep the root and the accepted path, then continue the committed sequence.
    target.compact(7, torch.tensor(KEEP))
    assert target.length == 7 + len(KEEP)
    committed = prompt + [tree[i] for i in KEEP]
    more = torch.randint(0, 320, (3,), generator=gen).tolist()
    logits, aux = target.forward(torch.tensor(more), torch.arange(10, 13), None, False, True)
    check(logits, aux, [committed + more[: i + 1] for i in range(3)])
    if path == "lean":
        assert target.capacity >= 16  # grown from 4 by doubling, cache intact
        assert target.matmul == (fast_matmul(dtype, CPU) if dtype == torch.float32 else None)
        assert target.attention_kernel == (SKINNY and dtype == torch.float32)


def test_logit_softcap_is_applied():
    model = perturbed("llama", torch.float64)
    model.config.final_logit_softcapping = 2.0
    lean = LeanTarget(model, AUX)
    logits, _ = lean.forward(torch.tensor([5, 9, 11]), torch.arange(3), None, True, False)
    plain = model(torch.tensor([[5, 9, 11]])).logits[0, -1]
    torch.testing.assert_close(logits[0], torch.tanh(plain / 2.0) * 2.0)


def other_family(config_class: str, model_class: str, **overrides: object) -> nn.Module:
    config = getattr(transformers, config_class)(**{**_COMMON, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return getattr(transformers, model_class)(config).eval()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: tiny_target("qwen3_moe"), "MLP is not a gated MLP"),
        (
            lambda: other_family("GemmaConfig", "GemmaForCausalLM", pad_token_id=0),
            "scales or wraps its input embedding",
        ),
        # Llama's module names, other arithmetic: only the probe against the model tells.
        (
            lambda: other_family(
                "GraniteConfig", "GraniteForCausalLM", residual_multiplier=0.5, pad_token_id=0
            ),
            "differ from GraniteForCausalLM's own on a probe",
        ),
    ],
)
def test_other_models_fall_back_to_transformers(make, reason):
    model = make()
    path, note = choose_target_path(model, AUX, lean=None)
    assert path.name == "hf" and reason in note
    with pytest.raises(DecodeError, match="lean target forward cannot run this model"):
        choose_target_path(model, AUX, lean=True)


def test_mistral_without_sliding_window_runs_lean_and_with_it_is_refused():
    full = other_family("MistralConfig", "MistralForCausalLM", sliding_window=None)
    path, note = choose_target_path(full, AUX, lean=None)
    assert path.name == "lean" and note is None
    windowed = other_family("MistralConfig", "MistralForCausalLM", sliding_window=64)
    with pytest.raises(DecodeError, match="sliding-window"):
        choose_target_path(windowed, AUX, lean=None)


def random_linears(seed: int) -> list[nn.Linear]:
    """Three linears reading one input of width 40, random weights and biases (one without)."""
    gen = torch.Generator().manual_seed(seed)
    linears = [nn.Linear(40, 24), nn.Linear(40, 8, bias=False), nn.Linear(40, 16)]
    for lin in linears:
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen))
    return linears


@pytest.mark.parametrize(
    "matmul",
    [
        pytest.param("skinny", marks=pytest.mark.skipif(not SKINNY, reason="no kernel here")),
        pytest.param("onednn", marks=pytest.mark.skipif(not ONEDNN, reason="no oneDNN here")),
    ],
)
@pytest.mark.parametrize("rows", [1, 5, skinny.MAX_ROWS, skinny.MAX_ROWS + 3])
def test_fast_projection_matches_f_linear(rows, matmul, monkeypatch):
    if matmul == "onednn":
        monkeypatch.setenv("DRAFTFORGE_SKINNY", "0")
    linears = random_linears(rows)
    x = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows))
    want = torch.cat([lin(x) for lin in linears], dim=-1).detach()
    fast = Projection(linears, fast=True)
    assert fast.matmul == matmul
    torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
    parts = fast.split(x)
    assert [p.shape[-1] for p in parts] == [24, 8, 16]
    plain = Projection(linears, fast=False)
    assert plain.matmul is None
    torch.testing.assert_close(plain(x), want, rtol=0, atol=0)


@pytest.mark.skipif(not SKINNY, reason="the few-row kernel did not build here")
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        pytest.param(torch.float16, marks=pytest.mark.skipif(not HALF, reason="no F16C here")),
    ],
)
@pytest.mark.parametrize("width", [576, 1536, 37, 44])
def test_skinny_kernel_rows_do_not_depend_on_their_company(width, dtype):
    """Each row's output is bitwise the same alone or among up to 19 rows (odd and even
    counts), and equals F.linear's with the weight as stored (float32, or float16 widened);
    widths with and without 8-float blocks beyond the 32-float ones and a scalar tail."""
    gen = torch.Generator().manual_seed(width)
    weight = torch.randn(301, width, generator=gen).to(dtype)
    bias = torch.randn(301, generator=gen)
    x = torch.randn(19, width, generator=gen)
    exact = weight.float()
    together = skinny.linear(x, weight, bias)
    torch.testing.assert_close(together, F.linear(x, exact, bias), rtol=1e-5, atol=1e-4)
    for rows in (1, 2, 3, 8):
        for start in range(0, 19 - rows, 5):
            alone = skinny.linear(x[start : start + rows], weight, bias)
            assert torch.equal(alone, together[start : start + rows])
    no_bias = skinny.linear(x[None, :4], weight, None)[0]  # 3-D input, no bias
    torch.testing.assert_close(no_bias, F.linear(x[:4], exact), rtol=1e-5, atol=1e-4)


def sdpa_rows(q, cache, prefix, own):
    """SDPA's attention of rows q [T, Hq, D] over cache [2, Hkv, >= L, D] with ``prefix`` keys
    every row sees and ``own`` [T, L - prefix] (None: causal) after them, as [T, Hq * D]."""
    rows = q.shape[0]
    own = own if own is not None else torch.ones(rows, rows, dtype=torch.bool).tril()
    keys = prefix + own.shape[1]
    mask = torch.cat([own.new_ones(rows, prefix), own], dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        cache[None, 0, :, :keys],
        cache[None, 1, :, :keys],
        attn_mask=mask,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1).reshape(rows, -1)


@pytest.mark.skipif(not SKINNY, reason="the few-row kernel did not build here")
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(6, 2, 64), (2, 1, 128), (4, 4, 24), (3, 1, 8)]
)
@pytest.mark.parametrize("prefix", [0, 37])
@pytest.mark.parametrize("rows", [1, 2, 5, 11])
def test_attention_kernel_matches_sdpa_and_rows_do_not_depend_on_their_company(
    rows, prefix, heads, kv_heads, dim
):
    """Causal rows and tree rows (each sees itself and a random set of the others) against
    SDPA; then each tree row alone, and alone over a cache that holds only the keys it saw, is
    bitwise the same: masked keys count for nothing, the others in the same order (what makes
    a verified token's output equal to a plain step's over the compacted cache)."""
    gen = torch.Generator().manual_seed(rows + prefix + dim)
    cache = torch.randn(2, kv_heads, prefix + rows + 3, dim, generator=gen)
    q = torch.randn(rows, heads, dim, generator=gen)
    own = (torch.rand(rows, rows, generator=gen) < 0.5) | torch.eye(rows, dtype=torch.bool)
    scale = dim**-0.5
    causal = skinny.attend(q, cache[0], cache[1], prefix, None, scale)
    torch.testing.assert_close(causal, sdpa_rows(q, cache, prefix, None), rtol=1e-5, atol=1e-5)
    tree = skinny.attend(q, cache[0], cache[1], prefix, own, scale)
    torch.testing.assert_close(tree, sdpa_rows(q, cache, prefix, own), rtol=1e-5, atol=1e-5)
    for row in range(rows):
        alone = skinny.attend(
            q[row : row + 1], cache[0], cache[1], prefix, own[row : row + 1], scale
        )
        assert torch.equal(alone[0], tree[row])
        seen = torch.cat([torch.arange(prefix), prefix + own[row].nonzero()[:, 0]])
        compacted = cache[:, :, seen].contiguous()
        kept = skinny.attend(
            q[row : row + 1], compacted[0], compacted[1], seen.numel(), own[:1, :0], scale
        )
        assert torch.equal(kept[0], tree[row])


def test_attention_kernel_serves_float32_heads_of_whole_vector_blocks():
    assert not skinny.attention_usable(torch.float32, CPU, 12)
    assert not skinny.attention_usable(torch.float32, CPU, skinny.MAX_HEAD_DIM + 8)
    assert not skinny.attention_usable(torch.float64, CPU, 64)
    assert skinny.attention_usable(torch.float32, CPU, 64) == SKINNY


@pytest.mark.skipif(not HALF, reason="the few-row kernel takes no float16 weights here")
@pytest.mark.parametrize("rows", [1, skinny.MAX_ROWS, skinny.MAX_ROWS + 3])
def test_half_projection_computes_with_float16_rounded_weights(rows):
    """On the kernel's rows and on F.linear's above them alike, against the same linears with
    their weights rounded to float16 and back."""
    linears = random_linears(rows)
    x = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows))
    half = Projection(linears, fast=True, half=True)
    assert half.half and half.weights[0].dtype == torch.float16
    want = torch.cat([F.linear(x, lin.weight.half().float(), lin.bias) for lin in linears], -1)
    torch.testing.assert_close(half(x), want.detach(), rtol=1e-5, atol=1e-5)
    assert not Projection(linears, fast=False, half=True).half  # F.linear on the own weights


def test_skinny_kernel_falls_back_with_a_warning_when_it_cannot_build(monkeypatch, tmp_path):
    monkeypatch.setattr(skinny, "_LIBRARY", [])
    monkeypatch.setenv("DRAFTFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match=r"no C compiler found \(\$CC, else cc\)"):
        assert not skinny.usable(torch.float32, CPU)
    assert not skinny.usable(torch.float32, CPU)  # judged once
    assert fast_matmul(torch.float32, CPU) == ("onednn" if ONEDNN else None)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not SKINNY, reason="the few-row kernel did not build here")
def test_skinny_kernel_is_built_once_per_machine_and_refused_when_it_disagrees(
    monkeypatch, tmp_path
):
    monkeypatch.setattr(skinny, "_LIBRARY", [])
    monkeypatch.setenv("DRAFTFORGE_CACHE", str(tmp_path))
    assert skinny.usable(torch.float32, CPU)
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(skinny, "_LIBRARY", [])
    assert skinny.usable(torch.float32, CPU)
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").iterdir()] == [stamp]
    monkeypatch.setattr(skinny, "_LIBRARY", [])
    real = skinny._run
    monkeypatch.setattr(skinny, "_run", lambda lib, x, w, b: real(lib, x, w, b) + 1e-3)
    with pytest.warns(RuntimeWarning, match="differs from F.linear's on a probe"):
        assert not skinny.usable(torch.float32, CPU)
    assert not skinny.usable(torch.float64, CPU)
    monkeypatch.setattr(skinny, "_LIBRARY", [])
    monkeypatch.setattr(skinny, "_run", real)
    attend = skinny._attend
    monkeypatch.setattr(skinny, "_attend", lambda *args: attend(*args) * 1.001)
    with pytest.warns(RuntimeWarning, match="attention differs from SDPA's on a probe"):
        assert not skinny.usable(torch.float32, CPU)


@pytest.mark.skipif(not ONEDNN, reason="oneDNN prepacking is not usable here")
def test_onednn_guard_falls_back_when_the_probe_disagrees(monkeypatch):
    assert not onednn_usable(torch.float64, torch.device("cpu"))
    monkeypatch.setattr(fastlinear, "_VERDICT", [])
    monkeypatch.setattr(fastlinear, "_packed_linear", lambda x, w, b: F.linear(x, w.to_dense()) + 1)
    with pytest.warns(RuntimeWarning, match="differs from F.linear"):
        assert not onednn_usable(torch.float32, torch.device("cpu"))
    assert not onednn_usable(torch.float32, torch.device("cpu"))  # judged once


@pytest.mark.slow  # compiling takes minutes on two cores
def test_compiled_layers_match_eager_ones():
    model = perturbed("qwen3", torch.float32)
    eager, compiled = LeanTarget(model, AUX), LeanTarget(model, AUX, compile=True)
    assert compiled.compiled and compiled.matmul is None
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 320, (9,), generator=gen)
    mask = ancestor_mask(PARENTS)
    depths = torch.tensor([0, 1, 1, 2, 2, 2])
    for lean in (eager, compiled):
        steps = [
            lean.forward(ids, torch.arange(9), None, True, True),
            lean.forward(ids[:6], 9 + depths, mask, False, True),
        ]
        lean.compact(9, torch.tensor(KEEP))
        steps.append(lean.forward(ids[:1], torch.tensor([12]), None, False, True))
        if lean is eager:
            expected = steps
    for got, want in zip(steps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
