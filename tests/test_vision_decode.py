"""Speculative decoding and `draftforge eval` on vision-language targets: tiny random
Qwen2.5-VL, Qwen3-VL and Llama-4 with images drawn in code. Greedy speculation returns exactly
the tokens of the model's own ``generate`` with the same image inputs (chains and trees, a
draft that agrees often and an untrained one; for Llama-4 also a no-cache loop of whole
forwards, past several attention chunks), the positions are the ones ``generate`` uses, the
draft's cached steps equal its training unroll on 3-row positions, and eval runs end to end."""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from draftforge import ttt
from draftforge.cli import main
from draftforge.decode import engine as engine_module
from draftforge.decode.drafter import Drafter
from draftforge.decode.engine import SpecEngine
from draftforge.decode.errors import DecodeError
from draftforge.decode.evaluate import Prompt, encode_prompt, hf_generate, load_prompts
from draftforge.decode.image_prompts import builtin_image_prompts, encode_image_prompt
from draftforge.decode.sampling import SamplingParams
from draftforge.decode.tree import TreeShape, ancestor_mask
from draftforge.decode.vision import (
    ImageInputs,
    PlainVisionTargetPath,
    PromptPositions,
    generate_inputs,
    prompt_positions,
)
from draftforge.models import build_draft
from draftforge.synthetic_images import bar_chart_image, shapes_image, text_image
from draftforge.target import Target
from draftforge.testing import (
    as_target,
    bigram_like_target,
    oracle_draft,
    save_draft,
    save_vl_checkpoint,
    tiny_llama4_processor,
    tiny_llama4_target,
    tiny_qwen3_vl_processor,
    tiny_qwen3_vl_target,
    tiny_vl_processor,
    tiny_vl_target,
)
from draftforge.ttt_attention import ttt_attention
from draftforge.vision_target import rope_position_ids, vision_features

