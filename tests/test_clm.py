"""Causal LM objective on a tiny Llama: target tokens include the closing EOS, and training lowers perplexity."""

from __future__ import annotations

import json
import math

import pytest

from tunesmith.cli import main
from tunesmith.config import DataConfig
from tunesmith.data.sources import Split
from tunesmith.objectives import clm
from tiny import patterned_rows, write_config, write_jsonl


def test_eos_is_a_target_even_when_pad_equals_eos(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token  # as in SmolLM2: padding must not hide the real EOS
    prepared = clm.prepare({"train": Split([{"text": "the movie was good"}], "x")}, tok, clm.Config(),
                           DataConfig(train="x"))
    ex = prepared.examples["train"][0]
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    from tunesmith.data.collate import collate

    batch = collate([ex, {"input_ids": ex["input_ids"][:2], "labels": ex["labels"][:2]}], tok.pad_token_id)
    assert batch["labels"][1].tolist()[2:] == [-100] * (len(ex["input_ids"]) - 2)
    assert batch["labels"][0].tolist()[-1] == tok.eos_token_id


def test_clm_training_lowers_held_out_perplexity(in_tmp, tiny_llama):
    d = in_tmp / "d"
    write_jsonl(d / "train.jsonl", patterned_rows(64, 1))
    write_jsonl(d / "validation.jsonl", patterned_rows(8, 2))
    write_jsonl(d / "test.jsonl", patterned_rows(8, 3))
    cfg = write_config(in_tmp / "c.yaml", f"""\
name: clm
model: {tiny_llama}
data: {{train: {d}, max_length: 64}}
tuning: {{kind: full}}
objective: {{kind: clm}}
train: {{epochs: 6, batch_size: 8, lr: 3.0e-3}}
eval: {{forgetting: {{enabled: false}}}}
""")
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((in_tmp / "runs" / "clm" / "summary.json").read_text())
    assert summary["test"]["perplexity"] == pytest.approx(math.exp(summary["test"]["loss"]))
    assert summary["test"]["perplexity"] < summary["base"]["test"]["perplexity"] / 4
