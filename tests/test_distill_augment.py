"""Distillation's augmented transfer set (objective.distill.augment): masked copies of the train examples, made
the same way for a seed, that never touch special tokens or padding; they add only the soft term to the loss,
ride in their original's batch (so the hard-label twin takes the same steps), and their teacher outputs are cached
with the originals'."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from test_distill import bert_pair  # noqa: F401 (a fixture: the same tiny teacher and student)
from tiny import make_model_dir, sentiment_texts, write_config
from tunesmith.config import load_config
from tunesmith.data.collate import collate
from tunesmith.errors import ConfigError
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.distill import AugmentConfig, Augmentation, DistillConfig, Distilled, Teacher
from tunesmith.run import train


def _kl(teacher_logits, student_logits, T):
    """KL(p_t || p_s) summed over rows, written out."""
    p_t = torch.softmax(teacher_logits / T, -1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(student_logits / T, -1))).sum()


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(make_model_dir(tmp_path_factory.mktemp("tok") / "m", "bert"))


def _examples(tokenizer, n=12):
    return [{"input_ids": tokenizer(text)["input_ids"]} for text in sentiment_texts()[:n]]


def test_copies_are_deterministic_and_keep_special_tokens(bert_tokenizer):
    tok = bert_tokenizer
    examples = _examples(tok)
    cfg = AugmentConfig(copies=3, mask_prob=0.5)
    a = Augmentation(cfg, examples, tok, seed=0)
    assert a.ids == Augmentation(cfg, examples, tok, seed=0).ids  # same seed, same copies
    assert a.ids != Augmentation(cfg, examples, tok, seed=1).ids
    assert Augmentation(cfg, examples[5:6], tok, seed=0).ids[0] != a.ids[5]  # a copy depends on its row
    special, masked = set(tok.all_special_ids), 0
    assert sum(len({tuple(c) for c in copies}) > 1 for copies in a.ids) > len(examples) // 2  # copies differ
    for ex, copies in zip(examples, a.ids):
        assert len(copies) == 3
        for ids in copies:
            assert len(ids) == len(ex["input_ids"])  # masked in place, never dropped: the tokenizer has [MASK]
            for orig, new in zip(ex["input_ids"], ids):
                assert new == orig or (new == tok.mask_token_id and orig not in special)
            assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
            masked += sum(new != orig for orig, new in zip(ex["input_ids"], ids))
    words = sum(len(ex["input_ids"]) - 2 for ex in examples) * 3
    assert 0.3 < masked / words < 0.7  # about mask_prob of the non-special tokens

    # collated, the copies are right-padded with the pad id under attention 0; padding is never masked
    batch, keys = a.batch([4, 1], "cpu")
    assert keys.tolist() == [12, 13, 14, 3, 4, 5]  # row * copies + copy
    for i, (r, c) in enumerate([(4, 0), (4, 1), (4, 2), (1, 0), (1, 1), (1, 2)]):
        n = len(a.ids[r][c])
        assert batch["input_ids"][i, :n].tolist() == a.ids[r][c]
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all() and batch["attention_mask"][i].sum() == n
    padded = {"input_ids": examples[0]["input_ids"] + [tok.pad_token_id] * 5}  # a pad inside an input stays
    assert Augmentation(AugmentConfig(copies=1, mask_prob=1.0), [padded], tok, 0).ids[0][0][-5:] == \
        [tok.pad_token_id] * 5


def test_without_a_mask_token_masked_tokens_are_dropped():
    tok = SimpleNamespace(all_special_ids=[0, 1, 2], mask_token_id=None, pad_token_id=0)
    ex = {"input_ids": [1, 7, 8, 9, 10, 11, 12, 2]}
    ids = Augmentation(AugmentConfig(copies=4, mask_prob=0.5), [ex], tok, seed=3).ids[0]
    assert any(len(copy) < len(ex["input_ids"]) for copy in ids)
    for copy in ids:
        assert copy[0] == 1 and copy[-1] == 2
        it = iter(ex["input_ids"])
        assert all(t in it for t in copy)  # an ordered subsequence: tokens dropped, none replaced
    assert Augmentation(AugmentConfig(copies=1, mask_prob=1.0), [ex], tok, seed=0).ids[0][0] == [1, 2]


@pytest.fixture(scope="module")
def pair(bert_pair):
    """test_distill's tiny teacher and student (their sharpened heads keep the KL far from 0), without its batch."""
    teacher, student, _ = bert_pair
    return teacher, student


@pytest.mark.parametrize("cached", [False, True])
def test_augmented_rows_add_only_the_soft_term(pair, bert_tokenizer, cached):
    """loss = sum over originals of alpha * CE + (1 - alpha) * T^2 * KL, plus sum over their copies of
    (1 - alpha) * T^2 * KL, over B * (1 + copies) units; with the cache the copies' teacher logits come from it."""
    teacher, student = pair
    tok = bert_tokenizer
    examples = _examples(tok, 6)
    aug = Augmentation(AugmentConfig(copies=2, mask_prob=0.4), examples, tok, seed=0)
    rows = [4, 0, 2]
    batch = collate([{**examples[r], "labels": lab, "teacher_row": r} for r, lab in zip(rows, [0, 2, 1])],
                    tok.pad_token_id)
    T, alpha = 2.0, 0.3
    wrapped_teacher = Teacher(teacher, "sequence-classification")
    aug_batch, keys = aug.batch(rows, "cpu")
    if cached:  # the cache holds the teacher's logits; rows of copies not in this batch are NaN
        with torch.no_grad():
            wrapped_teacher.cached_augmented = torch.full((len(examples) * 2, 3), float("nan"))
            wrapped_teacher.cached_augmented[keys] = teacher(**aug_batch).logits
    got = Distilled(OBJECTIVES["classify"], wrapped_teacher, DistillConfig(teacher="x", temperature=T, alpha=alpha),
                    aug).loss(student, batch, None)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s_aug, t_aug = student(**aug_batch).logits, teacher(**aug_batch).logits
    originals = alpha * F.cross_entropy(s, batch["labels"], reduction="sum") + (1 - alpha) * T ** 2 * _kl(t, s, T)
    want = originals + (1 - alpha) * T ** 2 * _kl(t_aug, s_aug, T)
    assert got.count == 3 * (1 + 2)
    assert torch.allclose(got.total, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.total, originals, rtol=1e-3)  # the copies' term is really there
    assert got.metrics["task_loss"] == pytest.approx(float(F.cross_entropy(s, batch["labels"])), rel=1e-5)

    # batches without train rows (evaluation, the hard-label twin's data) get no copies
    plain = {k: v for k, v in batch.items() if k != "teacher_row"}
    alone = Distilled(OBJECTIVES["classify"], wrapped_teacher, DistillConfig(teacher="x", temperature=T, alpha=alpha),
                      aug).loss(student, plain, None)
    assert alone.count == 3 and torch.allclose(alone.total, originals, rtol=1e-5)