NEW_TOKENS = 32
SHAPES = [TreeShape(3, 1), TreeShape(3, 2, 6)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_the_module():
    """The module's fixtures decode too (the references): one thread from the start, for the
    reason of conftest's ``one_thread``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def confident_vl_model(dtype: torch.dtype = torch.float64, make=tiny_vl_target) -> torch.nn.Module:
    """A tiny VL target with a confident head, a next token that leans on the current one
    (so the oracle draft agrees often) and sharp attention (so positions change the output:
    see test_the_positions_decide_the_output); Qwen3-VL's per-head q/k norms undo a scaled
    projection, so their weights are scaled there."""
    model = make().to(dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3.0)
        model.get_output_embeddings().weight.mul_(10.0)
        for layer in model.model.language_model.layers:
            attn = layer.self_attn
            if hasattr(attn, "q_norm"):
                attn.q_norm.weight.mul_(3.0)
                attn.k_norm.weight.mul_(3.0)
            else:
                attn.q_proj.weight.mul_(8.0)
                attn.k_proj.weight.mul_(8.0)
    model.generation_config.eos_token_id = None  # decode a fixed number of tokens
    return model


@pytest.fixture(scope="module")
def target() -> Target:
    processor = tiny_vl_processor()
    return Target(
        model=confident_vl_model(),
        tokenizer=processor.tokenizer,
        aux_layers=[0, 1, 2],
        path="tiny-vl",
        processor=processor,
    )


def _ask(images: list, question: str, between: str = "") -> list[dict]:
    parts: list[dict] = []
    for k, image in enumerate(images):
        if k and between:
            parts.append({"type": "text", "text": between})
        parts.append({"type": "image", "image": image})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def messages():
    """Three image prompts: two single images of different sizes, and two images at once."""
    rng = random.Random(3)
    shapes = shapes_image(rng).image  # 96 x 64
    text = text_image("gamma 42", size=(160, 40)).image
    chart = bar_chart_image({"red": 7, "blue": 3}, size=(64, 96)).image
    return {
        "shapes": _ask([shapes], "What is in the picture?"),
        "text": _ask([text], "Read it."),
        "two": _ask([chart, shapes], "Compare them.", between="and"),
    }


@pytest.fixture(scope="module")
def prompts(target, messages):
    """The prompts through the Qwen2.5-VL target's template and image processor."""
    encoded = {k: encode_image_prompt(target.processor, m) for k, m in messages.items()}
    grids = [tuple(inputs.image_grid_thw[0].tolist()) for _, inputs in encoded.values()]
    assert len(set(grids)) == 3, grids  # three image sizes
    assert encoded["two"][1].image_grid_thw.shape[0] == 2
    return encoded


@pytest.fixture(scope="module")
def references(target, prompts):
    """transformers' own greedy generation of each prompt, with its image inputs."""
    return {
        name: hf_generate(target, ids, NEW_TOKENS, SamplingParams(), frozenset(), inputs)[0]
        for name, (ids, inputs) in prompts.items()
    }


def random_draft(target: Target, seed: int = 0):
    """An untrained draft (M-RoPE from the target's config) over the whole vocabulary."""
    torch.manual_seed(seed)
    draft = build_draft("eagle3", target.config, target.aux_layers, target.vocab_size)
    draft.load_target_embedding(target.embed_weight())
    return draft.to(target.dtype).eval()


@pytest.mark.parametrize("kind", ["oracle", "untrained"])
def test_greedy_speculation_is_the_targets_own_generate(target, prompts, references, kind):
    draft = oracle_draft(target) if kind == "oracle" else random_draft(target)
    assert draft.mrope_section == [2, 3, 3]
    lengths = []
    names = list(prompts) if kind == "oracle" else ["two"]  # rejections look alike everywhere
    for name in names:
        ids, inputs = prompts[name]
        for shape in SHAPES:
            engine = SpecEngine(target, draft, shape)
            assert engine.path.name == "hf" and "vision-language" in engine.path_note
            gen = engine.generate(ids, NEW_TOKENS, stop_ids=(), images=inputs)
            assert gen.tokens == references[name], f"{kind} {name} {shape}"
            assert gen.stop == "length" and len(gen.tokens) == NEW_TOKENS
            lengths.append(gen.acceptance_length)
    mean = sum(lengths) / len(lengths)
    if kind == "oracle":
        assert mean > 1.6 and max(lengths) > 2.0, lengths  # long accepted paths
    else:
        assert mean < 1.2, lengths  # (almost) always rejected


def test_qwen3_vl_greedy_speculation_is_its_own_generate(messages, monkeypatch):
    """Qwen3-VL (interleaved M-RoPE, deepstack states added at the image tokens during the
    prefill): the same exactness, and the same delta convention for the text after the
    prompt (without it the output changes)."""
    processor = tiny_qwen3_vl_processor()
    model = confident_vl_model(make=tiny_qwen3_vl_target)
    target = Target(model, processor.tokenizer, [0, 1, 2], "tiny-qwen3-vl", processor=processor)
    draft = oracle_draft(target)
    assert draft.mrope_interleaved
    real = prompt_positions
    lengths = []
    for name in ("shapes", "two"):
        ids, inputs = encode_image_prompt(processor, messages[name])
        expected, _ = hf_generate(target, ids, NEW_TOKENS, SamplingParams(), frozenset(), inputs)
        for shape in SHAPES:
            gen = SpecEngine(target, draft, shape).generate(ids, NEW_TOKENS, (), inputs)
            assert gen.tokens == expected, f"{name} {shape}"
            lengths.append(gen.acceptance_length)
        no_delta = PromptPositions(real(model, torch.tensor(ids), inputs).rows, 0)
        monkeypatch.setattr(engine_module, "prompt_positions", lambda *_, p=no_delta: p)
        plain = SpecEngine(target, None, TreeShape(0)).generate(ids, NEW_TOKENS, (), inputs)
        assert plain.tokens != expected, name
        monkeypatch.undo()
    assert sum(lengths) / len(lengths) > 1.3, lengths


def test_the_positions_decide_the_output(target, prompts, references, monkeypatch):
    """The exactness test can fail: with the prompt's positions as ``arange``, or with the
    text after the prompt not shifted by the prompt's delta, the output changes."""
    real = prompt_positions
    wrong = {
        "arange": lambda model, ids, images: PromptPositions.text(),
        "no delta": lambda model, ids, images: PromptPositions(real(model, ids, images).rows, 0),
    }
    for how, positions in wrong.items():
        monkeypatch.setattr(engine_module, "prompt_positions", positions)
        differ = 0
        for name, (ids, inputs) in prompts.items():
            gen = SpecEngine(target, None, TreeShape(0)).generate(
                ids, NEW_TOKENS, stop_ids=(), images=inputs
            )
            differ += gen.tokens != references[name]
        assert differ >= 2, how


def test_the_images_decide_the_output(target, prompts, references):
    """The prefill reads the pixels: a blank picture of the same size changes the output."""
    for name, (ids, inputs) in prompts.items():
        blank = ImageInputs(
            torch.zeros_like(inputs.pixel_values), inputs.image_grid_thw, inputs.mm_token_type_ids
        )
        gen = SpecEngine(target, None, TreeShape(0)).generate(ids, NEW_TOKENS, (), blank)
        assert gen.tokens != references[name], name


def test_positions_are_the_ones_generate_uses(target, prompts):
    """The prompt's rows are the model's own M-RoPE ids, and the text after it sits at
    max(prompt positions) + 1 + k on all three rows, the delta transformers' generate keeps
    (``rope_deltas``) after prefilling the same prompt."""
    model = target.model
    deltas = []
    for ids, inputs in prompts.values():
        ids = torch.tensor(ids)
        positions = prompt_positions(model, ids, inputs)
        hf_generate(target, ids.tolist(), 1, SamplingParams(), frozenset(), inputs)
        assert positions.delta == int(model.model.rope_deltas)
        deltas.append(positions.delta)
        batch = {"input_ids": ids[None], **inputs.generate_kwargs()}
        assert torch.equal(positions.rows, rope_position_ids(model, batch)[:, 0])
        assert not torch.equal(positions.rows[0], torch.arange(len(ids)))
        after = positions.at(torch.arange(len(ids) - 2, len(ids) + 3))
        top = int(positions.rows.max())
        assert after[:, :2].tolist() == positions.rows[:, -2:].tolist()
        assert after[:, 2:].tolist() == [[top + 1, top + 2, top + 3]] * 3
    assert min(deltas) < 0  # an image of many tokens takes fewer positions


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "module"])
def test_draft_cache_path_equals_the_training_unroll_on_mrope_positions(target, prompts, lean):
    """Extend + tree steps on the prompt's 3-row positions give the hidden states the TTT
    unroll computes from the positions the target's features carry (the whole sequence
    through get_rope_index, as training prepares it), step k at positions + k."""
    draft = random_draft(target, seed=1)
    ids, inputs = prompts["two"]
    steps, committed = 3, len(ids) + 4  # a few answer tokens after the prompt
    gen = torch.Generator().manual_seed(2)
    extra = torch.randint(0, 200, (committed + steps + 1 - len(ids),), generator=gen)
    full = torch.cat([torch.tensor(ids), extra])
    types = torch.cat([inputs.mm_token_type_ids, torch.zeros_like(extra)])
    batch = {"input_ids": full[None], "mm_token_type_ids": types[None]}
    batch |= {"pixel_values": inputs.pixel_values, "image_grid_thw": inputs.image_grid_thw}
    features = vision_features(target.model, target.aux_layers, batch)
    keys, values = [], []

    def ttt_attend(q, k, v):
        keys.append(k)
        values.append(v)
        return ttt_attention(q, keys[0], values[0], keys[1:], values[1:])

    expected = []
    with torch.no_grad():
        hidden = draft.fc(features.aux)
        for k in range(steps):
            shifted = ttt.shift_left(full[None], 1 + k)
            hidden = draft.step(hidden, shifted, features.position_ids + k, ttt_attend)
            expected.append(hidden[0, committed - 1])

    drafter = Drafter(draft, lean=lean, capacity=8)
    drafter.begin(prompt_positions(target.model, torch.tensor(ids), inputs))
    got = [drafter.extend(features.aux[0, :committed], full[1 : committed + 1], 0)]
    for k in range(1, steps):
        seen = torch.ones(1, k - 1, dtype=torch.bool)
        out = drafter.tree_step(got[-1][None], full[committed + k][None], committed - 1 + k, seen)
        got.append(out[0])
    for k in range(steps):
        torch.testing.assert_close(got[k], expected[k])


