"""Preflight (`draftforge check`, and the same checks at the start of train and capture):
each seeded fault is caught with a one-line finding that names what to change, and a
healthy config passes."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from draftforge.check import (
    Finding,
    PreflightError,
    TargetFacts,
    aux_findings,
    disk_findings,
    layout_findings,
    memory_findings,
    vocab_findings,
)
from draftforge.cli import main
from draftforge.config import load_config
from draftforge.data import PrepareResult
from draftforge.data.vocab import DraftVocab
from draftforge.features import prepare_data
from draftforge.offline import capture
from draftforge.plan import load_text_config
from draftforge.testing import save_tiny_target, tiny_run_overrides, tiny_tokenizer, write_tiny_run
from draftforge.train import train

# A ChatML template that leaves the assistant turns out: nothing to supervise.
NO_ASSISTANT = (
    "{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ChatML closing turns with <|eot|>, which the tokenizer does not have.
UNKNOWN_EOT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run (4-layer target, 120 conversations), an 8-layer target beside it (whose
    default aux layers, [1, 3, 4], can be shifted by one), and the two faulty templates."""
    root = write_tiny_run(tmp_path_factory.mktemp("check"))
    save_tiny_target(root / "target8", num_hidden_layers=8)
    (root / "no_assistant.jinja").write_text(NO_ASSISTANT)
    (root / "unknown_eot.jinja").write_text(UNKNOWN_EOT)
    return root


def _check(root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, list[str]]:
    """`draftforge check` on the tiny run: exit code and the finding lines it printed."""
    code = main(["check", *tiny_run_overrides(root, root / "out"), *extra])
    out = capsys.readouterr().out.splitlines()
    return code, [line for line in out if line.startswith(("error: ", "warning: "))]


