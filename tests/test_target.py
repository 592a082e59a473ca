import subprocess
import sys

import pytest
import torch

from draftforge.cli import main
from draftforge.config import TargetConfig
from draftforge.target import (
    Target,
    TargetError,
    aux_problem,
    chunk_tokens,
    default_aux_layers,
    load_target,
    load_tokenizer,
    resolve_target_path,
    teacher,
)
from draftforge.testing import FAMILIES, save_tiny_target, tiny_target, tiny_tokenizer


def _target(family: str, aux=None) -> Target:
    model = tiny_target(family)
    n = model.config.num_hidden_layers
    return Target(model, tiny_tokenizer(), aux or default_aux_layers(n), family)


def test_default_aux_layers():
    assert default_aux_layers(30) == [1, 14, 26]
    assert default_aux_layers(32) == [1, 15, 28]
    # A 4-layer target's default repeats layer 1: such targets need explicit ids.
    assert "repeats" in aux_problem(default_aux_layers(4), 4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_matches_output_hidden_states(family):
    target = _target(family, aux=[0, 1, 2])
    ids = torch.randint(0, 256, (2, 12))
    aux, last = target.features(ids)
    with torch.no_grad():
        ref = target.model(ids, output_hidden_states=True)
    expected = torch.cat([ref.hidden_states[i + 1] for i in target.aux_layers], dim=-1)
    assert aux.shape == (2, 12, 3 * target.hidden_size)
    torch.testing.assert_close(aux, expected, rtol=0, atol=0)
    # last_hidden_state is after the final norm: the logits are lm_head(last).
    torch.testing.assert_close(target.model.lm_head(last), ref.logits, rtol=1e-6, atol=1e-6)


def test_capture_with_right_padding_matches_unpadded():
    target = _target("llama", aux=[0, 1, 2])
    ids = torch.randint(0, 256, (1, 9))
    padded = torch.cat([ids, torch.full((1, 4), 257)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    aux, last = target.features(ids)
    aux_p, last_p = target.features(padded, mask)
    torch.testing.assert_close(aux_p[:, :9], aux, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_p[:, :9], last, rtol=1e-5, atol=1e-5)


def test_capture_removes_its_hooks():
    target = _target("llama", aux=[0, 1, 2])
    target.features(torch.randint(0, 256, (1, 5)))
    assert all(not layer._forward_hooks for layer in target.model.model.layers)


def test_aux_layer_checks():
    assert aux_problem([1, 2, 3], 4) is None
    assert "aux layers [1, 2, 4]: [4] outside the target's 4 layers" in aux_problem([1, 2, 4], 4)
    assert "must list 3 layers" in aux_problem([1, 2], 4)
    assert "repeats" in aux_problem([1, 1, 2], 4)
    # Targets, drafts and exports share the rule; only the name in the message differs.
    assert aux_problem([1, 1, 2], 4, "target.aux_layers").startswith("target.aux_layers [1, 1, 2]")


def _teacher_reference(hidden, weight, bias, draft_ids):
    logits = torch.nn.functional.linear(hidden, weight, bias).double()
    return torch.softmax(logits[:, draft_ids], dim=-1), logits.argmax(dim=-1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_teacher_matches_full_vocab_reference(tied, chunk):
    target = _target("llama_tied" if tied else "llama", aux=[0, 1, 2])
    weight, bias = target.lm_head()
    if tied:
        assert weight.data_ptr() == target.embed_weight().data_ptr()
    ids = torch.randint(0, 256, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding: its rows are computed like any other and later ignored
    _, last = target.features(ids, mask)
    hidden = last.reshape(-1, last.shape[-1])
    draft_ids = torch.sort(torch.randperm(target.vocab_size)[:50]).values
    probs, argmax = teacher(hidden, weight, draft_ids, lm_head_bias=bias, chunk=chunk)
    ref_probs, ref_argmax = _teacher_reference(hidden, weight, bias, draft_ids)
    assert probs.dtype == torch.float32 and probs.shape == (22, 50)
    torch.testing.assert_close(probs.double(), ref_probs, rtol=0, atol=1e-6)
    assert torch.equal(argmax, ref_argmax)


def test_teacher_argmax_ties_take_the_first_index():
    weight = torch.zeros(6, 2)
    weight[2] = weight[4] = torch.tensor([1.0, 1.0])  # two tokens with identical logits
    hidden = torch.tensor([[1.0, 0.5], [-1.0, -1.0]])
    _, argmax = teacher(hidden, weight, torch.tensor([0, 4]), chunk=1)
    assert argmax.tolist() == [2, 0]  # row 2: logits all 0 except negatives -> first zero


def test_teacher_applies_softcap():
    weight = torch.randn(10, 4) * 10
    hidden = torch.randn(3, 4)
    draft_ids = torch.arange(10)
    probs, _ = teacher(hidden, weight, draft_ids, softcap=5.0)
    expected = torch.softmax(torch.tanh(hidden @ weight.T / 5.0) * 5.0, dim=-1)
    torch.testing.assert_close(probs, expected)


def test_chunk_budget():
    assert chunk_tokens(49152, 64) == 341
    assert chunk_tokens(10**9, 1) == 1


def test_load_target_from_directory(tmp_path):
    save_tiny_target(tmp_path / "tiny", "qwen3")
    target = load_target(TargetConfig(path=str(tmp_path / "tiny"), aux_layers=[0, 1, 2]))
    assert not any(p.requires_grad for p in target.model.parameters())
    assert not target.model.training
    assert target.tokenizer.eos_token == "<|im_end|>"
    with pytest.raises(TargetError, match=r"aux_layers \[0, 1, 9\]"):
        load_target(TargetConfig(path=str(tmp_path / "tiny"), aux_layers=[0, 1, 9]))


def _cli_error(capsys, *argv) -> str:
    assert main(["target", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err


def test_bad_target_paths_give_one_line_errors(tmp_path, capsys):
    assert "does not exist" in _cli_error(capsys, f"target.path={tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _cli_error(capsys, f"target.path={tmp_path / 'empty'}")
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    err = _cli_error(capsys, f"target.path={corrupt}", f"target.cache_dir={tmp_path / 'c'}")
    assert "not a readable GGUF file" in err and "download it again" in err
    assert "expected a mapping" not in err


def test_unsupported_gguf_architecture(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(path, "rwkv7")
    writer.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = _cli_error(capsys, f"target.path={path}", f"target.cache_dir={tmp_path / 'c'}")
    assert "architecture 'rwkv7' is not supported" in err


def test_hub_ids_are_passed_through(tmp_path):
    assert resolve_target_path("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


@pytest.mark.slow
def test_smollm2_capture_matches_output_hidden_states(smollm2):
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")[
        "input_ids"
    ]
    aux, last = smollm2.features(ids)
    with torch.no_grad():
        ref = smollm2.model(ids, output_hidden_states=True)
    assert smollm2.aux_layers == [1, 14, 26]
    expected = torch.cat([ref.hidden_states[i + 1] for i in smollm2.aux_layers], dim=-1)
    torch.testing.assert_close(aux, expected, rtol=0, atol=0)
    torch.testing.assert_close(smollm2.model.lm_head(last), ref.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_chats_and_cached_copy_has_identical_logits(smollm2, smollm2_dir):
    from transformers import AutoModelForCausalLM

    tok = smollm2.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = smollm2.model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    # The cached HF copy reproduces the GGUF's dequantised weights exactly.
    from draftforge.target import smollm2_gguf_path

    gguf_path = smollm2_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    with torch.no_grad():
        assert torch.equal(original(ids).logits, smollm2.model(ids).logits)
    assert smollm2_dir.is_dir()


def test_cli_config_prints_yaml_and_help_lists_options():
    out = subprocess.run(
        [sys.executable, "-m", "draftforge.cli", "config", "training.lr=0.5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "lr: 0.5" in out
    help_text = subprocess.run(
        [sys.executable, "-m", "draftforge.cli", "config", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "training.lr = 0.0001" in help_text and "peak learning rate" in help_text


def test_load_tokenizer_reads_folders_passes_objects_and_names_what_is_missing(tmp_path):
    tok = tiny_tokenizer()
    assert load_tokenizer(tok) is tok
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    text = "<|im_start|>user\nhi<|im_end|>"
    assert loaded.encode(text) == tok.encode(text)
    with pytest.raises(
        TargetError, match=f"cannot load the tokenizer of {tmp_path / 'nothing.gguf'}"
    ):
        load_tokenizer(tmp_path / "nothing.gguf")
