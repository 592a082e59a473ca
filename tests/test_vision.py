"""A vision-language target's features and data, on a tiny random Qwen2.5-VL with images
drawn in code: the captured states are the language model's own (tolerance 0), the
positions are the model's M-RoPE ids, and the loss mask covers the assistant's text and no
image token."""

from __future__ import annotations

import random
import sys

import pytest
import torch

from draftforge import MissingExtraError
from draftforge.data.conversation import RowError
from draftforge.data.vision import IMAGE_TYPE, TEXT_TYPE, encode_vision_conversation
from draftforge.synthetic_images import (
    KINDS,
    shapes_image,
    synthetic_images,
    write_synthetic_images,
)
from draftforge.testing import tiny_vl_processor, tiny_vl_target
from draftforge.vision_target import language_model, vision_batch, vision_features

# Not in order, and not the last layer, whose hidden_states entry is the final-norm state.
AUX = [2, 0, 1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny forwards on two shared cores run fastest on one thread."""


@pytest.fixture(scope="module")
def model():
    return tiny_vl_target()


@pytest.fixture(scope="module")
def processor():
    return tiny_vl_processor()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_synthetic_images(tmp_path_factory.mktemp("images"), 3)


def _conversation(images, first: int = 0) -> list[dict]:
    """Two turns: an image then a question, and a question then an image."""
    (shapes, drawn_shapes), (chart, drawn_chart) = images[first], images[2]
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(shapes)},
                {"type": "text", "text": "What is in the picture?"},
            ],
        },
        {"role": "assistant", "content": drawn_shapes.caption},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And here?"},
                {"type": "image", "image": str(chart)},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": drawn_chart.caption}]},
    ]


def _model_forward(model, batch, **kwargs):
    """The model's own forward over a batch, positions computed by the model itself."""
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            output_hidden_states=True,
            **kwargs,
        )


def test_capture_equals_the_language_models_hidden_states(model, processor, images):
    samples = [
        encode_vision_conversation(processor, _conversation(images, first)) for first in (0, 1)
    ]
    # a shapes image and a text image of other sizes: different grids, different lengths
    assert samples[0].input_ids.numel() != samples[1].input_ids.numel()
    hidden = model.config.text_config.hidden_size
    for sample in samples:
        batch = vision_batch([sample, sample])
        features = vision_features(model, AUX, batch)
        reference = _model_forward(model, batch).hidden_states
        assert features.aux.shape == (2, sample.input_ids.numel(), 3 * hidden)
        for slot, layer in enumerate(AUX):
            piece = features.aux[..., slot * hidden : (slot + 1) * hidden]
            assert torch.equal(piece, reference[layer + 1])
        assert torch.equal(features.final, reference[-1])


def test_hooks_sit_on_the_language_model_not_the_equally_deep_vision_tower(model):
    # The tiny target's two stacks are equally deep: a stack found by depth alone could be
    # either (the vision tower's comes first in the model), so the capture test above would
    # fail with hooks on the vision blocks (32 wide, not 64).
    text_layers = language_model(model).layers
    assert len(model.model.visual.blocks) == len(text_layers)
    assert model.config.vision_config.hidden_size != model.config.text_config.hidden_size
    assert text_layers is model.model.language_model.layers


