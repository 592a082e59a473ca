"""Shared fixtures: the real default target (converted once, cached) and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from draftforge.config import TargetConfig
from draftforge.target import Target, load_target, resolve_target_path

CACHE = Path("~/.cache/draftforge").expanduser()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Batch-1 decoding and other tiny-op tests on two shared cores: extra intra-op threads
    only spin against other processes and slow these tests several times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory (converted from its GGUF once)."""
    return Path(resolve_target_path("smollm2", CACHE))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir) -> Target:
    return load_target(TargetConfig(path=str(smollm2_dir)))
