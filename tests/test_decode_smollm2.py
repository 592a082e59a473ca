"""The speculative engine on the real default target (SmolLM2-135M-Instruct), untrained draft."""

import pytest
import torch

from draftforge.decode.engine import SpecEngine
from draftforge.decode.evaluate import encode, hf_generate, load_prompts
from draftforge.decode.sampling import SamplingParams
from draftforge.decode.tree import TreeShape
from draftforge.models import build_draft

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "hf"])
@pytest.mark.parametrize("shape", [TreeShape(3, 1), TreeShape(3, 4, 8)])
def test_greedy_output_is_smollm2s_own(smollm2, shape, lean):
    torch.manual_seed(0)
    draft = build_draft("eagle3", smollm2.config, smollm2.aux_layers, 32000)
    draft.load_target_embedding(smollm2.embed_weight())
    draft.eval().requires_grad_(False)
    engine = SpecEngine(smollm2, draft, shape, lean=lean)
    assert engine.path.name == ("lean" if lean else "hf")
    lengths = []
    for prompt in load_prompts()[:2]:
        ids = encode(smollm2, prompt)
        expected, _ = hf_generate(smollm2, ids, 32, SamplingParams(), engine.stop_ids)
        gen = engine.generate(ids, 32)
        assert gen.tokens == expected, prompt.id
        lengths.append(gen.acceptance_length)
    assert all(al < 1.3 for al in lengths), lengths  # an untrained draft is rejected