def test_bad_pairings_are_refused(target, prompts):
    ids, inputs = prompts["shapes"]
    with pytest.raises(DecodeError, match="lean forward serves text-only"):
        SpecEngine(target, None, TreeShape(0), lean=True)
    processor = tiny_llama4_processor()
    llama4 = Target(tiny_llama4_target(), processor.tokenizer, [0, 1, 2], "l4", processor=processor)
    with pytest.raises(DecodeError, match=r"images and go through its modules .* text-only"):
        SpecEngine(llama4, None, TreeShape(0), lean=True)
    with pytest.raises(DecodeError, match="no mrope_section"):
        SpecEngine(target, _without_mrope(target), TreeShape(2))
    text = as_target(bigram_like_target("qwen2"))
    with pytest.raises(DecodeError, match="not a vision-language target"):
        SpecEngine(text, None, TreeShape(0)).generate(ids, 2, images=inputs)
    with pytest.raises(DecodeError, match=r"built-in: prompt p has images and .* not a vision"):
        encode_prompt(text, Prompt("p", [{"role": "user", "content": [{"type": "image"}]}]))


def _without_mrope(target: Target):
    draft = random_draft(target)
    draft.mrope_section = None
    return draft


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A VL checkpoint folder (weights, tokenizer, image processor), a run holding the oracle
    draft for it, two pictures under pics/ and prompts naming them relative to the file."""
    root = tmp_path_factory.mktemp("vl_eval")
    processor = tiny_vl_processor()
    model = confident_vl_model(torch.float32)
    save_vl_checkpoint(model, processor, root / "target")
    target = Target(
        model, processor.tokenizer, [0, 1, 2], str(root / "target"), processor=processor
    )
    save_draft(oracle_draft(target), root / "target", root / "run")
    (root / "pics").mkdir()
    shapes_image(random.Random(1)).image.save(root / "pics" / "a.png")
    text_image("delta 17").image.save(root / "pics" / "b.png")
    question = {"type": "text", "text": "What is this?"}
    url = {"type": "image_url", "image_url": {"url": "file://pics/b.png"}}
    llava = [
        {"from": "human", "value": "<image>\nDescribe it."},
        {"from": "gpt", "value": "A word and a number."},
    ]
    write_jsonl(
        root / "prompts.jsonl",
        [
            {"id": "parts", "messages": [{"role": "user", "content": [_image("a"), question]}]},
            {"id": "url", "messages": [{"role": "user", "content": [url, question]}]},
            {"id": "llava", "image": "pics/b.png", "conversations": llava},
            {"id": "text", "prompt": "no picture here"},
        ],
    )
    return root


def _image(name: str) -> dict:
    return {"type": "image", "image": f"pics/{name}.png"}


def test_eval_runs_image_prompts_and_reports_acceptance(workdir, capsys):
    out = workdir / "report.json"
    args = ["eval", "--draft", str(workdir / "run"), "--prompts", str(workdir / "prompts.jsonl")]
    assert main([*args, "--num-steps", "3", "--max-new-tokens", "16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["id"] for r in report["per_prompt"]] == ["parts", "url", "llava", "text"]
    assert report["acceptance_length"] > 1.3
    assert report["greedy_identical_prompts"] == {"baseline": 4, "generate": 4}
    assert report["target_path"] == "hf" and "vision-language" in report["target_path_note"]
    assert "acceptance length" in capsys.readouterr().out


def test_eval_without_prompts_draws_its_image_prompts(workdir):
    out = workdir / "builtin.json"
    args = ["eval", "--draft", str(workdir / "run"), "--max-new-tokens", "8", "--no-baseline"]
    assert main([*args, "--num-steps", "2", "--topk", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    expected = [ident for ident, _ in builtin_image_prompts()]
    assert [r["id"] for r in report["per_prompt"]] == expected
    assert report["acceptance_length"] is not None
    assert report["greedy_identical_prompts"] == {"generate": len(expected)}
    for _, messages in builtin_image_prompts():
        images = [p for p in messages[0]["content"] if p["type"] == "image"]
        assert images and all(hasattr(p["image"], "size") for p in images)  # drawn, no files


def test_a_bad_image_names_its_file_and_line(workdir, capsys):
    rows = [
        {"messages": [{"role": "user", "content": [_image("a")]}]},
        {"messages": [{"role": "user", "content": [_image("gone")]}]},
    ]
    path = write_jsonl(workdir / "bad.jsonl", rows)
    with pytest.raises(DecodeError, match=rf"{path}:2: .*gone\.png"):
        load_prompts(path)
    args = ["eval", "--draft", str(workdir / "run"), "--prompts", str(path)]
    assert main(args) == 2
    assert f"{path}:2" in capsys.readouterr().err


# --------------------------------------------------------------------------- Llama-4


def confident_llama4_model() -> torch.nn.Module:
    """The tiny Llama-4 (chunks of 16 tokens, MoE, a last layer without RoPE) in float64 with
    a confident head, a next token that leans on the current one, and image states as large
    as token embeddings (so the pictures change the output). It never outputs the image
    token: the no-cache reference would read a generated one as a place for image states."""
    model = tiny_llama4_target().double()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(3.0)
        model.get_output_embeddings().weight.mul_(10.0)
        model.get_output_embeddings().weight[model.config.image_token_id] = 0.0
        model.multi_modal_projector.linear_1.weight.mul_(100.0)
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def llama4() -> Target:
    processor = tiny_llama4_processor()
    model = confident_llama4_model()
    return Target(model, processor.tokenizer, [0, 1, 2], "tiny-llama4", processor=processor)


@pytest.fixture(scope="module")
def llama4_prompts(llama4, messages):
    """Two images of different tile grids, and two images at once, through Llama-4's tiles;
    every prompt is several attention chunks long."""
    encoded = {k: encode_image_prompt(llama4.processor, m) for k, m in messages.items()}
    grids = {tuple(inputs.image_grid_thw[0].tolist()) for _, inputs in encoded.values()}
    assert len(grids) >= 2, grids
    chunk = llama4.config.attention_chunk_size
    assert all(len(ids) > 2 * chunk for ids, _ in encoded.values())
    return encoded


def no_cache_greedy(model, ids: list[int], inputs: ImageInputs, count: int) -> list[int]:
    """The model's own greedy continuation: one whole forward (vision tower, projector,
    language model and its chunk masks, no cache) per new token."""
    sequence = torch.tensor([ids])
    pixels = inputs.pixel_values.to(model.dtype)
    with torch.no_grad(), generate_inputs(model, inputs):
        for _ in range(count):
            logits = model(input_ids=sequence, pixel_values=pixels, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def llama4_references(llama4, llama4_prompts):
    """The no-cache greedy loop, which transformers' generate (with its chunked caches)
    agrees with."""
    references = {}
    for name, (ids, inputs) in llama4_prompts.items():
        references[name] = no_cache_greedy(llama4.model, ids, inputs, NEW_TOKENS)
        generated, _ = hf_generate(llama4, ids, NEW_TOKENS, SamplingParams(), frozenset(), inputs)
        assert generated == references[name], name
    return references


@pytest.mark.parametrize("kind", ["oracle", "untrained"])
def test_llama4_greedy_speculation_is_its_own_greedy_output(
    llama4, llama4_prompts, llama4_references, kind
):
    """Chains and trees, past several attention chunks: exactly the model's own tokens."""
    draft = oracle_draft(llama4) if kind == "oracle" else random_draft(llama4)
    assert draft.mrope_section is None
    lengths = []
    names = list(llama4_prompts) if kind == "oracle" else ["two"]
    for name in names:
        ids, inputs = llama4_prompts[name]
        for shape in SHAPES:
            engine = SpecEngine(llama4, draft, shape)
            assert engine.path.name == "hf" and "vision-language" in engine.path_note
            gen = engine.generate(ids, NEW_TOKENS, stop_ids=(), images=inputs)
            assert gen.tokens == llama4_references[name], f"{kind} {name} {shape}"
            lengths.append(gen.acceptance_length)
    mean = sum(lengths) / len(lengths)
    if kind == "oracle":
        assert mean > 1.5 and max(lengths) > 1.8, lengths
    else:
        assert mean < 1.2, lengths


