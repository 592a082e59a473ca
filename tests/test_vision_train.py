"""Online training of a draft for a vision-language target: a tiny random Qwen2.5-VL saved
as a checkpoint, conversations with synthetic images in both row forms, and the draft
rotating by the target's M-RoPE positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from draftforge.config import TargetConfig, load_config
from draftforge.data.conversation import RowError
from draftforge.data.vision import IMAGE_TYPE, vision_messages
from draftforge.data.vision_prepare import encode_vision_row
from draftforge.features import collate, prepare_vision_data
from draftforge.models import build_draft
from draftforge.synthetic_images import synthetic_images, write_synthetic_images
from draftforge.target import Target, decoder_layers, load_target
from draftforge.testing import (
    save_vl_checkpoint,
    tiny_run_overrides,
    tiny_vl_processor,
    tiny_vl_target,
)
from draftforge.train import train
from draftforge.vision_target import rope_position_ids, vision_batch

IMAGES = 24
BAD_LINE = IMAGES + 1  # the JSONL line of the row whose image is missing


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny forwards on two shared cores run fastest on one thread."""


def _rows(images: list[tuple[Path, object]]) -> list[dict]:
    """An image and a question, answered with the image's caption: OpenAI content parts on
    even rows, LLaVA rows (an ``image`` field and an ``<image>`` placeholder) on odd ones;
    image paths relative to the data file."""
    rows = []
    for k, (path, drawn) in enumerate(images):
        relative = f"images/{path.name}"
        if k % 2:
            turns = [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": drawn.caption},
            ]
            rows.append({"id": f"row{k}", "image": relative, "conversations": turns})
        else:
            parts = [{"type": "image", "image": relative}, {"type": "text", "text": "Describe it."}]
            messages = [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": drawn.caption},
            ]
            rows.append({"id": f"row{k}", "messages": messages})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A VL checkpoint folder (weights, tokenizer, image processor; a confident head, as in
    write_tiny_run) and ``data.jsonl`` whose last row's image is missing."""
    root = tmp_path_factory.mktemp("vl_train")
    model = tiny_vl_target()
    model.lm_head.weight.data *= 30
    processor = tiny_vl_processor()
    save_vl_checkpoint(model, processor, root / "target")
    rows = _rows(write_synthetic_images(root / "images", IMAGES))
    rows.append(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "gone.png"}]},
                {"role": "assistant", "content": "Nothing."},
            ]
        }
    )
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def target(workdir) -> Target:
    return load_target(TargetConfig(path=str(workdir / "target"), aux_layers=[0, 1, 2]))


def _config(workdir: Path, out: Path, **extra):
    settings = {
        "data.eval_fraction": 0.0,
        **extra,
    }
    return load_config(None, tiny_run_overrides(workdir, out, **settings))


def test_a_vl_checkpoint_loads_with_hooks_on_the_language_model(target):
    assert target.processor is not None
    assert decoder_layers(target.model) is target.model.model.language_model.layers
    assert target.processor.image_processor.merge_size == 2


def test_prepared_samples_mask_no_image_token_and_carry_the_models_positions(workdir, target):
    prepared = prepare_vision_data(_config(workdir, workdir / "unused"), target)
    dataset = prepared.dataset
    assert len(dataset) == IMAGES
    assert prepared.dataset.report.skipped == {"bad_image": 1}
    (example,) = dataset.report.examples["bad_image"]
    assert example.startswith(f"{workdir / 'data.jsonl'}:{BAD_LINE}: ")
    assert "gone.png" in example
    for i in (0, 1):  # an OpenAI row and a LLaVA row
        sample = dataset.samples[i]
        image = sample.mm_token_type_ids == IMAGE_TYPE
        assert image.any() and not sample.loss_mask[image].any()
        caption = target.tokenizer.decode(sample.input_ids[sample.loss_mask.bool()])
        assert caption == synthetic_images(IMAGES)[i].caption + "<|im_end|>"
        expected = rope_position_ids(target.model, vision_batch([sample]))[:, 0]
        assert torch.equal(dataset[i]["position_ids"], expected)
    batch = collate(dataset, [0, 1], budget=10_000)
    assert batch.position_ids.shape == (3, 1, batch.input_ids.shape[1])


