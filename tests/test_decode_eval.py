"""`draftforge eval` / `bench` and prompt loading, on a tiny target saved to disk."""

import json
from pathlib import Path

import pytest
import torch

from draftforge.cli import main
from draftforge.decode.engine import Generation
from draftforge.decode.errors import DecodeError
from draftforge.decode.evaluate import BUILTIN_PROMPTS, Totals, encode, load_prompts
from draftforge.models import build_draft
from draftforge.testing import (
    as_target,
    bigram_like_target,
    oracle_draft,
    save_draft,
    tiny_target,
    tiny_tokenizer,
)

LONG = "tell me more about bytes " * 30  # > 512 byte tokens: longer than the tiny target allows


pytestmark = pytest.mark.usefixtures("one_thread")


def save_target(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decode_eval")
    model = bigram_like_target("llama", seed=1, dtype=torch.float32)
    save_target(model, root / "target")
    save_draft(oracle_draft(as_target(model)), root / "target", root / "run")
    write_jsonl(
        root / "prompts.jsonl",
        [
            {"id": "chat", "messages": [{"role": "user", "content": "alpha beta gamma"}]},
            {"question_id": 7, "turns": ["first turn", "second turn is ignored"]},
            {"prompt": "plain prompt"},
            {"id": "long", "prompt": LONG},
        ],
    )
    return root


def test_eval_reports_acceptance_and_speed(workdir, capsys):
    out = workdir / "report.json"
    args = ["eval", "--draft", str(workdir / "run"), "--prompts", str(workdir / "prompts.jsonl")]
    args += ["--num-steps", "3", "--topk", "2", "--num-draft-tokens", "5"]
    assert main([*args, "--max-new-tokens", "24", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_prompts"] == 4
    assert report["acceptance_length"] > 1.5
    assert len(report["accept_rate_per_position"]) == 3
    assert 0 < report["accept_rate_per_position"][0] <= 1
    # Greedy speculation reproduces both the no-drafting engine and HF generate.
    assert report["greedy_identical_prompts"] == {"baseline": 4, "generate": 4}
    assert report["truncated_prompts"] == ["long"]
    assert report["speculative"]["tokens_per_s"] > 0 and report["speedup_vs_baseline"] > 0
    assert 0 < report["speculative"]["prefill_seconds"] < report["speculative"]["seconds"]
    assert report["decode_speedup_vs_baseline"] > 0
    assert report["settings"]["num_draft_tokens"] == 5
    assert [r["id"] for r in report["per_prompt"]] == ["chat", "7", "3", "long"]
    printed = capsys.readouterr().out
    assert "acceptance length" in printed
    assert "greedy output identical to baseline on 4/4 prompts" in printed
    assert "decoding phase alone (the prefill left out): speedup" in printed
    assert "greedy output identical to generate on 4/4 prompts" in printed
    # With neither reference run there is nothing to compare against, and nothing is said.
    assert main([*args, "--max-new-tokens", "8", "--no-baseline", "--no-generate"]) == 0
    assert "identical" not in capsys.readouterr().out


def test_totals_leave_the_prefill_out_of_the_decoding_rate():
    """The decoding rate counts the tokens after each sequence's first over the time after
    its prefill; a sequence that ended at its first token adds only prefill."""
    totals = Totals()
    totals.add(
        Generation(tokens=[5, 6, 7, 8, 9], prompt_tokens=3, seconds=2.0, prefill_seconds=0.5)
    )
    totals.add(Generation(tokens=[4], prompt_tokens=2, seconds=0.25, prefill_seconds=0.25))
    assert totals.tokens_per_s == 6 / 2.25
    assert totals.decode_tokens_per_s == 4 / 1.5
    assert totals.summary()["prefill_seconds"] == 0.75
    only_prefill = Totals()
    only_prefill.add(Generation(tokens=[4], prompt_tokens=2, seconds=0.25, prefill_seconds=0.25))
    assert only_prefill.decode_tokens_per_s == 0.0


def test_eval_handles_prompts_that_end_at_once(workdir):
    """A target whose every prediction is its EOS: no verification round ever runs."""
    model = tiny_target("llama", seed=2)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # all logits 0: argmax is token 0
    model.generation_config.eos_token_id = 0
    target_dir = save_target(model, workdir / "eos_target")
    run = save_draft(oracle_draft(as_target(model)), target_dir, workdir / "eos_run")
    out = workdir / "eos.json"
    prompts = str(workdir / "prompts.jsonl")
    assert main(["eval", "--draft", str(run), "--prompts", prompts, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["acceptance_length"] is None
    assert all(r["new_tokens"] == 1 and r["stop"] == "eos" for r in report["per_prompt"])


def test_bench_writes_table_and_plot(workdir, capsys):
    out = workdir / "bench"
    args = ["bench", "--draft", str(workdir / "run"), "--num-steps", "1,2", "--topk", "1,2"]
    args += ["--temperature", "0.7", "--top-p", "0.9"]  # sampled chains, point-mass trees
    args += ["--min-prob", "0,0.999"]  # a floor the untrained draft never reaches
    assert main([*args, "--max-new-tokens", "12", "--limit", "2", "--out-dir", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    shapes = [(1, 1), (2, 1), (1, 2), (2, 2)]
    rows = [(r["num_steps"], r["topk"], r["min_prob"]) for r in result["rows"]]
    assert rows == [(*s, 0.0) for s in shapes] + [(*s, 0.999) for s in shapes]
    assert all(r["acceptance_length"] >= 1 for r in result["rows"])
    assert all(r["decode_speedup"] > 0 for r in result["rows"])
    drafted = [r["drafted_per_round"] for r in result["rows"]]
    assert drafted[:4] == [1, 2, 2, 4] and drafted[4:] == [0, 0, 0, 0]
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "speedup" in capsys.readouterr().out


def test_eval_refuses_bad_inputs(workdir, capsys):
    empty = workdir / "empty.jsonl"
    empty.write_text("\n")
    assert main(["eval", "--draft", str(workdir / "run"), "--prompts", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err

    narrow = tiny_target("llama", seed=0, hidden_size=32, intermediate_size=64)
    draft = build_draft("eagle3", narrow.config, [0, 1, 2], 320)
    run = save_draft(draft, workdir / "target", workdir / "narrow_run")
    assert main(["eval", "--draft", str(run), "--prompts", str(workdir / "prompts.jsonl")]) == 2
    assert "hidden_size 32 != target hidden_size 64" in capsys.readouterr().err

    deep = tiny_target("llama", seed=0, num_hidden_layers=8)
    draft = build_draft("eagle3", deep.config, [1, 3, 6], 320)
    run = save_draft(draft, workdir / "target", workdir / "deep_run")
    assert main(["eval", "--draft", str(run), "--prompts", str(workdir / "prompts.jsonl")]) == 2
    assert "aux layers [1, 3, 6]: [6] outside the target's 4 layers" in capsys.readouterr().err


def test_prompt_formats(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "dropped: this is what we generate"},
            ]
        },
        {"turns": ["one", "two"]},
        {"prompt": "three"},
    ]
    prompts = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.messages[-1]["content"] for p in prompts] == ["hi", "one", "three"]
    assert prompts[0].messages[0]["role"] == "system" and len(prompts[0].messages) == 2
    with pytest.raises(DecodeError, match=r"p2.jsonl:2: expected a `messages`"):
        load_prompts(write_jsonl(tmp_path / "p2.jsonl", [{"prompt": "ok"}, {"text": "x"}]))
    with pytest.raises(DecodeError, match="user turn"):
        load_prompts(write_jsonl(tmp_path / "p3.jsonl", [{"messages": []}]))


def test_builtin_prompts_cover_the_categories():
    prompts = load_prompts()
    assert load_prompts(BUILTIN_PROMPTS) == prompts and len(prompts) >= 40
    categories = {p.id.rsplit("-", 1)[0] for p in prompts}
    assert categories == {
        "writing",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
        "roleplay",
    }
    target = as_target(tiny_target("llama"))
    assert all(len(encode(target, p)) > 10 for p in prompts)
