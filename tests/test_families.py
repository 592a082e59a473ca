"""Every supported target family trains online end to end on a tiny random config."""

import json

import pytest

from draftforge.config import load_config
from draftforge.testing import tiny_run_overrides, write_tiny_run
from draftforge.train import train

FAMILIES = ["qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3", "llama4", "gpt_oss", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_with_falling_loss(family, tmp_path):
    root = write_tiny_run(tmp_path, conversations=40, family=family)
    overrides = tiny_run_overrides(
        root,
        tmp_path / "run",
        **{
            "training.max_steps": 10,
            "training.log_every": 1,
            "training.tokens_per_batch": 192,
            "data.max_length": 192,
        },
    )
    train(load_config(None, overrides))
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 10
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
