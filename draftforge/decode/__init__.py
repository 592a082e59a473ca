"""Speculative decoding with EAGLE-3 drafts: the engine, lossless verification, evaluation.

``SpecEngine(target, draft, TreeShape(num_steps, topk, num_draft_tokens), SamplingParams(...))
.generate(prompt_ids, max_new_tokens)`` decodes one sequence (``images=ImageInputs(...)`` with
it for a vision-language target); ``evaluate`` runs a prompt set
and reports acceptance length and speed (``draftforge eval`` / ``draftforge bench``);
``measure_costs(engine)`` times the engine's forwards on this machine (``DecodeCosts``).
"""

from draftforge.decode.costs import DecodeCosts, measure_costs
from draftforge.decode.engine import Generation, SpecEngine
from draftforge.decode.errors import DecodeError
from draftforge.decode.evaluate import evaluate, load_prompts
from draftforge.decode.sampling import SamplingParams, verify_tree, warp
from draftforge.decode.tree import TreeShape
from draftforge.decode.vision import ImageInputs

__all__ = [
    "DecodeCosts",
    "DecodeError",
    "Generation",
    "ImageInputs",
    "SamplingParams",
    "SpecEngine",
    "TreeShape",
    "evaluate",
    "load_prompts",
    "measure_costs",
    "verify_tree",
    "warp",
]
