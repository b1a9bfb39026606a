"""The training loop's parts: batching and schedules (exact accumulation, seeds and NaN: test_invariants.py)."""

from __future__ import annotations

import pytest

from tunesmith.data.batches import eval_batches, shard, train_batches
from tunesmith.train.schedule import lr_lambda, warmup_steps


def test_train_batches_cover_every_example_once_and_depend_on_seed_and_epoch():
    lengths = [(i * 37) % 50 + 1 for i in range(203)]
    a = train_batches(lengths, 8, seed=0, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(203))
    assert a == train_batches(lengths, 8, seed=0, epoch=0)
    assert a != train_batches(lengths, 8, seed=0, epoch=1)
    assert a != train_batches(lengths, 8, seed=1, epoch=0)


def test_grouping_by_length_cuts_padding():
    lengths = [(i * 7919) % 120 + 4 for i in range(2000)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = padding(train_batches(lengths, 16, 0, 0, group_by_length=True))
    plain = padding(train_batches(lengths, 16, 0, 0, group_by_length=False))
    assert grouped < plain / 5


def test_shard_gives_every_process_the_same_number_of_batches():
    batches = [[i] for i in range(10)]
    parts = [shard(batches, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert not set(map(tuple, parts[0])) & set(map(tuple, parts[1]))


def test_eval_batches_are_sorted_and_complete():
    lengths = [3, 9, 1, 7]
    batches = eval_batches(lengths, 3)
    assert batches == [[1, 3, 0], [2]]


@pytest.mark.parametrize("kind,expect", [
    ("linear", [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6]),
    ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]),
])
def test_schedules(kind, expect):
    f = lr_lambda(kind, warmup=4, total=10)
    assert [round(f(s), 4) for s in range(7)] == [round(x, 4) for x in expect]


def test_cosine_ends_at_zero_and_warmup_fraction():
    f = lr_lambda("cosine", 0, 100)
    assert f(0) == pytest.approx(1.0) and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert warmup_steps(0.1, 250) == 25 and warmup_steps(30, 250) == 30
