"""The other vision-language families, on tiny random targets with images drawn in code:
Qwen3-VL (interleaved M-RoPE, deepstack visual states added into its first decoder layers)
and Llama-4 (tiled images, a mixture-of-experts language model with chunked attention and
1-D positions). For each: the captured states are the language model's own ``output_hidden_states``
(tolerance 0), with Qwen3-VL's deepstack states added where the serving engines read them, the
positions are the model's own, the loss mask covers no image token, the draft rotates as the
language model does, and a draft learns an image-caption task online from the family's saved
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from draftforge.config import TargetConfig, load_config
from draftforge.data.vision import IMAGE_TYPE, encode_vision_conversation
from draftforge.features import prepare_vision_data
from draftforge.models import build_draft
from draftforge.offline import capture
from draftforge.synthetic_images import write_synthetic_images
from draftforge.target import load_target
from draftforge.testing import (
    save_vl_checkpoint,
    tiny_llama4_processor,
    tiny_llama4_target,
    tiny_qwen3_vl_processor,
    tiny_qwen3_vl_target,
    tiny_run_overrides,
)
from draftforge.train import train
from draftforge.vision_target import (
    deepstack_levels,
    language_model,
    vision_batch,
    vision_features,
)

AUX = [2, 0, 1]  # not in order, and not the last layer (its hidden_states entry is normed)
FAMILIES = {
    "qwen3_vl": (tiny_qwen3_vl_target, tiny_qwen3_vl_processor),
    "llama4": (tiny_llama4_target, tiny_llama4_processor),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny forwards on two shared cores run fastest on one thread."""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_synthetic_images(tmp_path_factory.mktemp("images"), 24)


def _caption_rows(images) -> list[dict]:
    """An image and a question, answered with the image's caption (paths relative to the
    data file's folder)."""
    rows = []
    for path, drawn in images:
        parts = [{"type": "image", "image": f"images/{path.name}"}, {"type": "text", "text": "?"}]
        messages = [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": drawn.caption},
        ]
        rows.append({"messages": messages})
    return rows


def _two_images(images) -> list[dict]:
    """Two turns, each with an image (the second inside the assistant's turn)."""
    (first, drawn), (second, _) = images[0], images[2]
    return [
        {"role": "user", "content": [{"type": "image", "image": str(first)}]},
        {"role": "assistant", "content": drawn.caption},
        {"role": "user", "content": [{"type": "text", "text": "And?"}]},
        {
            "role": "assistant",
            "content": [{"type": "image", "image": str(second)}, {"type": "text", "text": "so"}],
        },
    ]


def _reference(family: str, model, batch: dict) -> tuple:
    """The language model's ``output_hidden_states`` in the whole model's own forward (its
    positions computed inside). transformers 5.24's Llama-4 forward fails building its
    output after its language model has run (``image_outputs``), so its language model's
    output is taken as it returns."""
    with torch.no_grad():
        if family == "qwen3_vl":
            return model(**batch, output_hidden_states=True).hidden_states
        seen = {}
        model.language_model.register_forward_hook(lambda _m, _a, out: seen.update(out=out))
        with pytest.raises(AttributeError, match="image_outputs"):
            model(batch["input_ids"], batch["pixel_values"], output_hidden_states=True)
        return seen["out"].hidden_states


