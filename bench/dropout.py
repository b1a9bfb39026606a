"""tunesmith's CPU dropout (models/dropout.py) vs torch's, forward and backward, at the shapes of the examples.

    python bench/dropout.py [--repeats 30]

Shapes: MiniLM-L6 classification (batch 32 x 40 tokens, hidden 384 and 1536) and SmolLM2-135M (8 pairs x 2 x 128
tokens, hidden 576 and 1536). Prints milliseconds per call (median) for each and the ratio, and checks the share
of dropped elements against p.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tunesmith.models.dropout import dropout

SHAPES = {"minilm hidden": (32, 40, 384), "minilm mlp": (32, 40, 1536),
          "smollm2 hidden": (16, 128, 576), "smollm2 mlp": (16, 128, 1536)}


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    print(f"{torch.get_num_threads()} CPU threads; forward + backward per call, median of {args.repeats}")
    print(f"{'shape':<16}{'p':>6}{'torch ms':>10}{'ours ms':>9}{'ratio':>7}{'dropped':>9}")
    for name, shape in SHAPES.items():
        for prob in (0.05, 0.1):
            x = torch.randn(*shape, requires_grad=True)
            grad = torch.ones(*shape)
            theirs = median_ms(lambda: F.dropout(x, prob, True).backward(grad), args.repeats)
            ours = median_ms(lambda: dropout(x, prob).backward(grad), args.repeats)
            share = (dropout(x.detach(), prob) == 0).float().mean().item()
            print(f"{name:<16}{prob:>6}{theirs:>10.2f}{ours:>9.2f}{theirs / ours:>6.1f}x{share:>9.4f}")


if __name__ == "__main__":
    main()
