"""The cost model: what it times, its arithmetic, and that timing leaves the engine usable."""

import pytest
import torch

from draftforge.decode.costs import DecodeCosts, measure_costs
from draftforge.decode.engine import SpecEngine
from draftforge.decode.tree import TreeShape
from draftforge.testing import as_target, bigram_like_target, oracle_draft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "hf"])
@pytest.mark.parametrize("shape", [TreeShape(3, 1), TreeShape(3, 2, 6), TreeShape(0)])
def test_measured_costs_cover_the_shape_and_leave_the_engine_usable(shape, lean):
    target = as_target(bigram_like_target("llama", seed=1))
    draft = oracle_draft(target)
    engine = SpecEngine(target, draft, shape, lean=lean)
    prompt = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(0))
    before = engine.generate(prompt, 30, stop_ids=()).tokens
    costs = measure_costs(engine, tree_sizes=[8], context=40, repeats=2, warmup=1)
    assert costs.path == engine.path.name and costs.context == 40
    assert costs.target_step_ms > 0 and costs.verify_ms[1] == costs.target_step_ms
    if shape.drafting:
        assert set(costs.verify_ms) == {1, shape.draft_tokens, 8}
        assert costs.draft_step_ms > 0 and costs.draft_round_ms > 0  # times: no order assumed
    else:
        assert set(costs.verify_ms) == {1, 8} and costs.draft_round_ms is None
    assert engine.generate(prompt, 30, stop_ids=()).tokens == before


def test_round_cost_and_speedup_arithmetic():
    costs = DecodeCosts(
        path="lean",
        threads=1,
        context=10,
        target_step_ms=20.0,
        verify_ms={1: 20.0, 4: 25.0},
        draft_step_ms=3.0,
        draft_round_ms=10.0,
    )
    assert costs.round_ms(4) == 35.0 and costs.round_ms(8) is None
    assert costs.speedup_at(2.8, 4) == pytest.approx(2.8 * 20 / 35)
    text = "\n".join(costs.lines())
    assert "target step 20.0 ms" in text and "n=4: a round costs 1.75 target steps" in text
