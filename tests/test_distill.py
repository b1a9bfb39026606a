"""Knowledge distillation: the loss is Hinton et al.'s formula, the teacher stays frozen and outside the
artifacts, a student built from the teacher copies exactly the chosen blocks, and a teacher with another
vocabulary is refused before any weights load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tiny import classify_config, instruction_rows, make_model_dir, write_config, write_jsonl
from tunesmith.config import load_config
from tunesmith.data.collate import IGNORE_INDEX, collate
from tunesmith.errors import ConfigError
from tunesmith.models.anatomy import blocks
from tunesmith.models.student import keep_blocks
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.distill import DistillConfig, Distilled, Teacher, keep_indices
from tunesmith.run import train


def _soft_ce(teacher_logits, student_logits, T):
    """KL(p_t || p_s) written out: sum p_t * (log p_t - log p_s)."""
    p_t = torch.softmax(teacher_logits / T, -1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(student_logits / T, -1))).sum()


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    t = AutoModelForSequenceClassification.from_pretrained(make_model_dir(root / "t", "bert", seed=1), num_labels=3)
    s = AutoModelForSequenceClassification.from_pretrained(make_model_dir(root / "s", "bert", seed=2), num_labels=3)
    with torch.no_grad():  # random tiny heads give near-uniform outputs; sharpen them so the KL is far from 0
        t.classifier.weight.mul_(300)
        s.classifier.weight.mul_(200)
    torch.manual_seed(0)
    ids = torch.randint(5, 40, (4, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2, 1, 2])}
    return t.eval(), s.eval(), batch


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 0.0)])
def test_classify_loss_is_the_formula(bert_pair, T, alpha):
    teacher, student, batch = bert_pair
    cfg = DistillConfig(teacher="x", temperature=T, alpha=alpha)
    got = Distilled(OBJECTIVES["classify"], Teacher(teacher, "sequence-classification"), cfg).loss(student, batch, None)
    with torch.no_grad():
        s, t = student(input_ids=batch["input_ids"]).logits, teacher(input_ids=batch["input_ids"]).logits
    want = alpha * F.cross_entropy(s, batch["labels"], reduction="sum") + (1 - alpha) * T ** 2 * _soft_ce(t, s, T)
    assert got.count == 4
    assert torch.allclose(got.total, want, rtol=1e-5, atol=1e-6)


def test_temperature_squared_scaling(bert_pair):
    """With alpha 0 the loss is T^2 * KL at temperature T: doubling T multiplies the factor by 4."""
    teacher, student, batch = bert_pair
    wrap = lambda T: Distilled(OBJECTIVES["classify"], Teacher(teacher, "sequence-classification"),  # noqa: E731
                               DistillConfig(teacher="x", temperature=T, alpha=0.0))
    with torch.no_grad():
        s, t = student(input_ids=batch["input_ids"]).logits, teacher(input_ids=batch["input_ids"]).logits
    for T in (1.0, 2.0, 5.0):
        assert torch.allclose(wrap(T).loss(student, batch, None).total, T ** 2 * _soft_ce(t, s, T), rtol=1e-5)


def test_alpha_one_is_the_plain_task_loss(bert_pair):
    teacher, student, batch = bert_pair
    wrapped = Distilled(OBJECTIVES["classify"], Teacher(teacher, "sequence-classification"),
                        DistillConfig(teacher="x", alpha=1.0))
    plain = OBJECTIVES["classify"].loss(student, batch, None)
    got = wrapped.loss(student, batch, None)
    assert torch.equal(got.total, plain.total) and got.count == plain.count


@pytest.mark.parametrize("layers", ["last", "matched"])
def test_classify_cosine_term_is_the_formula(tmp_path, layers):
    """hidden_weight adds the mean over real tokens of 1 - cos; `matched` pairs student block j with the teacher's
    output after block keep[j + 1] - 1 (keep [0, 2] of 4 blocks: student 1 <-> teacher 2, student 2 <-> teacher 4)."""
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(
        make_model_dir(tmp_path / "t", "bert", seed=1, num_hidden_layers=4), num_labels=2).eval()
    student = keep_blocks(teacher, [0, 2])
    with torch.no_grad():  # a student that no longer equals the teacher's blocks
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(5, 40, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}
    cfg = DistillConfig(teacher="x", alpha=1.0, hidden_weight=0.7, hidden_layers=layers, keep_layers=[0, 2])
    got = Distilled(OBJECTIVES["classify"], Teacher(teacher, "sequence-classification"), cfg).loss(student, batch, None)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True)
    pairs = [(-1, -1)] if layers == "last" else [(1, 2), (2, 4)]

    def cos_term(a, b):
        per = 1 - F.cosine_similarity(a, b, dim=-1)
        return sum(per[i, :int(mask[i].sum())].mean() for i in range(3))

    want_cos = sum(cos_term(s.hidden_states[i], t.hidden_states[j]) for i, j in pairs) / len(pairs)
    task = F.cross_entropy(s.logits, batch["labels"], reduction="sum")
    assert got.metrics["cosine_loss"] == pytest.approx(float(want_cos) / 3, rel=1e-5)
    assert torch.allclose(got.total, task + 0.7 * want_cos, rtol=1e-5)


def test_causal_loss_is_token_level_over_answer_tokens_only(tmp_path):
    """sft: the KL runs over the answer tokens (labels not IGNORE_INDEX), per target token, in chunks; the result
    equals the formula computed from both models' full logits, and so does its gradient."""
    teacher = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "t", "llama", seed=1)).eval()
    student = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "s", "llama", seed=2))
    torch.manual_seed(0)
    ids = torch.randint(6, 40, (3, 9))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    T, alpha = 2.0, 0.25
    wrapped = Distilled(OBJECTIVES["sft"], Teacher(teacher, "causal-lm"),
                        DistillConfig(teacher="x", temperature=T, alpha=alpha, chunk_tokens=3))
    got = wrapped.loss(student, batch, None)
    got.total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    s = student(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits
    target = labels[:, 1:] != IGNORE_INDEX
    s_at, t_at = s[:, :-1][target], t[:, :-1][target]
    task = F.cross_entropy(s_at, labels[:, 1:][target], reduction="sum")
    want = alpha * task + (1 - alpha) * T ** 2 * _soft_ce(t_at, s_at, T)
    assert int(got.count) == int(target.sum()) == 3 * 4 - 2
    assert torch.allclose(got.total, want, rtol=1e-5)
    want.backward()
    for n, p in student.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_keep_layers_copies_exactly_the_chosen_blocks(tmp_path):
    folder = make_model_dir(tmp_path / "t", "llama", seed=1)
    teacher = AutoModelForCausalLM.from_pretrained(folder, num_hidden_layers=2)
    config = teacher.config
    config.num_hidden_layers = 5
    big = AutoModelForCausalLM.from_config(config)  # 5 random blocks, each different
    before = {k: v.clone() for k, v in big.state_dict().items()}
    keep = keep_indices([4, 1, -2], 5)  # negatives count from the end: -2 is block 3
    assert keep == [4, 1, 3]
    student = keep_blocks(big, keep)
    _, t_blocks = blocks(big)
    prefix, s_blocks = blocks(student)
    assert len(s_blocks) == 3 and student.config.num_hidden_layers == 3
    for j, i in enumerate(keep):
        ts, ss = t_blocks[i].state_dict(), s_blocks[j].state_dict()
        assert ts.keys() == ss.keys() and all(torch.equal(ts[k], ss[k]) for k in ts)
        assert s_blocks[j].self_attn.layer_idx == j  # its KV-cache slot follows its new place
    s_state = student.state_dict()
    outside = [k for k in before if not k.startswith(prefix + ".")]
    assert outside and all(torch.equal(s_state[k], before[k]) for k in outside)  # embeddings, norm, head
    assert not any(k.startswith(prefix + ".3.") for k in s_state)
    assert all(torch.equal(big.state_dict()[k], before[k]) for k in before)  # the teacher is left as it was
    assert keep_indices("every_other", 5) == [0, 2, 4]
    with pytest.raises(ConfigError, match="block 5 does not exist"):
        keep_indices([5], 5)
    ids = torch.tensor([[3, 8, 9, 10]])
    assert student(input_ids=ids).logits.shape == (1, 4, config.vocab_size)


def test_vocabulary_mismatch_is_refused_before_any_weights_load(in_tmp, tmp_path, instruction_dir, monkeypatch):
    import transformers

    word = make_model_dir(tmp_path / "word", "llama", seed=1)
    bpe = make_model_dir(tmp_path / "bpe", "llama-bpe", seed=1)
    cfg = write_config(in_tmp / "d.yaml", f"""\
name: d
model: {bpe}
data: {{train: {instruction_dir}, max_length: 32}}
tuning: {{kind: full}}
objective: {{kind: sft, distill: {{teacher: {word}}}}}
train: {{max_steps: 2, batch_size: 8}}
eval: {{forgetting: {{enabled: false}}}}
""")

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the check")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_weights))
    with pytest.raises(ConfigError) as e:
        train(load_config(cfg))
    msg = str(e.value)
    assert msg.startswith("objective.distill.teacher: the teacher and the student do not share a tokenizer")
    assert f"teacher {word} has a vocabulary of 77 tokens" in msg and f"student {bpe} has 400 tokens" in msg
    assert not (in_tmp / "runs" / "d").exists()


def _digest(folder: Path) -> dict:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_distilled_run_end_to_end(in_tmp, tiny_bert, sentiment_dir, capsys):
    """A 4-block teacher run; a 2-block student from every other block, distilled with the teacher's outputs
    cached, next to the same student on hard labels. The teacher is unchanged and absent from the student's
    artifacts; summary.json and the table put both side by side; plan shows both parameter counts."""
    teacher_cfg = classify_config(in_tmp / "t.yaml", tiny_bert, sentiment_dir, "{kind: full}")
    text = teacher_cfg.read_text().replace(f"model: {tiny_bert}", f"model: {{name: {tiny_bert}, config: {{num_hidden_layers: 4}}}}")
    teacher_cfg.write_text(text.replace("name: tiny", "name: teacher").replace("epochs: 5,", "max_steps: 24,"))
    train(load_config(teacher_cfg))
    teacher_run = in_tmp / "runs" / "teacher"
    before = _digest(teacher_run / "model")

    cfg = write_config(in_tmp / "s.yaml", f"""\
name: student
data: {{train: {sentiment_dir}, max_length: 32}}
tuning: {{kind: full}}
objective: {{kind: classify, distill: {{teacher: {teacher_run}, temperature: 2.0, alpha: 0.5, keep_layers: every_other,
            cache: true, compare_hard_labels: true}}}}
train: {{max_steps: 12, batch_size: 16, lr: 3.0e-3, eval_every: 6, seed: 0}}
eval: {{forgetting: {{enabled: false}}}}
""")
    from tunesmith.plan import plan, render
    from tunesmith.run import check_data

    check_data(load_config(cfg))  # `tunesmith check` reads the teacher's tokenizer, the student not built yet
    shown = render(plan(load_config(cfg)), load_config(cfg))
    assert "distillation: teacher" in shown and "student (keep_layers every_other: 2 blocks)" in shown
    capsys.readouterr()
    summary = train(load_config(cfg))
    out = capsys.readouterr().out
    run = in_tmp / "runs" / "student"

    assert _digest(teacher_run / "model") == before  # never trained, never rewritten
    d = summary["distill"]
    assert d["teacher"]["params"] > d["student"]["params"] > 0
    assert d["student"]["size_mb"] < d["teacher"]["size_mb"]
    for who in ("teacher", "student"):
        assert set(d[who]["test"]) >= {"accuracy", "loss"} and d[who]["examples_per_s"] > 0
    assert d["hard_labels"]["params"] == d["student"]["params"] and "accuracy" in d["hard_labels"]["test"]
    assert d["teacher_cache"]["hit"] is False
    assert "teacher_agreement" in summary["test"] and "teacher_agreement" in summary["base"]["test"]
    assert d["student"]["test"]["teacher_agreement"] == pytest.approx(summary["test"]["teacher_agreement"])
    assert 0 <= d["hard_labels"]["test"]["teacher_agreement"] <= 1 and d["hard_labels"]["examples_per_s"] > 0
    assert "student (hard labels)" in out and "speed-up over the teacher" in out

    # only the student's weights are in the run: 2 blocks, none of the teacher's other blocks
    saved = load_file(run / "model" / "model.safetensors")
    layers = {k.split(".")[3] for k in saved if ".layer." in k}
    assert layers == {"0", "1"}
    weight_files = [f for f in run.rglob("*.safetensors") if "checkpoints" not in f.parts]
    teacher_bytes = (teacher_run / "model" / "model.safetensors").stat().st_size
    assert all(f.stat().st_size < teacher_bytes for f in weight_files)
    assert json.loads((run / "hard-labels" / "summary.json").read_text())["train"]["steps"] == summary["train"]["steps"]

    # a second run with the same data and teacher reads the teacher's outputs from the cache
    again = train(load_config(cfg, ["name=again", "objective.distill.compare_hard_labels=false"]))
    assert again["distill"]["teacher_cache"]["hit"] is True


def test_causal_student_from_teacher_layers_end_to_end(in_tmp, tmp_path, instruction_dir):
    """sft: a 1-block student from a 2-block teacher folder; the run reports both side by side, with the
    students' top-1 agreement with the teacher over the answer tokens."""
    teacher = make_model_dir(tmp_path / "teacher", "llama", seed=3)
    cfg = write_config(in_tmp / "d.yaml", f"""\
name: d
data: {{train: {instruction_dir}, max_length: 32}}
tuning: {{kind: full}}
objective: {{kind: sft, distill: {{teacher: {teacher}, temperature: 1.0, alpha: 0.5, keep_layers: [1],
            compare_hard_labels: true, chunk_tokens: 16}}}}
train: {{max_steps: 3, batch_size: 8, lr: 3.0e-3, seed: 0}}
eval: {{forgetting: {{enabled: false}}, generate: {{prompts: 0}}}}
""")
    summary = train(load_config(cfg))
    d = summary["distill"]
    assert d["teacher"]["params"] > d["student"]["params"]
    for who in (d["teacher"], d["student"], d["hard_labels"]):
        assert set(who["test"]) >= {"loss", "perplexity"}
    assert 0 <= d["student"]["test"]["teacher_agreement"] <= 1
    assert 0 <= d["hard_labels"]["test"]["teacher_agreement"] <= 1
    student = json.loads((Path(summary["distill"]["student"]["source"]) / "student.json").read_text())
    assert student["keep_layers"] == [1]


def test_staged_teacher_then_student(in_tmp, tiny_bert, sentiment_dir, capsys):
    """The examples' shape: stage 1 trains the teacher, stage 2 builds the student from `stage:teacher`'s layers
    (no model of its own) and distils; plan counts the staged teacher from its base."""
    from tunesmith import stages
    from tunesmith.cli import main

    cfg = write_config(in_tmp / "st.yaml", f"""\
name: st
model: {tiny_bert}
data: {{train: {sentiment_dir}, max_length: 32}}
tuning: {{kind: full}}
objective: {{kind: classify}}
train: {{max_steps: 6, batch_size: 16, lr: 3.0e-3, seed: 0}}
eval: {{forgetting: {{enabled: false}}}}
stages:
  - name: teacher
  - name: student
    objective: {{kind: classify, distill: {{teacher: "stage:teacher", keep_layers: [1]}}}}
    train: {{max_steps: 4}}
""")
    assert main(["plan", str(cfg)]) == 0
    assert "student (keep_layers [1]: 1 blocks)" in capsys.readouterr().out
    summary = stages.run(stages.load(cfg))
    assert [s["stage"] for s in summary["stages"]] == ["teacher", "student"]
    student = json.loads((in_tmp / "runs" / "st" / "stages" / "2-student" / "summary.json").read_text())
    assert student["distill"]["teacher"]["source"] == str(Path("runs") / "st" / "stages" / "1-teacher")
    assert student["params"]["total"] == student["distill"]["student"]["params"] < student["distill"]["teacher"]["params"]

    bad = write_config(in_tmp / "bad.yaml", cfg.read_text().replace('"stage:teacher"', '"stage:nope"'))
    with pytest.raises(ConfigError, match="'stage:nope' names no earlier stage"):
        stages.load(bad)
