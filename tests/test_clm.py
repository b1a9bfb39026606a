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


def test_clm_training_lowers_held_out_perplexity(in_tmp, tiny_llama, capsys):
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
    # generate continues plain text for a clm run (no chat template: the prompt is text to go on with)
    capsys.readouterr()
    assert main(["generate", str(in_tmp / "runs" / "clm"), "the movie was", "--json", "--max-new-tokens", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the same as greedy decoding straight from the raw prompt's tokens: no template wrapped around it
    from tunesmith.trained import load_trained

    t = load_trained(in_tmp / "runs" / "clm")
    ids = t.tokenizer("the movie was", return_tensors="pt").input_ids
    raw = t.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert out["answer"] == t.tokenizer.decode(raw, skip_special_tokens=True).strip()


def test_blocks_keep_every_token_and_pack_keeps_documents_apart(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [{"text": " ".join(["the movie was good"] * n)} for n in (1, 7, 3, 12, 2)]
    data = DataConfig(train="x", max_length=16)
    docs = sum(len(tok(r["text"])["input_ids"]) + 1 for r in rows)  # each closed by EOS
    for pack in (False, True):
        prepared = clm.prepare({"train": Split(rows, "x")}, tok, clm.Config(blocks=True, pack=pack), data)
        blocks = prepared.examples["train"]
        assert sum(len(b["input_ids"]) for b in blocks) == docs
        assert all(len(b["input_ids"]) == 16 for b in blocks[:-1])
        assert prepared.card["train"]["truncated"] == 0
        assert ("position_ids" in blocks[0]) == pack
    cut = clm.prepare({"train": Split(rows, "x")}, tok, clm.Config(), data)
    assert cut.card["train"]["truncated"] == 2 and sum(len(e["input_ids"]) for e in cut.examples["train"]) < docs


def test_shifted_token_losses_equal_the_sliced_computation():
    """Shifting labels instead of logits (to avoid copying the logits) changes nothing in the numbers."""
    import torch
    import torch.nn.functional as F

    from tunesmith.objectives.lm import shifted_token_losses

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[1, 4:] = -100
    losses, mask = shifted_token_losses(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100,
                               reduction="none").view(3, 6)
    assert torch.equal(mask, labels[:, 1:] != -100)
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-6)