def _with_deepstack(model, batch: dict, outputs: list) -> list:
    """Layer outputs (``output_hidden_states`` 1..) with Qwen3-VL's deepstack states added at
    the image tokens after the layers that take them: the stream the next layer reads, which
    SGLang and vLLM record as aux states. The states come from the model's own vision tower
    (``get_image_features``), added as transformers adds them (the image rows plus the
    level's states in the stream's dtype)."""
    with torch.no_grad():
        vision = model.model.get_image_features(
            batch["pixel_values"], batch["image_grid_thw"], return_dict=True
        )
    image = batch["mm_token_type_ids"] == IMAGE_TYPE
    streams = list(outputs)
    for level, per_image in enumerate(vision.deepstack_features):
        stream = streams[level].clone()
        stream[image] = stream[image] + torch.cat(per_image).to(stream.dtype)
        streams[level] = stream
    return streams


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_equals_the_language_models_hidden_states(family, images):
    make_target, make_processor = FAMILIES[family]
    model, processor = make_target(), make_processor()
    sample = encode_vision_conversation(processor, _two_images(images))
    image = sample.mm_token_type_ids == IMAGE_TYPE
    assert image.sum() > 0 and not sample.loss_mask[image].any()
    # the supervised tokens are exactly the assistant's text (the image in its turn is not)
    supervised = processor.tokenizer.decode(sample.input_ids[sample.loss_mask.bool()])
    end = processor.tokenizer.eos_token
    assert supervised == f"{_two_images(images)[1]['content']}{end}so{end}"
    batch = vision_batch([sample, sample])
    features = vision_features(model, AUX, batch)
    reference = _reference(family, model, batch)
    outputs = list(reference[1:-1])  # each layer's output but the last (its entry is normed)
    streams = _with_deepstack(model, batch, outputs) if family == "qwen3_vl" else outputs
    # Qwen3-VL's first two layers take deepstack states: at the image tokens only, and the
    # capture must carry them (left out, it would equal output_hidden_states)
    levels = deepstack_levels(model)
    assert levels == (2 if family == "qwen3_vl" else 0) and levels < max(AUX) + 1
    image = batch["mm_token_type_ids"] == IMAGE_TYPE
    for layer, (stream, output) in enumerate(zip(streams, outputs, strict=True)):
        changed = (stream != output).any(-1)
        assert torch.equal(changed, image & (layer < levels))
    hidden = model.config.get_text_config().hidden_size
    for slot, layer in enumerate(AUX):
        piece = features.aux[..., slot * hidden : (slot + 1) * hidden]
        assert torch.equal(piece, streams[layer])
    assert torch.equal(features.final, reference[-1])


def test_qwen3_vl_positions_and_the_drafts_interleaved_rotary(images):
    model, processor = tiny_qwen3_vl_target(), tiny_qwen3_vl_processor()
    sample = encode_vision_conversation(processor, _two_images(images))
    batch = vision_batch([sample])
    features = vision_features(model, AUX, batch)
    positions = features.position_ids
    ids, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
    )
    assert torch.equal(positions, ids)
    assert not torch.equal(positions[0], positions[1])  # an image's rows differ
    text = language_model(model)
    # the draft rotates by the same positions as the language model, interleaved rows too
    draft = build_draft("eagle3", model.config.get_text_config(), AUX, 64)
    assert draft.mrope_interleaved
    hidden = torch.zeros(1, positions.shape[-1], text.config.hidden_size)
    mine, theirs = draft.rotary(hidden, positions), text.rotary_emb(hidden, positions)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def test_qwen3_vl_decoding_gives_the_draft_the_aux_states_training_used(images):
    """The engine's prefill of an image prompt records the aux states training and capture
    take from the same sequence, deepstack states included."""
    from draftforge.decode.vision import ImageInputs, VisionTargetPath, prompt_positions

    model, processor = tiny_qwen3_vl_target(), tiny_qwen3_vl_processor()
    sample = encode_vision_conversation(processor, _two_images(images))
    trained = vision_features(model, AUX, vision_batch([sample])).aux[0]
    ids = sample.input_ids
    inputs = ImageInputs(sample.pixel_values, sample.image_grid_thw, sample.mm_token_type_ids)
    path = VisionTargetPath(model, AUX)
    path.begin(prompt_positions(model, ids, inputs), inputs)
    _, decoded = path.forward(ids, torch.arange(ids.numel()), None, last_only=False, aux=True)
    assert torch.equal(decoded, trained)


