import json
from pathlib import Path

from draftforge.plan import count_target_params, draft_params, load_text_config, plan_layouts
from draftforge.testing import tiny_config, tiny_target

CONFIGS = Path(__file__).parents[1] / "benchmarks" / "model_configs"


def test_parameter_counts_are_exact(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(tiny_config("qwen3_moe").to_json_string())
    config = load_text_config(path)
    assert count_target_params(config) == sum(
        p.numel() for p in tiny_target("qwen3_moe").parameters()
    )


def test_draft_parameter_count_matches_the_module():
    from draftforge.models import build_draft

    config = tiny_config("llama")
    draft = build_draft("eagle3", config, [0, 1, 2], 100)
    trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in draft.parameters() if not p.requires_grad)
    assert draft_params(config, 100) == (trainable, frozen)


def test_real_configs_have_their_published_sizes_and_shrink_with_more_gpus():
    sizes = {"llama-3.1-8b": 8.03e9, "llama-3.3-70b": 70.55e9, "qwen3-235b-a22b": 235.09e9}
    for name, params in sizes.items():
        config = load_text_config(CONFIGS / f"{name}.json")
        assert abs(count_target_params(config) - params) / params < 1e-3
        plans = plan_layouts(config, [1, 2, 4, 8], tokens=2048)
        for layout in ("tp", "fsdp"):
            totals = [p.total for p in plans if p.layout == layout]
            assert totals == sorted(totals, reverse=True)
    assert json.loads((CONFIGS / "llama-3.1-8b.json").read_text())["num_key_value_heads"] == 8
