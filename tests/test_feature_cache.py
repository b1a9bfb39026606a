"""Freeze tuning's feature cache: a run trained on cached frozen-part outputs ends where the uncached run ends
(metrics and weights), the frozen blocks run once per distinct example, and --resume works with the cache."""

from __future__ import annotations

import copy
import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tunesmith.cli import main
from tunesmith.models.anatomy import blocks
from tunesmith.tuning import feature_cache, freeze
from tiny import classify_config, cli
from test_resume import KILLER

EXTRA = "train: {epochs: 3, batch_size: 16, lr: 3.0e-3, eval_every: epoch, log_every: 4, seed: 0}\n"


def _config(in_tmp, tiny_bert, sentiment_dir, tuning: str):
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir, tuning)
    lines = cfg.read_text().split("\n")
    cfg.write_text("\n".join(EXTRA.strip() if line.startswith("train:") else line for line in lines))
    return cfg


def _run(in_tmp, name):
    run = in_tmp / "runs" / name
    return json.loads((run / "summary.json").read_text()), load_file(run / "model" / "model.safetensors")


@pytest.mark.parametrize("tuning", ["{kind: freeze}", "{kind: freeze, train_last: 1}"])
def test_cached_training_equals_uncached(in_tmp, tiny_bert, sentiment_dir, capsys, tuning):
    cfg = _config(in_tmp, tiny_bert, sentiment_dir, tuning)
    assert main(["train", str(cfg), "name=cached"]) == 0
    assert "feature cache: the outputs of the embeddings" in capsys.readouterr().out
    assert main(["train", str(cfg), "name=plain", "tuning.cache_features=false"]) == 0
    assert "feature cache" not in capsys.readouterr().out
    (sa, wa), (sb, wb) = _run(in_tmp, "cached"), _run(in_tmp, "plain")
    for split in ("validation", "test"):
        assert sa[split] == pytest.approx(sb[split], abs=1e-5)
        assert sa["base"][split] == pytest.approx(sb["base"][split], abs=1e-5)
    def log(name):  # every logged line but the speed
        lines = [json.loads(line) for line in (in_tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k != "examples_per_s"} for line in lines]

    la, lb = log("cached"), log("plain")
    assert len(la) == len(lb) and sum("split" in line for line in la) == 3
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(la, lb))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    changed = [k for k in wa if k.startswith("classifier")]
    assert changed  # the head trained in both (a run that trains nothing would also "match")


def test_frozen_blocks_run_once_per_distinct_example(in_tmp, tiny_bert, sentiment_dir, monkeypatch, capsys):
    rows, caches = [], []
    real = freeze.speed_up

    def counted(cfg, model):
        said = real(cfg, model)
        caches.append(model.feature_cache)
        # the first block's attention runs only when the frozen blocks are computed, not looked up
        blocks(model)[1][0].attention.register_forward_hook(lambda m, a, out: rows.append(a[0].size(0)))
        return said

    monkeypatch.setattr(freeze, "speed_up", counted)
    cfg = _config(in_tmp, tiny_bert, sentiment_dir, "{kind: freeze}")
    assert main(["train", str(cfg)]) == 0
    distinct = set()
    for split in ("train", "validation", "test"):
        for line in (sentiment_dir / f"{split}.jsonl").read_text().splitlines():
            distinct.add(json.loads(line)["text"])
    (cache,) = caches
    # 3 epochs of 192 train rows, 3 validations and base + tuned scores of 48 validation and 48 test rows:
    # every one of them is computed once and looked up after
    assert sum(rows) == cache.computed == len(cache) <= len(distinct)
    assert len(cache) >= len(distinct) - 5  # texts that tokenize alike share a row
    assert cache.looked_up >= 2 * 192 + 4 * 48
    # the run says what the cache saved: the passes run and read (together, the uncached run's passes)
    assert cache.ran == sum(rows)
    assert (f"the frozen part ran on {cache.ran:,} examples and {cache.looked_up:,} passes read its stored outputs"
            in capsys.readouterr().out)