@pytest.fixture(scope="module", params=list(FAMILIES))
def workdir(request, tmp_path_factory) -> Path:
    """A family's checkpoint folder (a confident head, as in write_tiny_run) and captions."""
    make_target, make_processor = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = make_target()
    model.get_output_embeddings().weight.data *= 30
    processor = make_processor()
    save_vl_checkpoint(model, processor, root / "target")
    rows = _caption_rows(write_synthetic_images(root / "images", 24))
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(workdir: Path, out: Path, **extra):
    settings = {
        "training.max_steps": 30,
        "training.log_every": 5,
        "data.eval_fraction": 0.0,
        "data.features_dir": workdir / "features",
        **extra,
    }
    return load_config(None, tiny_run_overrides(workdir, out, **settings))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def online_run(workdir) -> Path:
    """The family's draft trained online on the caption task, on one thread as the tests
    (a module fixture runs before their per-test thread setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_config(workdir, workdir / "online"))
    finally:
        torch.set_num_threads(threads)
    return workdir / "online"


def test_the_draft_learns_an_image_task_online_from_the_checkpoint(workdir, online_run):
    target = load_target(TargetConfig(path=str(workdir / "target"), aux_layers=[0, 1, 2]))
    dataset = prepare_vision_data(_config(workdir, workdir / "unused"), target).dataset
    for sample in dataset.samples:
        assert not sample.loss_mask[sample.mm_token_type_ids == IMAGE_TYPE].any()
    rows = _metrics(online_run)
    first, last = rows[0], rows[-1]
    assert last["acc_0"] > first["acc_0"] + 0.15, (first["acc_0"], last["acc_0"])


def test_offline_training_from_a_capture_reproduces_the_online_losses(workdir, online_run):
    manifest = capture(_config(workdir, workdir / "unused"), progress=False).manifest
    # positions are stored where they are not 0..n-1: Qwen3-VL's image rows, no Llama-4 row
    stored = any("positions" in entry for entry in manifest["shards"])
    assert stored == workdir.name.startswith("qwen3_vl")
    # only deepstack aux states are marked, so a capture from before they were is not reused
    marked = manifest["settings"].get("aux_states") == "next layer's input"
    assert marked == workdir.name.startswith("qwen3_vl")
    train(_config(workdir, workdir / "offline", **{"data.mode": "offline"}))
    online, offline = _metrics(online_run), _metrics(workdir / "offline")
    assert [r["step"] for r in online] == [r["step"] for r in offline]
    for x, y in zip(online, offline, strict=True):  # tests/test_offline.py's tolerance
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * abs(y["loss"]) + 1e-6, (x, y)


def test_llama4_images_tile_and_positions_are_plain(images):
    model, processor = tiny_llama4_target(), tiny_llama4_processor()
    tokenizer = processor.tokenizer
    sample = encode_vision_conversation(processor, _two_images(images))
    # each image: its tiles' patch tokens row by row, then the whole image's, as
    # Llama4Processor._prompt_split_image writes them; one token per 28-pixel tile here
    grids = sample.image_grid_thw.tolist()
    assert sample.pixel_values.shape == (sum(g[0] for g in grids), 3, 28, 28)
    text = tokenizer.decode(sample.input_ids)
    for tiles, rows, cols in grids:
        assert tiles == rows * cols + (rows * cols > 1)
        row = "<|tile_x_separator|>".join(["<|patch|>"] * cols) + "<|tile_y_separator|>"
        written = "<|image_start|>" + row * rows + "<|image|><|patch|><|image_end|>"
        assert written in text
    assert int((sample.mm_token_type_ids == IMAGE_TYPE).sum()) == sum(g[0] for g in grids)
    # no token of an image's text is supervised, markers included
    markers = tokenizer.convert_tokens_to_ids(["<|image_start|>", "<|image|>", "<|image_end|>"])
    assert not sample.loss_mask[torch.isin(sample.input_ids, torch.tensor(markers))].any()
    features = vision_features(model, AUX, vision_batch([sample]))
    assert torch.equal(features.position_ids, torch.arange(sample.input_ids.numel())[None])
    # the images matter: other pixels, other states after the first image
    other = vision_batch([sample])
    other["pixel_values"] = -other["pixel_values"]
    moved = vision_features(model, AUX, other).final
    first = int((sample.mm_token_type_ids == IMAGE_TYPE).nonzero()[0])
    assert torch.equal(moved[:, :first], features.final[:, :first])
    assert not torch.allclose(moved[:, first:], features.final[:, first:])


def _transformers_llama4_rules() -> dict:
    """transformers' own Llama-4 canvas functions, compiled from its source file without the
    module's torchvision import (which cannot load here)."""
    import ast
    import math
    from collections import defaultdict
    from functools import lru_cache

    import transformers.models.llama4 as package
    from transformers.image_utils import SizeDict

    source = (Path(package.__file__).parent / "image_processing_llama4.py").read_text()
    wanted = {"get_factors", "get_max_res_without_distortion", "find_supported_resolutions"}
    wanted.add("get_best_fit")
    tree = ast.parse(source)
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {n.name for n in tree.body} == wanted
    scope = {"math": math, "torch": torch, "defaultdict": defaultdict, "lru_cache": lru_cache}
    scope["SizeDict"] = SizeDict
    exec(compile(tree, "image_processing_llama4.py", "exec"), scope)
    return scope