def test_llama4_chunks_and_images_decide_the_output(
    llama4, llama4_prompts, llama4_references, monkeypatch
):
    """The exactness test can fail: a blank picture of the same size, or a tree's nodes
    attending past their chunk in the chunked layers, change the output."""
    differ = 0
    for name, (ids, inputs) in llama4_prompts.items():
        blank = ImageInputs(
            torch.zeros_like(inputs.pixel_values), inputs.image_grid_thw, inputs.mm_token_type_ids
        )
        gen = SpecEngine(llama4, None, TreeShape(0)).generate(ids, NEW_TOKENS, (), blank)
        assert gen.tokens != llama4_references[name], name
    real = PlainVisionTargetPath.masks

    def unchunked(path, positions, tree):
        masks = real(path, positions, tree)
        return {kind: masks["full_attention"] for kind in masks}

    monkeypatch.setattr(PlainVisionTargetPath, "masks", unchunked)
    draft = oracle_draft(llama4)
    for name, (ids, inputs) in llama4_prompts.items():
        gen = SpecEngine(llama4, draft, SHAPES[1]).generate(ids, NEW_TOKENS, (), inputs)
        differ += gen.tokens != llama4_references[name]
    assert differ >= 2


def test_eval_runs_a_llama4_checkpoint_on_its_image_prompts(tmp_path, capsys):
    """A saved tiny Llama-4 (weights, tokenizer, tiling settings) and a draft run for it:
    `draftforge eval` draws its image prompts and reports acceptance, exact at temperature 0
    against the engine without a draft and transformers' generate."""
    processor = tiny_llama4_processor()
    model = confident_llama4_model().float()
    save_vl_checkpoint(model, processor, tmp_path / "target")
    target = Target(model, processor.tokenizer, [0, 1, 2], str(tmp_path / "target"))
    save_draft(oracle_draft(target), tmp_path / "target", tmp_path / "run")
    out = tmp_path / "report.json"
    args = ["eval", "--draft", str(tmp_path / "run"), "--max-new-tokens", "12"]
    assert main([*args, "--num-steps", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    expected = [ident for ident, _ in builtin_image_prompts()]
    assert [r["id"] for r in report["per_prompt"]] == expected
    assert report["acceptance_length"] > 1.2
    assert report["greedy_identical_prompts"] == {"baseline": 4, "generate": 4}
    assert "vision-language" in report["target_path_note"]
    assert "acceptance length" in capsys.readouterr().out


def full_forward_logits(model, ids: list[int], inputs: ImageInputs) -> torch.Tensor:
    """The model's own logits at the last of ``ids``: one whole forward, no cache."""
    pixels = inputs.pixel_values.to(model.dtype)
    with torch.no_grad(), generate_inputs(model, inputs):
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1]


def test_llama4_tree_nodes_see_their_chunk_at_their_own_positions(llama4_prompts, monkeypatch):
    """A verify over a tree that crosses a chunk boundary: each node's logits equal the
    model's own at the end of its path, with queries of the layers without RoPE scaled by
    position (temperature tuning, which the real model starts at position 8191; here the
    scale changes every position). Without the engine's per-node scaling (each node scaled
    as if at the cache length plus its index) the nodes off the first branch differ."""
    model = confident_llama4_model()
    for layer in model.language_model.model.layers:
        layer.self_attn.floor_scale, layer.self_attn.attn_scale = 1.0, 10.0
    processor = tiny_llama4_processor()
    target = Target(model, processor.tokenizer, [0, 1, 2], "tuned", processor=processor)
    ids, inputs = llama4_prompts["two"]
    chunk = target.config.attention_chunk_size
    prompt = ids[: chunk * (len(ids) // chunk) - 1]  # the root is the chunk's last token
    parents, tokens = [-1, 0, 0, 1, 2, 3], [5, 60, 61, 62, 63, 64]
    depths = [0, 1, 1, 2, 2, 3]
    expected = []
    for node in range(len(parents)):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        expected.append(
            full_forward_logits(model, prompt + [tokens[k] for k in path[::-1]], inputs)
        )

    def verify() -> torch.Tensor:
        engine = SpecEngine(target, None, TreeShape(0))
        engine.path.begin(PromptPositions.text(), inputs)
        engine.path.forward(torch.tensor(prompt), torch.arange(len(prompt)), None, True, False)
        positions = len(prompt) + torch.tensor(depths)
        mask = ancestor_mask(parents)
        return engine.path.forward(torch.tensor(tokens), positions, mask, False, False)[0]

    # Llama-4 rotates in float32 whatever the model's dtype: float32 rounding, not float64's
    torch.testing.assert_close(verify(), torch.stack(expected), rtol=0, atol=1e-5)
    monkeypatch.setattr(PlainVisionTargetPath, "tuned_queries", lambda *_: nullcontext())
    error = (verify() - torch.stack(expected)).abs().amax(dim=-1)
    assert error[:2].max() < 1e-5 and error[2:].min() > 1e-3, error