def test_the_drafts_mrope_is_the_language_models(target):
    draft = build_draft("eagle3", target.config, target.aux_layers, 64)
    text = target.model.model.language_model
    hidden = torch.zeros(1, 5, target.hidden_size)
    positions = torch.tensor([[0, 1, 2, 2, 3], [0, 1, 1, 2, 3], [0, 1, 2, 1, 3]])[:, None]
    for mine, theirs in zip(
        draft.rotary(hidden, positions), text.rotary_emb(hidden, positions), strict=True
    ):
        assert torch.allclose(mine, theirs, atol=1e-6)
    # equal rows are plain RoPE: text-only positions rotate as before
    same = positions[:1].expand(3, -1, -1)
    plain = draft.rotary(hidden, positions[0])
    assert all(torch.equal(a, b) for a, b in zip(draft.rotary(hidden, same), plain, strict=True))


def test_the_draft_learns_an_image_task_online(workdir):
    # as `draftforge train` runs: the VL checkpoint loaded, its data prepared in preflight
    out = workdir / "run"
    settings = {"training.max_steps": 40, "training.log_every": 5, "training.eval_every": 40}
    cfg = _config(workdir, out, **{**settings, "data.eval_fraction": 0.2})
    result = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (held_out,) = [r for r in rows if r["split"] == "eval"]
    rows = [r for r in rows if r["split"] == "train"]
    first, last = rows[0], rows[-1]
    # the held-out rows' images and captions were never trained on
    assert held_out["step"] == 40 and held_out["acc_0"] > first["acc_0"] + 0.15
    assert result.step == 40
    assert last["acc_0"] > first["acc_0"] + 0.15, (first["acc_0"], last["acc_0"])
    assert last["loss"] < 0.8 * first["loss"]


def test_llava_rows_and_relative_paths_become_content_parts(tmp_path):
    row = {
        "image": ["a.png", "/abs/b.png"],
        "conversations": [
            {"from": "human", "value": "Compare <image>\nand <image>"},
            {"from": "gpt", "value": "Same."},
        ],
    }
    user, answer = vision_messages(row, tmp_path)
    assert user["content"] == [
        {"type": "text", "text": "Compare "},
        {"type": "image", "image": str(tmp_path / "a.png")},
        {"type": "text", "text": "and "},
        {"type": "image", "image": "/abs/b.png"},
    ]
    assert answer == {"role": "gpt", "content": [{"type": "text", "text": "Same."}]}
    # no placeholder: the image goes first, as LLaVA places it
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "What?"}]}
    (user,) = vision_messages(row, tmp_path)
    assert user["content"][0] == {"type": "image", "image": str(tmp_path / "a.png")}
    with pytest.raises(RowError) as err:
        vision_messages(
            {**row, "conversations": [{"from": "human", "value": "<image><image>"}]}, tmp_path
        )
    assert err.value.reason == "image_count"
    # OpenAI parts: image_url with a file:// path, relative to the data file's folder
    url = {"type": "image_url", "image_url": {"url": "file://pics/c.png"}}
    (message,) = vision_messages({"messages": [{"role": "user", "content": [url]}]}, tmp_path)
    assert message["content"] == [{"type": "image", "image": str(tmp_path / "pics/c.png")}]


def test_max_length_cuts_text_after_the_images_but_never_an_image(workdir):
    processor = tiny_vl_processor()
    turns = [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "Shapes, " * 20},
    ]
    row = {"image": "images/image_0.png", "conversations": turns}
    whole, cut = encode_vision_row(processor, row, workdir, max_length=1000)
    assert not cut
    last_image = int((whole.mm_token_type_ids == IMAGE_TYPE).nonzero().max())
    sample, cut = encode_vision_row(processor, row, workdir, max_length=last_image + 40)
    assert cut and torch.equal(sample.input_ids, whole.input_ids[: last_image + 40])
    with pytest.raises(RowError) as err:
        encode_vision_row(processor, row, workdir, max_length=last_image)
    assert err.value.reason == "image_cut"
