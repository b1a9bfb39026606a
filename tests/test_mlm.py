"""Masked-LM objective on a tiny BERT: the 15% / 80-10-10 draw, fixed held-out masks, and training that
lowers the held-out masked-token loss."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.cli import main
from tunesmith.config import DataConfig
from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.data.sources import Split
from tunesmith.objectives import mlm
from tiny import make_tokenizer, sentiment_rows, write_config, write_jsonl


def test_the_draw_is_15_percent_then_80_10_10_and_never_touches_special_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 60, (200, 500), generator=g)
    maskable = torch.ones_like(ids)
    maskable[:, 0] = maskable[:, -1] = 0  # [CLS] ... [SEP]
    mask_id = torch.full((200,), 4)
    inputs, labels = mlm.mask_tokens(ids, maskable, mask_id, vocab=60, probability=0.15, generator=g)
    chosen = labels != IGNORE_INDEX
    assert chosen.float().mean().item() == pytest.approx(0.15 * 498 / 500, abs=0.005)
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    n = chosen.sum().item()
    masked = (inputs == 4) & chosen
    kept = (inputs == ids) & chosen
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.01)
    # a random replacement can hit the original token (1 in 60 here): "kept" is 10% plus that
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / 60, abs=0.01)


def test_held_out_masks_are_drawn_once_and_the_same_in_every_run():
    tok = make_tokenizer("bert")
    splits = {"train": Split(sentiment_rows(8), "x"), "test": Split(sentiment_rows(40, seed=4), "y")}
    a = mlm.prepare(splits, tok, mlm.Config(), DataConfig(train="x"))
    b = mlm.prepare(splits, tok, mlm.Config(), DataConfig(train="x"))
    assert a.examples["test"] == b.examples["test"]
    assert all("labels" in ex for ex in a.examples["test"]) and "labels" not in a.examples["train"][0]
    labels = [l for ex in a.examples["test"] for l in ex["labels"]]
    assert 0.05 < sum(l != IGNORE_INDEX for l in labels) / len(labels) < 0.25


def counting_rows(n: int, seed: int) -> list[dict]:
    """Runs of counting words ("three four five six"): every masked word follows from its neighbours."""
    import random

    numbers = "one two three four five six seven eight nine ten".split()
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(5)
        rows.append({"text": " ".join(numbers[start:start + rng.randint(4, 6)])})
    return rows


def test_mlm_training_lowers_held_out_masked_token_loss(in_tmp, tiny_bert):
    d = in_tmp / "d"
    write_jsonl(d / "train.jsonl", counting_rows(256, seed=1))
    write_jsonl(d / "validation.jsonl", counting_rows(32, seed=2))
    write_jsonl(d / "test.jsonl", counting_rows(64, seed=3))
    cfg = write_config(in_tmp / "c.yaml", f"""\
name: mlm
model: {tiny_bert}
data: {{train: {d}, max_length: 32, checks: {{leakage: {{exact: warn}}}}}}  # counting runs repeat by nature
tuning: {{kind: full}}
objective: {{kind: mlm}}
eval: {{forgetting: {{enabled: false}}}}
train: {{epochs: 6, batch_size: 16, lr: 5.0e-3}}
""")
    assert main(["train", str(cfg)]) == 0
    s = json.loads((in_tmp / "runs" / "mlm" / "summary.json").read_text())
    assert s["test"]["loss"] < s["base"]["test"]["loss"] / 2
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(in_tmp / "runs" / "mlm" / "model")  # loads with plain transformers


def test_mlm_needs_a_mask_token(tiny_llama, capsys, in_tmp):
    write_jsonl(in_tmp / "t.jsonl", [{"text": "the movie"}] * 20)
    cfg = write_config(in_tmp / "c.yaml", f"name: m\nmodel: {tiny_llama}\ndata: {{train: {in_tmp / 't.jsonl'}}}\n"
                                         "objective: mlm\n")
    assert main(["train", str(cfg)]) == 2
    assert "no mask token" in capsys.readouterr().err
