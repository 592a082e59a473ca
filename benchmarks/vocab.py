"""Time the draft-vocabulary builder on a 256k target vocabulary and 10M tokens.

python benchmarks/vocab.py [--tokens N] [--vocab V] [--draft D]
"""

import argparse
import time

import torch

from draftforge.data import build_draft_vocab


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--draft", type=int, default=32_000)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    # Zipf-like frequencies, as in text: token k has weight 1 / (k + 10).
    weights = 1.0 / (torch.arange(args.vocab, dtype=torch.float64) + 10)
    ids = torch.multinomial(weights, args.tokens, replacement=True, generator=g).to(torch.int32)
    mask = (torch.rand(args.tokens, generator=g) < 0.5).to(torch.uint8)  # stored dtypes

    timings = []
    for _ in range(3):
        start = time.perf_counter()
        vocab = build_draft_vocab(
            ids, mask, target_vocab_size=args.vocab, draft_vocab_size=args.draft
        )
        timings.append(time.perf_counter() - start)
    print(f"{'tokens':>12} {'vocab':>8} {'draft':>7} {'best s':>8} {'mean s':>8} {'coverage':>9}")
    print(
        f"{args.tokens:>12} {args.vocab:>8} {args.draft:>7} {min(timings):>8.3f} "
        f"{sum(timings) / len(timings):>8.3f} {vocab.coverage:>9.2%}"
    )


if __name__ == "__main__":
    main()
