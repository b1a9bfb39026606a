"""Packing: several examples per sequence give the same loss (and gradients) as one example per
sequence, and a model that would let attention cross examples is refused before training."""

from __future__ import annotations

import random

import pytest
import torch

from tunesmith.config import DataConfig
from tunesmith.data.collate import IGNORE_INDEX, collate
from tunesmith.data.pack import blocks, pack
from tunesmith.data.sources import Split
from tunesmith.objectives import clm, sft
from tunesmith.objectives.lm import check_packing
from tiny import instruction_rows, make_tokenizer


def test_pack_places_every_example_once_within_capacity():
    rng = random.Random(0)
    examples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (rng.randint(2, 30) for _ in range(200))]
    packed = pack(examples, 32)
    assert all(len(p["input_ids"]) <= 32 for p in packed)
    assert sum(len(p["input_ids"]) for p in packed) == sum(len(e["input_ids"]) for e in examples)
    starts = sum(p["position_ids"].count(0) for p in packed)
    assert starts == len(examples)
    # best-fit-decreasing leaves little room unused
    assert sum(len(p["input_ids"]) for p in packed) / (32 * len(packed)) > 0.95
    assert packed == pack(examples, 32)


def test_packed_labels_never_ask_one_example_to_predict_the_next():
    a = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}
    (p,) = pack([a, b], 8)
    assert p["position_ids"] == [0, 1, 2, 0, 1]
    assert p["labels"] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]


def test_blocks_cut_the_stream_and_separate_documents_on_request():
    docs = [[1, 2, 3, 4, 0], [5, 6, 0], [7, 8, 9, 0]]
    plain = blocks(docs, 4, separate=False)
    assert [b["input_ids"] for b in plain] == [[1, 2, 3, 4], [0, 5, 6, 0], [7, 8, 9, 0]]
    assert "position_ids" not in plain[0]
    sep = blocks(docs, 4, separate=True)
    assert sep[1]["position_ids"] == [0, 0, 1, 2] and sep[1]["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 6, 0]


def _model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


def _loss_and_grads(model, objective, cfg, examples, pad_id):
    model.zero_grad()
    out = objective.loss(model, collate(examples, pad_id), cfg)
    out.total.backward()
    return float(out.total.detach()), int(out.count), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("objective,rows", [
    (sft, [dict(r) for r in instruction_rows(24, seed=5)]),
    (clm, [{"text": r["instruction"]} for r in instruction_rows(24, seed=6)]),
])
def test_packed_and_unpacked_give_the_same_loss_and_gradients(tiny_llama, objective, rows):
    tok = make_tokenizer("llama")
    data = DataConfig(train="x", max_length=40)
    unpacked = objective.prepare({"train": Split(rows, "x")}, tok, objective.Config(), data).examples["train"]
    packed = objective.prepare({"train": Split(rows, "x")}, tok, objective.Config(pack=True), data).examples["train"]
    assert len(packed) < len(unpacked) / 2
    model = _model(tiny_llama)
    loss_a, count_a, grads_a = _loss_and_grads(model, objective, objective.Config(), unpacked, tok.pad_token_id)
    loss_b, count_b, grads_b = _loss_and_grads(model, objective, objective.Config(), packed, tok.pad_token_id)
    assert count_a == count_b > 0
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_a_model_that_lets_attention_cross_examples_is_refused(tiny_llama):
    from tunesmith.errors import ConfigError

    model = _model(tiny_llama)
    check_packing(model)  # Llama on sdpa keeps packed examples apart

    class Leaky(torch.nn.Module):
        """Drops position ids: packed examples become one sequence, as with a cache or an unsupported model."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    with pytest.raises(ConfigError, match="does not keep attention inside packed examples"):
        check_packing(Leaky(model))