def _classifier_teacher(folder, tiny_bert):
    """A tiny sequence classifier with the sentiment task's labels (sorted: neg, pos), saved as a model folder."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2,
                                                               id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def test_augment_is_refused_where_it_cannot_work(in_tmp, tmp_path, instruction_dir, sentiment_dir, tiny_bert):
    llama = make_model_dir(tmp_path / "llama", "llama", seed=1)
    cfg = write_config(in_tmp / "d.yaml", f"""\
name: d
model: {llama}
data: {{train: {instruction_dir}, max_length: 32}}
tuning: {{kind: full}}
objective: {{kind: sft, distill: {{teacher: {llama}, augment: {{copies: 1}}}}}}
train: {{max_steps: 2, batch_size: 8}}
eval: {{forgetting: {{enabled: false}}}}
""")
    with pytest.raises(ConfigError, match=r"^objective\.distill\.augment: augment makes masked copies"):
        train(load_config(cfg))
    teacher = _classifier_teacher(tmp_path / "bert-t", tiny_bert)
    cfg = write_config(in_tmp / "c.yaml", f"""\
name: c
model: {tiny_bert}
data: {{train: {sentiment_dir}, max_length: 32}}
tuning: {{kind: full}}
objective: {{kind: classify, distill: {{teacher: {teacher}, alpha: 1.0, augment: {{copies: 1}}}}}}
train: {{max_steps: 2, batch_size: 8}}
eval: {{forgetting: {{enabled: false}}}}
""")
    with pytest.raises(ConfigError, match=r"^objective\.distill\.augment: augmented rows are learned"):
        train(load_config(cfg))
    # matched hidden layers pair student blocks with the teacher blocks they replace: a named student has none
    cfg.write_text(cfg.read_text().replace("alpha: 1.0, augment: {copies: 1}",
                                           "hidden_weight: 1.0, hidden_layers: matched"))
    with pytest.raises(ConfigError, match=r"^objective\.distill\.hidden_layers: hidden_layers: matched pairs"):
        train(load_config(cfg))
    assert not (in_tmp / "runs" / "d").exists() and not (in_tmp / "runs" / "c").exists()


def test_augmented_run_with_cache_end_to_end(in_tmp, tmp_path, sentiment_dir, tiny_bert, capsys, monkeypatch):
    """One epoch of a student distilled with 2 copies per example, teacher outputs cached: both the distilled
    student and its hard-label twin take one step per batch of 16 original train rows, and the twin's run has
    no teacher and no copies. The cache holds the copies' logits, and a second run reads them back."""
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))  # a teacher-output cache of its own: the first run misses
    teacher = _classifier_teacher(tmp_path / "teacher", tiny_bert)
    cfg = write_config(in_tmp / "s.yaml", f"""\
name: student
model: {tiny_bert}
data: {{train: {sentiment_dir}, max_length: 32}}
tuning: {{kind: full}}
objective: {{kind: classify, distill: {{teacher: {teacher}, temperature: 2.0, alpha: 0.5, cache: true,
            compare_hard_labels: true, augment: {{copies: 2, mask_prob: 0.2}}}}}}
train: {{epochs: 1, batch_size: 16, lr: 3.0e-3, seed: 0}}
eval: {{forgetting: {{enabled: false}}}}
""")
    summary = train(load_config(cfg))
    out = capsys.readouterr().out
    d = summary["distill"]
    cache = d["teacher_cache"]
    rows = cache["rows"]  # the train rows left after the data checks (about 192)
    assert f"augment: 2 masked copies of each of the {rows} train examples" in out
    steps = summary["train"]["steps"]
    assert steps == d["hard_labels"]["steps"] and steps in (rows // 16, -(-rows // 16))  # one epoch of originals
    assert d["settings"]["augment"] == {"copies": 2, "mask_prob": 0.2}
    assert cache["hit"] is False and cache["augmented_rows"] == 2 * rows
    stored = load_file(cache["file"])
    assert stored["logits"].shape == (rows, 2) and stored["augmented"].shape == (2 * rows, 2)
    assert torch.isfinite(stored["augmented"]).all()
    twin = load_config(in_tmp / "runs" / "student" / "hard-labels" / "config.yaml")
    assert twin.objective.distill is None and twin.train.seed == 0 and twin.train.batch_size == 16
    again = train(load_config(cfg, ["name=again", "objective.distill.compare_hard_labels=false"]))
    assert again["distill"]["teacher_cache"]["hit"] is True and again["train"]["steps"] == steps