@pytest.mark.parametrize("max_patches", [1, 4, 16])
def test_llama4_canvases_and_sizes_follow_transformers_rules(max_patches):
    from transformers.image_utils import SizeDict

    from draftforge.data.llama4_images import Llama4Tiles

    rules = _transformers_llama4_rules()
    tile = 28
    tiles = Llama4Tiles(tile=tile, max_patches=max_patches)
    size = SizeDict(height=tile, width=tile)
    options = torch.tensor(rules["find_supported_resolutions"](max_patches, size))
    for height in (5, 20, 28, 29, 50, 84, 131):
        for width in (7, 28, 40, 56, 90, 200):
            canvas = tuple(rules["get_best_fit"]((height, width), options).tolist())
            bound = (min(max(height, tile), canvas[0]), min(max(width, tile), canvas[1]))
            resized = rules["get_max_res_without_distortion"]((height, width), bound)
            resized = (max(resized[0], 1), max(resized[1], 1))
            assert tiles.layout(height, width) == (canvas, resized), (height, width)


def test_an_image_processor_draftforge_cannot_read_is_named_with_its_file(tmp_path):
    from draftforge.data.vision import VisionProcessor
    from draftforge.testing import tiny_vl_tokenizer

    settings = tmp_path / "preprocessor_config.json"
    settings.write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    with pytest.raises(ValueError, match=f"{settings}: image_processor_type 'Siglip"):
        VisionProcessor.from_checkpoint(str(tmp_path), tiny_vl_tokenizer())


def test_llama4_tiles_cut_the_padded_canvas_row_by_row_then_the_whole_image(images):
    import numpy as np
    from PIL import Image

    tiles = tiny_llama4_processor().image_processor
    with Image.open(images[0][0]) as opened:  # 96 x 64: a grid of 2 x 3 tiles of 28
        image = opened.convert("RGB")
    pixels, (rows, cols) = tiles.tiles(image)
    canvas, (height, width) = tiles.layout(image.height, image.width)
    assert (rows, cols) == (canvas[0] // 28, canvas[1] // 28) and rows * cols > 1
    padded = np.zeros((*canvas, 3), dtype=np.float32)
    padded[:height, :width] = np.array(image.resize((width, height), Image.BILINEAR))
    expected = torch.from_numpy(padded / 127.5 - 1).permute(2, 0, 1)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        cell = expected[:, r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28]
        assert torch.allclose(pixels[k], cell, atol=1e-2)  # normalised in bfloat16
    whole = np.array(image.resize((28, 28), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(pixels[-1], torch.from_numpy(whole).permute(2, 0, 1), atol=1e-2)
    assert pixels.shape[0] == rows * cols + 1
