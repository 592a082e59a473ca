"""Real-client checks with vLLM's speculators library (optional: ``make test-speculators``).

speculators is what vLLM's speculators-format support is written against: its converter must
accept and validate our SGLang export, and its own EAGLE-3 model must load our vllm export and
compute what our draft computes.
"""

import json
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_export import AUX, ROPE, logits, save_run

from draftforge.drafts import CONFIG_FILE, WEIGHTS_FILE, load_draft
from draftforge.export import export_checkpoint
from draftforge.testing import save_tiny_target

pytestmark = pytest.mark.speculators


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # Here, not at import: collecting this file stays cheap when the group is deselected.
    pytest.importorskip("speculators")
    root = tmp_path_factory.mktemp("speculators")
    target_dir = save_tiny_target(root / "target", num_hidden_layers=8, rope_parameters=ROPE)
    run = save_run(root / "run", target_dir)
    return {
        "root": root,
        "target_dir": target_dir,
        "sglang": export_checkpoint(run, "sglang", root / "sglang"),
        "vllm": export_checkpoint(run, "vllm", root / "vllm").out,
    }


def speculators_logits(directory) -> torch.Tensor:
    """speculators' own EAGLE-3 model, loaded from ``directory``, on the inputs of ``logits``."""
    from speculators import SpeculatorModelConfig
    from speculators.models.eagle3.core import Eagle3DraftModel

    config = SpeculatorModelConfig.from_pretrained(directory)
    config.transformer_layer_config._attn_implementation = "eager"  # flex attention needs a GPU
    model = Eagle3DraftModel.from_pretrained(directory, config=config).float().eval()
    captured = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out))
    gen = torch.Generator().manual_seed(3)  # the same draws as test_export.logits
    aux = torch.randn(1, 12, 3 * config.target_hidden_size, generator=gen)
    ids = torch.randint(0, config.target_vocab_size, (1, 12), generator=gen)
    with torch.no_grad():
        model(aux, ids, torch.zeros_like(ids), position_ids=torch.arange(12)[None], ttt_steps=1)
    return captured[0]


def test_speculators_converts_and_validates_the_sglang_export(env):
    # Run exactly the conversion command the export printed, validating on CPU.
    (command,) = [c for what, c in env["sglang"].commands if c.startswith("speculators ")]
    converted = env["root"] / "sglang-speculators"
    assert f"--output-path {converted}" in command
    args = [sys.executable, "-m", *shlex.split(command), "--validate-device", "cpu"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "Validation succeeded" in log

    # What the converter made of it is what our own vllm export says.
    theirs, ours = (
        json.loads((converted / CONFIG_FILE).read_text()),
        json.loads((env["vllm"] / CONFIG_FILE).read_text()),
    )
    for key in ("draft_vocab_size", "target_hidden_size", "norm_before_residual"):
        assert theirs[key] == ours[key], key
    assert theirs["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in AUX]
    assert ours["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in AUX]
    layer = theirs["transformer_layer_config"]
    assert layer["rope_parameters"] == ROPE  # the converter kept theta 500000, not 10000
    assert layer["dtype"] == "bfloat16"
    their_weights = load_file(converted / WEIGHTS_FILE)
    our_weights = load_file(env["vllm"] / WEIGHTS_FILE)
    assert set(our_weights) - set(their_weights) == {"embed_tokens.weight"}
    for key, tensor in their_weights.items():
        assert torch.equal(tensor, our_weights[key]), key


def test_speculators_config_classes_load_the_vllm_export(env):
    from speculators import SpeculatorModelConfig
    from speculators.models.eagle3 import Eagle3SpeculatorConfig

    config = SpeculatorModelConfig.from_pretrained(env["vllm"])
    assert isinstance(config, Eagle3SpeculatorConfig)
    assert config.eagle_aux_hidden_state_layer_ids == [i + 1 for i in AUX]
    assert config.norm_before_residual is False and config.norm_output is False
    assert config.transformer_layer_config.rope_parameters == ROPE
    assert config.speculators_config.proposal_methods[0].speculative_tokens == 3
    assert config.speculators_config.verifier.name_or_path == str(env["target_dir"])


def test_speculators_model_computes_what_our_draft_computes(env):
    ours = logits(load_draft(env["vllm"]))
    theirs = speculators_logits(env["vllm"])
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
