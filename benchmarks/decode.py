"""Speculative decoding: acceptance length, tokens/s and speedup for several draft shapes.

python benchmarks/decode.py [--target tiny|smollm2|PATH] [--draft DIR] [--prompts N]
                            [--max-new-tokens N] [--threads N]

tiny (default, no download, seconds): a bigram-like tiny target with the hand-built oracle
draft of draftforge.testing, so paths are long and the engine's bookkeeping shows.
smollm2 or a model directory: an untrained draft unless --draft is given; with AL ~ 1 the
speedup column then measures what drafting and verification cost per round.
"""

import argparse

import torch

from draftforge.config import TargetConfig
from draftforge.decode.evaluate import load_prompts, sweep
from draftforge.decode.sampling import SamplingParams
from draftforge.decode.tree import TreeShape
from draftforge.drafts import load_draft_for
from draftforge.models import build_draft
from draftforge.target import load_target
from draftforge.testing import as_target, bigram_like_target, oracle_draft

SHAPES = [
    TreeShape(1, 1),
    TreeShape(3, 1),
    TreeShape(5, 1),
    TreeShape(3, 4, 8),
    TreeShape(5, 4, 16),
    TreeShape(6, 8, 32),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="tiny")
    parser.add_argument("--draft", help="checkpoint or export directory (default: see above)")
    parser.add_argument("--prompts", type=int, default=4, help="first N built-in prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.target == "tiny":
        target = as_target(bigram_like_target("llama", seed=1, dtype=torch.float32))
        draft = oracle_draft(target)
    else:
        target = load_target(TargetConfig(path=args.target))
        if args.draft:
            draft = load_draft_for(args.draft, target)
        else:
            draft = build_draft("eagle3", target.config, target.aux_layers, 32000)
            draft.load_target_embedding(target.embed_weight())
            draft = draft.to(target.model.dtype).eval().requires_grad_(False)
    prompts = load_prompts()[: args.prompts]
    sampling = SamplingParams(temperature=args.temperature)
    print(
        f"target {target.path}, {len(prompts)} prompts x {args.max_new_tokens} tokens, "
        f"temperature {args.temperature}, {torch.get_num_threads()} threads"
    )
    # sweep prints the baseline, then the table one row at a time as each shape finishes.
    sweep(target, draft, prompts, SHAPES, sampling, args.max_new_tokens, log=print)


if __name__ == "__main__":
    main()
