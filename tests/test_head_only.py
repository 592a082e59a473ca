"""Offline training reads of the target only its head and embedding, from the checkpoint's
safetensors, and trains exactly as with the whole target loaded."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftforge import checkpoint, target_head, target_load
from draftforge.config import TargetConfig, load_config
from draftforge.offline import capture
from draftforge.target import TargetError, load_target
from draftforge.target_head import HeadTarget, load_target_head
from draftforge.testing import tiny_run_overrides, tiny_target, tiny_tokenizer, write_tiny_run
from draftforge.train import train

RUN = {
    "training.max_steps": 4,
    "training.log_every": 1,
    "data.eval_fraction": 0,
    "data.shard_mb": 0.2,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(root: Path, out: Path, **extra: object):
    settings = {**RUN, "data.features_dir": root / "features", **extra}
    return load_config(None, tiny_run_overrides(root, out, **settings))


def _newest(run: Path) -> dict[str, torch.Tensor]:
    weights, state = checkpoint.load_checkpoint(
        checkpoint.list_checkpoints(run / "checkpoints")[-1]
    )
    assert state["step"] == RUN["training.max_steps"]
    return weights


# gemma3 with a final logit softcap: the teacher applies it from the config alone.
@pytest.mark.parametrize(
    ("family", "config_extra"),
    [
        ("llama", {}),
        ("llama_tied", {}),
        ("qwen3_moe", {}),
        ("gemma3", {"final_logit_softcapping": 3.0}),
    ],
)
def test_head_only_offline_training_equals_whole_target(tmp_path, family, config_extra):
    root = write_tiny_run(tmp_path, conversations=30, family=family)
    config_file = root / "target" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **config_extra}))
    capture(_config(root, root / "unused"), progress=False)
    offline = {"data.mode": "offline"}
    head_cfg = _config(root, root / "head_run", **offline)
    head = load_target_head(head_cfg.target)
    assert isinstance(head, HeadTarget)
    assert head.logit_softcap == config_extra.get("final_logit_softcapping")
    train(head_cfg)
    whole_cfg = _config(root, root / "whole_run", **offline)
    train(whole_cfg, target=load_target(whole_cfg.target))
    head_weights, whole_weights = _newest(root / "head_run"), _newest(root / "whole_run")
    assert head_weights.keys() == whole_weights.keys()
    for name, tensor in head_weights.items():
        assert torch.equal(tensor, whole_weights[name]), name


def _save_sharded(directory: Path, family: str) -> Path:
    tiny_target(family).save_pretrained(directory, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(directory)
    assert (directory / target_head.INDEX).is_file()
    return directory


def _target_cfg(directory: Path, *extra: str) -> TargetConfig:
    overrides = [f"target.path={directory}", "target.aux_layers=[0,1,2]", *extra]
    return load_config(None, overrides).target


def _recording_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every tensor name read from a safetensors file (target_load reads for target_head)."""
    read: list[str] = []
    real_open = target_load.safe_open

    class Recording:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.file = real_open(*args, **kwargs)

        def __enter__(self) -> "Recording":
            self.file.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.file.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(target_load, "safe_open", Recording)
    return read


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("qwen3_moe", ["lm_head.weight", "model.embed_tokens.weight"]),
        ("llama_tied", ["model.embed_tokens.weight"]),  # the head is the embedding
    ],
)
def test_reads_only_the_head_and_embedding(tmp_path, monkeypatch, family, expected):
    directory = _save_sharded(tmp_path / "target", family)
    cfg = _target_cfg(directory)
    whole = load_target(cfg)
    read = _recording_reads(monkeypatch)
    head = load_target_head(cfg)
    assert sorted(read) == expected
    assert torch.equal(head.lm_head()[0], whole.lm_head()[0]) and head.lm_head()[1] is None
    assert torch.equal(head.embed_weight(), whole.embed_weight())
    assert (head.vocab_size, head.num_layers, head.dtype) == (
        whole.vocab_size,
        whole.num_layers,
        whole.dtype,
    )
    assert head.aux_layers == whole.aux_layers


def test_bfloat16_target_dtype_is_the_loaders(tmp_path):
    directory = _save_sharded(tmp_path / "target", "llama")
    cfg = _target_cfg(directory, "target.dtype=bfloat16")
    head, whole = load_target_head(cfg), load_target(cfg)
    assert head.dtype == whole.dtype == torch.bfloat16
    assert torch.equal(head.lm_head()[0], whole.lm_head()[0])


def test_missing_head_names_the_checkpoint(tmp_path):
    directory = tmp_path / "target"
    tiny_target("llama").save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    weights_file = directory / "model.safetensors"
    weights = load_file(weights_file)
    del weights["lm_head.weight"]
    save_file(weights, weights_file, metadata={"format": "pt"})
    cfg = _target_cfg(directory)
    with pytest.raises(TargetError) as err:
        load_target_head(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{directory}: the target's output head (lm_head.weight)")