def test_healthy_config_passes(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, findings = _check(root, capsys)
    assert (code, findings) == (0, [])


# (overrides, the finding's level, what its line says)
FAULTS = {
    "no_assistant_mask": (
        ["data.chat_template={root}/no_assistant.jinja"],
        "error",
        "the chat template gives no assistant token to supervise (the template leaves out "
        "assistant message 1) in 8 of the first 8 rows; rendered: '<|im_start|>user\\n",
    ),
    "aux_out_of_range": (
        ["target.aux_layers=[0,1,4]"],
        "error",
        "target.aux_layers [0, 1, 4]: [4] outside the target's 4 layers (valid ids 0..3",
    ),
    "aux_engine_shifted": (
        ["target.path={root}/target8", "target.aux_layers=[2,4,5]"],
        "warning",
        "target.aux_layers [2, 4, 5] is the default [1, 3, 4] shifted by one: "
        "target.aux_layers counts 'output of layer i' (0-based), as SGLang's",
    ),
    "small_draft_vocab": (
        ["draft.draft_vocab_size=8"],
        "warning",
        "the draft vocabulary (draft.draft_vocab_size=8) covers 77.5% of the supervised "
        "tokens (< 90%)",
    ),
    "missing_end_of_turn": (
        ["data.chat_template={root}/unknown_eot.jinja"],
        "error",
        "the chat template ends assistant turns with '<|eot|>', which is 7 tokens, none of "
        "them special",
    ),
}


@pytest.mark.parametrize(("extra", "level", "says"), FAULTS.values(), ids=list(FAULTS))
def test_seeded_fault_is_one_line(
    root: Path, capsys: pytest.CaptureFixture[str], extra: list[str], level: str, says: str
) -> None:
    code, findings = _check(root, capsys, *(e.format(root=root) for e in extra))
    assert code == (1 if level == "error" else 0)
    assert len(findings) == 1, findings
    assert findings[0].startswith(f"{level}: ")
    assert says in findings[0]


def test_out_of_range_aux_ids_say_what_they_are_as_hidden_states_indices() -> None:
    (finding,) = aux_findings([2, 3, 4], 4)
    assert finding.error
    assert "if these are Hugging Face hidden_states indices" in finding.message
    assert "they are [1, 2, 3] here" in finding.message
    assert aux_findings([1, 15, 28], 32) == []  # the default is no finding
    assert aux_findings(None, 32) == []


def _prepared(root: Path, vocab_size: int = 320) -> PrepareResult:
    cfg = load_config(None, tiny_run_overrides(root, root / "out"))
    return prepare_data(cfg, tiny_tokenizer(), vocab_size)


def test_disagreeing_d2t_and_t2d_are_an_error(root: Path) -> None:
    cfg = load_config(None, tiny_run_overrides(root, root / "out"))
    prepared = _prepared(root)
    t2d = prepared.vocab.t2d.clone()
    t2d[int(prepared.vocab.target_ids[0])] = False  # a draft id the mask leaves out
    broken = DraftVocab(prepared.vocab.d2t, t2d, prepared.vocab.coverage)
    (finding,) = vocab_findings(cfg, PrepareResult(prepared.dataset, broken, prepared.vocab_path))
    assert finding.error
    assert "d2t and t2d disagree" in finding.message and "\n" not in finding.message


def _facts(config_json: Path) -> TargetFacts:
    config = load_text_config(config_json)
    return TargetFacts("x", config, None, config.vocab_size, set(), torch.bfloat16)


def test_memory_beyond_the_host_is_a_warning_naming_the_layout() -> None:
    """On CPU the plan per rank, times the ranks of this host, against its RAM: a 70B target
    is far beyond this machine."""
    configs = Path(__file__).parents[1] / "benchmarks" / "model_configs"
    cfg = load_config(None, ["target.path=x", "training.tokens_per_batch=4096"])
    facts = _facts(configs / "llama-3.3-70b.json")
    cpu = torch.device("cpu")
    (finding,) = memory_findings(cfg, facts, world=2, device=cpu, stage="train")
    assert not finding.error
    assert finding.message.startswith("memory: about ")
    assert "parallel.tp=1, parallel.fsdp=none" in finding.message
    # A tp that does not divide the processes has no memory plan: the layout check says why.
    bad = load_config(None, ["target.path=x", "parallel.tp=4"])
    assert memory_findings(bad, facts, world=2, device=cpu, stage="train") == []
    (bad_tp,) = layout_findings(bad, facts, world=2)
    assert bad_tp.error and "parallel.tp=4 does not divide the 2 processes" in bad_tp.message


def test_offline_capture_larger_than_the_disk_is_an_error(tmp_path: Path) -> None:
    configs = Path(__file__).parents[1] / "benchmarks" / "model_configs"
    features = tmp_path / "features"
    cfg = load_config(None, ["target.path=x", "data.mode=offline", f"data.features_dir={features}"])
    facts = _facts(configs / "llama-3.1-8b.json")

    def prepared(tokens: int) -> SimpleNamespace:
        return SimpleNamespace(dataset=SimpleNamespace(stats={"tokens": tokens}, key="k"))

    (finding,) = disk_findings(cfg, facts, prepared(10**15))
    assert finding.error and finding.message.startswith("disk: the offline capture needs about")
    assert "32,777 bytes/token, bfloat16" in finding.message
    assert disk_findings(cfg, facts, prepared(1)) == []
    # A finished capture of this dataset is there: nothing more to write.
    features.mkdir()
    (features / "manifest.json").write_text(json.dumps({"settings": {"dataset_key": "k"}}))
    assert disk_findings(cfg, facts, prepared(10**15)) == []


def test_train_and_capture_stop_on_errors_before_their_slow_part(root: Path) -> None:
    out = root / "stopped"
    cfg = load_config(
        None, tiny_run_overrides(root, out, **{"data.chat_template": root / "unknown_eot.jinja"})
    )
    for run in (train, capture):
        with pytest.raises(PreflightError) as err:
            run(cfg)
        assert str(err.value).startswith("the chat template ends assistant turns with '<|eot|>'")
        assert "\n" not in str(err.value)
    assert not (out / "checkpoints").exists()
    assert not (root / "cache" / "features").exists()


def test_train_prints_warnings_and_goes_on(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = root / "warned"
    overrides = {"draft.draft_vocab_size": 8, "training.max_steps": 1}
    result = train(load_config(None, tiny_run_overrides(root, out, **overrides)))
    assert result.step == 1
    printed = capsys.readouterr().out
    assert "warning: the draft vocabulary (draft.draft_vocab_size=8) covers" in printed


def test_finding_lines_name_their_level() -> None:
    assert str(Finding(True, "x")) == "error: x"
    assert str(Finding(False, "y")) == "warning: y"


def _target_gib(cfg, facts: TargetFacts, world: int, stage: str) -> float:
    """The target's share in the memory finding (this machine has too little RAM for any)."""
    (finding,) = memory_findings(cfg, facts, world=world, device=torch.device("cpu"), stage=stage)
    return float(finding.message.split("(target ")[1].split(",")[0])


def test_memory_of_offline_training_and_sharded_capture_counts_only_what_a_rank_holds() -> None:
    """Offline training holds the 70B target's head and embedding (2 x 128256 x 8192 bf16,
    3.9 GiB), not its 131 GiB of weights; a capture at tp=8 holds an eighth of them."""
    configs = Path(__file__).parents[1] / "benchmarks" / "model_configs"
    facts = _facts(configs / "llama-3.3-70b.json")
    base = ["target.path=x", "training.tokens_per_batch=4096"]
    online = _target_gib(load_config(None, base), facts, 1, "train")
    offline = _target_gib(load_config(None, [*base, "data.mode=offline"]), facts, 1, "train")
    assert online > 120 and offline == pytest.approx(2 * 128256 * 8192 * 2 / 2**30, abs=0.05)
    whole = _target_gib(load_config(None, base), facts, 8, "capture")
    split = _target_gib(load_config(None, [*base, "parallel.tp=8"]), facts, 8, "capture")
    assert whole == pytest.approx(online, abs=0.05) and split == pytest.approx(whole / 8, abs=0.1)