def test_position_ids_are_the_models_mrope_ids(model, processor, images):
    sample = encode_vision_conversation(processor, _conversation(images))
    batch = vision_batch([sample])
    features = vision_features(model, AUX, batch)
    positions = features.position_ids[:, 0]
    length = sample.input_ids.numel()
    assert features.position_ids.shape == (3, 1, length)
    assert not torch.equal(positions, torch.arange(length).expand(3, -1))
    # M-RoPE by hand for the first image: its tokens sit at (start, start + row, start + col)
    # over its merged grid, and the text after it continues from start + max(rows, cols).
    image = (sample.mm_token_type_ids == IMAGE_TYPE).nonzero().flatten()
    _, grid_h, grid_w = (sample.image_grid_thw[0] // torch.tensor([1, 2, 2])).tolist()
    first = image[: grid_h * grid_w]
    start = int(first[0])
    assert torch.equal(positions[:, :start], torch.arange(start).expand(3, -1))
    cells = torch.arange(grid_h * grid_w)
    expected = torch.stack([torch.zeros_like(cells), cells // grid_w, cells % grid_w]) + start
    assert torch.equal(positions[:, first], expected)
    after = int(first[-1]) + 1
    assert torch.equal(positions[:, after], torch.full((3,), start + max(grid_h, grid_w)))
    # the language model used these: its own forward (positions computed inside) gives the
    # same final states, and plain arange positions do not
    assert torch.equal(_model_forward(model, batch).hidden_states[-1], features.final)
    plain = torch.arange(length).expand(3, 1, -1)
    moved = _model_forward(model, batch, position_ids=plain).hidden_states[-1]
    assert not torch.allclose(moved, features.final)


def test_loss_mask_covers_the_assistants_text_and_no_image_token(processor, images):
    conversation = _conversation(images)
    # an image inside an assistant turn: its tokens and markers stay unsupervised there too
    conversation[1] = {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Like this one:"},
            {"type": "image", "image": str(images[1][0])},
        ],
    }
    sample = encode_vision_conversation(processor, conversation)
    tokenizer = processor.tokenizer
    image = sample.mm_token_type_ids == IMAGE_TYPE
    counts = (sample.image_grid_thw.prod(-1) // 4).tolist()
    assert int(image.sum()) == sum(counts) and len(counts) == 3
    assert torch.equal(image, sample.input_ids == processor.image_token_id)
    assert not sample.loss_mask[image].any()
    assert set(sample.mm_token_type_ids.tolist()) == {TEXT_TYPE, IMAGE_TYPE}
    supervised = tokenizer.decode(sample.input_ids[sample.loss_mask.bool()])
    caption = images[2][1].caption
    assert supervised == "Like this one:<|im_end|>" + caption + "<|im_end|>"
    # nothing of the user turns or the assistant headers
    first_answer = tokenizer.decode(sample.input_ids[: int(sample.loss_mask.argmax())])
    assert first_answer.endswith("<|im_start|>assistant\n")


def test_a_missing_image_is_a_row_error(processor, images, tmp_path):
    conversation = _conversation(images)
    conversation[0]["content"][0]["image"] = str(tmp_path / "missing.png")
    with pytest.raises(RowError) as err:
        encode_vision_conversation(processor, conversation)
    assert err.value.reason == "bad_image"


@pytest.mark.parametrize("size", [(9000, 8000), (20000, 10000)])  # ours, then Pillow's limit
def test_a_too_large_image_is_a_row_error_before_it_is_decoded(processor, images, tmp_path, size):
    from PIL import Image

    huge = tmp_path / "huge.png"
    Image.new("1", size).save(huge)  # one bit a pixel: small in memory and on disk
    conversation = _conversation(images)
    conversation[0]["content"][0]["image"] = str(huge)
    with pytest.raises(RowError, match=r"huge\.png: (too large|Image size)") as err:
        encode_vision_conversation(processor, conversation)
    assert err.value.reason == "bad_image"


def test_synthetic_images_are_deterministic_and_of_every_kind():
    first, again = synthetic_images(6, seed=3), synthetic_images(6, seed=3)
    assert [d.kind for d in first] == [*KINDS, *KINDS]
    assert [d.caption for d in first] == [d.caption for d in again]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, again, strict=True))
    assert [d.caption for d in synthetic_images(6, seed=4)] != [d.caption for d in first]


def test_drawing_without_pillow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # `import PIL.Image` now fails
    with pytest.raises(MissingExtraError) as err:
        shapes_image(random.Random(0))
    assert str(err.value) == (
        "drawing synthetic images needs PIL.Image: pip install 'draftforge[vision]'"
    )