def test_resume_with_the_cache_matches_an_uninterrupted_run(in_tmp, tiny_bert, sentiment_dir):
    cfg = _config(in_tmp, tiny_bert, sentiment_dir, "{kind: freeze, train_last: 1}")
    cfg.write_text(cfg.read_text().replace("eval_every: epoch", "eval_every: 6"))
    whole = cli(["train", str(cfg), "name=whole"], in_tmp)
    assert whole.returncode == 0, whole.stderr
    killed = cli(["train", str(cfg), "name=killed"], in_tmp, {"KILL_AT_STEP": "18"}, KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = cli(["train", str(cfg), "name=killed", "--resume"], in_tmp)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 18" in resumed.stdout and "feature cache: the outputs" in resumed.stdout
    (sa, wa), (sb, wb) = _run(in_tmp, "whole"), _run(in_tmp, "killed")
    assert sa["test"] == pytest.approx(sb["test"], abs=1e-6)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def _tiny_classifier(tiny_bert, train_last=0):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    plain = copy.deepcopy(model)
    cfg = freeze.Config(train_last=train_last)
    freeze.apply(model, cfg, "sequence-classification")
    freeze.apply(plain, cfg, "sequence-classification")
    assert freeze.speed_up(cfg, model)
    return model, plain


def test_calls_the_cache_cannot_key_run_the_plain_path(tiny_bert):
    model, plain = _tiny_classifier(tiny_bert)
    model.eval(), plain.eval()
    ids = torch.randint(5, 40, (3, 7))
    left = torch.ones_like(ids)
    left[0, :3] = 0  # left padding: positions differ from a right-padded row's
    for kwargs in ({"attention_mask": left}, {"attention_mask": torch.ones_like(ids), "position_ids":
                   torch.arange(7).expand(3, 7)}, {}):
        got = model(input_ids=ids, **kwargs).logits
        assert torch.allclose(got, plain(input_ids=ids, **kwargs).logits, atol=1e-6)
    assert len(model.feature_cache) == 0


def test_lookups_match_across_batches_and_copies_run_uncached(tiny_bert):
    model, plain = _tiny_classifier(tiny_bert, train_last=1)
    ids = torch.randint(5, 40, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:], mask[3, 2:] = 0, 0
    ids = ids * mask
    model.train(), plain.train()  # dropout in the head: same seed, same masks; the frozen part has none
    for rows in ([0, 1, 2, 3], [3, 1], [1, 3, 0]):  # stored from one batch, looked up in others
        torch.manual_seed(1)
        got = model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        torch.manual_seed(1)
        assert torch.allclose(got, plain(input_ids=ids[rows], attention_mask=mask[rows]).logits, atol=1e-6)
    assert model.feature_cache.computed == 4 and model.feature_cache.looked_up == 5
    copied = copy.deepcopy(model)
    assert not copied.feature_cache.enabled and len(copied.feature_cache) == 0
    assert len(model.feature_cache) == 4


def test_disk_cache_serves_a_later_run_without_running_the_frozen_blocks(in_tmp, tiny_bert, sentiment_dir,
                                                                        monkeypatch, capsys):
    monkeypatch.setenv("TUNESMITH_HOME", str(in_tmp / "home"))
    rows, caches = [], []
    real = freeze.speed_up

    def counted(cfg, model):
        said = real(cfg, model)
        caches.append(getattr(model, "feature_cache", None))
        blocks(model)[1][0].attention.register_forward_hook(lambda m, a, out: rows.append(a[0].size(0)))
        return said

    monkeypatch.setattr(freeze, "speed_up", counted)
    cfg = _config(in_tmp, tiny_bert, sentiment_dir, "{kind: freeze, cache_features: disk}")
    assert main(["train", str(cfg), "name=first"]) == 0
    out = capsys.readouterr().out
    (file,) = (in_tmp / "home" / "feature-cache").glob("*.safetensors")
    assert f"kept in {file}" in out and f"written to {file}" in out
    first_rows = sum(rows)
    assert first_rows == caches[0].computed == len(caches[0]) > 192
    rows.clear()
    # another learning rate: the frozen part is the same, so every example is read from the file
    assert main(["train", str(cfg), "name=second", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert f"{len(caches[0]):,} examples' outputs read from {file}" in out and "written to" not in out
    assert sum(rows) == 0 and caches[1].computed == 0 and caches[1].looked_up > 0
    assert main(["train", str(cfg), "name=plain", "train.lr=1e-3", "tuning.cache_features=false"]) == 0
    (sa, wa), (sb, wb) = _run(in_tmp, "second"), _run(in_tmp, "plain")
    assert sa["test"] == pytest.approx(sb["test"], abs=1e-5)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_disk_cache_file_is_per_frozen_part_and_a_broken_one_is_replaced(in_tmp, tiny_bert):
    model, _ = _tiny_classifier(tiny_bert)
    other, _ = _tiny_classifier(tiny_bert, train_last=1)  # one block fewer frozen: other outputs
    frozen = freeze.frozen_part(model)[0]
    key = feature_cache.frozen_key(model, frozen)
    assert key == feature_cache.frozen_key(model, frozen)
    assert key != feature_cache.frozen_key(other, freeze.frozen_part(other)[0])
    with torch.no_grad():
        frozen[0].word_embeddings.weight[3, 0] += 1  # another checkpoint of the same model
    assert key != feature_cache.frozen_key(model, frozen)
    path = in_tmp / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    cache = feature_cache.FeatureCache(path=path)
    assert cache.load() == 0
    cache.rows[(1, 2, 3)] = torch.ones(3, 4)
    assert cache.save() and not cache.save()  # written once, then nothing new to write
    again = feature_cache.FeatureCache(path=path)
    assert again.load() == 1 and torch.equal(again.rows[(1, 2, 3)], torch.ones(3, 4))
