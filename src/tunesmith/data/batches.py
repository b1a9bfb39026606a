"""Which examples go into which batch, in which order: seeded, resumable, grouped by length.

Batches are a pure function of (lengths, batch size, seed, epoch), so a resumed run rebuilds the
exact order of the interrupted one and skips what it had done.
"""

from __future__ import annotations

import random


def train_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, mega: int = 50) -> list[list[int]]:
    """Shuffled batches of example indices for one epoch.

    With `group_by_length`, indices are shuffled, cut into mega-batches of `mega` batches, each
    sorted by length and cut into batches; then the batches are shuffled. Padding drops sharply
    while every batch still draws from the whole dataset.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        span = batch_size * mega
        order = [i for s in range(0, len(order), span)
                 for i in sorted(order[s:s + span], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches for evaluation: sorted by length (least padding), order does not matter."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This process's share of the batches; every process gets the same number."""
    if world == 1:
        return batches
    per = len(batches) // world
    return batches[rank:per * world:world]
