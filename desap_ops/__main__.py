"""``python -m desap_ops`` / ``desap``: prune a random LLaVA-1.5-shaped batch and show what it kept."""
from __future__ import annotations

import argparse
import sys

import torch


def example(args: argparse.Namespace) -> int:
    import desap_ops

    gen = torch.Generator().manual_seed(args.seed)
    batch, tokens, width, text_width, n_text = args.batch, 576, 1024, 4096, 32
    hidden = torch.randn(batch, tokens, width, generator=gen)
    attn = torch.randn(batch, tokens, text_width, generator=gen)
    text = torch.randn(batch, n_text, text_width, generator=gen)
    saliency = torch.rand(batch, tokens, generator=gen).softmax(dim=-1)
    result = desap_ops.prune(hidden, attn, text, saliency, args.keep, task_ratio=args.task_ratio)
    counts = torch.zeros(batch, args.keep).scatter_add_(1, result.assignment, torch.ones(batch, tokens))
    print(f"random batch: B={batch}, N={tokens} tokens (24x24 grid), D={width}, L={n_text} text tokens")
    print(f"kept {args.keep} of {tokens} per image, task_ratio={args.task_ratio}; tokens -> {tuple(result.tokens.shape)}")
    for b in range(batch):
        rows, cols = result.indices[b] // 24, result.indices[b] % 24
        print(f"image {b}: kept (row, col) " + " ".join(f"({r},{c})" for r, c in zip(rows.tolist()[:8], cols.tolist()[:8]))
              + (" ..." if args.keep > 8 else ""))
        print(f"         merged per kept token: min {int(counts[b].min())}, max {int(counts[b].max())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="desap", description=__doc__)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--task-ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return example(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
