"""Continual learning over a task sequence (evaluate/continual.py, regimes/continual.py, flows/continual.py):
the metrics against hand-computed values, the replay buffer's rows, EWC's Fisher on the finished task's own
data, adapters that leave earlier tasks bit-identical, and SIGKILL + --resume mid-sequence."""

from __future__ import annotations

import json
import random
import signal
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tiny import cli, FILLER, NEGATIVE, POSITIVE, sentiment_rows, write_config, write_jsonl
from tunesmith.errors import ConfigError
from tunesmith.evaluate import continual as measure
from tunesmith.regimes import continual as regime

R = [[0.9, 0.1, 0.2],
     [0.6, 0.8, 0.3],
     [0.5, 0.7, 0.95]]
BASE = [0.5, 0.2, 0.1]


# --------------------------------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_values():
    assert measure.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # BWT: ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert measure.backward_transfer(R) == pytest.approx(-0.25)
    # FWT: ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.1 - 0.2) + (0.3 - 0.1)) / 2
    assert measure.forward_transfer(R, BASE) == pytest.approx(0.05)
    assert measure.forward_transfer(R, None) is None
    # forgetting: best before the last task minus final: task0 max(0.9, 0.6) - 0.5, task1 max(0.1, 0.8) - 0.7
    f = measure.forgetting(R)
    assert f[0] == pytest.approx(0.4) and f[1] == pytest.approx(0.1) and f[2] is None
    s = measure.summary(R, ["a", "b", "c"], BASE)
    assert s["mean_forgetting"] == pytest.approx(0.25) and s["forgetting"]["c"] is None
    # forgetting uses the best earlier score, not the score right after the task: a task that improved later
    up = [[0.5, 0.0], [0.8, 0.9]]
    assert measure.forgetting(up)[0] == pytest.approx(0.5 - 0.8) and measure.backward_transfer(up) == pytest.approx(0.3)
    assert measure.backward_transfer([[0.7]]) is None and measure.average_accuracy([[0.7]]) == 0.7
    with pytest.raises(ValueError, match="square"):
        measure.average_accuracy([[0.1, 0.2]])
    text = measure.table(R, ["a", "b", "c"], BASE)
    assert "BWT -0.2500" in text and "0.9500" in text


# --------------------------------------------------------------------------------------- replay buffer


def test_replay_buffer_holds_exactly_the_configured_rows_of_earlier_tasks():
    a = [{"input_ids": [i], "labels": 0, "task": 0} for i in range(50)]
    b = [{"input_ids": [100 + i], "labels": 1, "task": 1} for i in range(8)]
    buf = regime.ReplayBuffer(per_task=10, seed=3)
    buf.add("a", 0, a)
    assert len(buf.rows) == 10 and all(r in a for r in buf.rows) and len({r["input_ids"][0] for r in buf.rows}) == 10
    assert buf.rows == [a[i] for i in buf.kept["a"]]
    buf.add("b", 1, b)  # fewer rows than per_task: all of them
    assert len(buf.rows) == 18 and buf.kept["b"] == list(range(8))
    again = regime.ReplayBuffer(per_task=10, seed=3)
    again.add("a", 0, a)
    assert again.kept["a"] == buf.kept["a"]  # seeded
    other = regime.ReplayBuffer(per_task=10, seed=4)
    other.add("a", 0, a)
    assert other.kept["a"] != buf.kept["a"]
    assert buf.draw(100, 0.0, 2) == buf.rows  # fraction 0: the whole buffer
    drawn = buf.draw(40, 0.2, 2)  # round(40 * 0.2 / 0.8) = 10 rows, so they are 20% of the mix
    assert len(drawn) == 10 and all(r in buf.rows for r in drawn) and drawn == buf.draw(40, 0.2, 2)
    assert len(buf.draw(400, 0.5, 2)) == 18  # capped at what the buffer holds


# --------------------------------------------------------------------------------------- ewc


class Dot(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2]))


def test_empirical_fisher_by_hand():
    model = Dot()
    examples = [{"input_ids": [1, 2]}, {"input_ids": [3, 0]}]

    def loss(m, batch):  # loss = w . x: gradient x, squared x^2
        return (m.w * batch["input_ids"][0].float()).sum()

    f = regime.empirical_fisher(model, [("w", model.w)], examples, loss, 0, "cpu")
    # sum of squares [1 + 9, 4 + 0] = [10, 4], scaled to mean 1 (mean 7)
    assert torch.allclose(f["w"], torch.tensor([10 / 7, 4 / 7]))


def test_ewc_accumulates_one_anchor_per_task_or_folds_them_online():
    model = Dot()
    params = [("w", model.w)]
    cfg = regime.Config(tasks=None, penalty={"kind": "ewc", "weight": 2.0}, replay={"fraction": 0.1,
                                                                                      "data": ["x"]})
    f1, f2 = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([2.0, 0.0])}
    anchors = regime.after_task(cfg, [], params, f1)
    with torch.no_grad():
        model.w.copy_(torch.tensor([1.0, 1.0]))
    anchors = regime.after_task(cfg, anchors, params, f2)
    assert len(anchors) == 2
    with torch.no_grad():
        model.w.copy_(torch.tensor([2.0, 0.0]))
    # weight/2 * [F1 (w - w1)^2 + F2 (w - w2)^2], w1 = (0.3, -0.2), w2 = (1, 1)
    want = 1.0 * (1 * 1.7 ** 2 + 3 * 0.2 ** 2) + 1.0 * (2 * 1 ** 2 + 0 * 1 ** 2)
    assert regime.Penalties(anchors).value() == pytest.approx(want)
    online = cfg.model_copy(update={"penalty": cfg.penalty.model_copy(update={"online": 0.5})})
    folded = regime.after_task(online, regime.after_task(online, [], params, f1), params, f2)
    assert len(folded) == 1 and torch.allclose(folded[0].importance()["w"], torch.tensor([2.5, 1.5]))
    model.w.grad = None
    regime.Penalties(anchors).add_gradient()  # the gradient of value(): weight * sum F (w - w_k)
    assert torch.allclose(model.w.grad, torch.tensor([2 * (1 * 1.7 + 2 * 1.0), 2 * (3 * 0.2 + 0)]))


# --------------------------------------------------------------------------------------- runs on a tiny model


def topic_rows(n: int, seed: int) -> list[dict]:
    """Four topics marked by key words (a second task with another label set)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c = rng.randrange(4)
        words = rng.sample(FILLER, rng.randint(3, 7)) + [(POSITIVE + NEGATIVE)[5 * c + rng.randrange(5)]]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": f"t{c}"})
    return rows


def flipped(rows: list[dict]) -> list[dict]:
    """The sentiment task with its labels swapped: what it learns undoes the first task's body features."""
    return [{"text": r["text"], "label": {"pos": "yes", "neg": "no"}[r["label"]]} for r in rows]


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    out = {}
    for name, make in (("senti", lambda n, s: sentiment_rows(n, s)), ("topic", topic_rows),
                       ("flip", lambda n, s: flipped(sentiment_rows(n, s + 10)))):
        d = root / name
        write_jsonl(d / "train.jsonl", make(96, 1))
        write_jsonl(d / "validation.jsonl", make(24, 2))
        write_jsonl(d / "test.jsonl", make(32, 3))
        out[name] = d
    return out


def continual_config(path, model, dirs, strategy="", tuning="{kind: full}", train=""):
    tasks = ",\n         ".join(f"{{name: {n}, data: {{train: {d}, max_length: 24}}}}" for n, d in dirs.items())
    return write_config(path, f"""\
name: seq
model: {model}
tuning: {tuning}
regime: {{kind: continual, tasks: [{tasks}]{', ' + strategy if strategy else ''}}}
train: {train or '{max_steps: 8, batch_size: 16, lr: 3.0e-3, eval_every: 4, log_every: 2, seed: 0}'}
eval: {{forgetting: {{enabled: false}}}}
""")


def test_config_rules_of_a_task_sequence(in_tmp, tiny_bert, task_dirs):
    from tunesmith.config import load_config

    path = continual_config(in_tmp / "c.yaml", tiny_bert, task_dirs)
    cfg = load_config(path)
    assert cfg.regime.strategy() == "naive" and cfg.data.train == str(task_dirs["senti"])
    assert load_config(path, ["regime.replay.per_task=5", "regime.penalty.kind=ewc"]).regime.strategy() == "replay+ewc"
    assert load_config(path, ["regime.penalty.kind=ewc", "regime.penalty.online=0.9"]).regime.strategy() == "online-ewc"
    with pytest.raises(ConfigError, match="set regime.replay.per_task too"):
        load_config(path, ["regime.replay.fraction=0.2"])
    with pytest.raises(ConfigError, match="nothing is shared to protect"):
        load_config(path, ["regime.adapters=true", "regime.penalty.kind=l2sp"])
    with pytest.raises(ConfigError, match="leave the top-level objective out"):
        load_config(path, ["objective.kind=classify"])
    with pytest.raises(ValueError, match=r"tasks\[1\].objective.kind: .* 'clm' has none"):
        regime.Config(tasks=[{"name": "a", "data": {"train": "x"}}, {"name": "b", "data": {"train": "y"},
                                                                      "objective": "clm"}])
    with pytest.raises(ValueError, match="belong to a task sequence"):
        regime.Config(replay={"per_task": 4})
    task = {"name": "senti", "data": {"train": str(task_dirs["senti"])}}
    with pytest.raises(ValueError, match=r"tasks\[1\].name: 'senti' is also the name"):
        regime.Config(tasks=[task, task])
    # from a file, the error names the key under `regime:` once, at the task's own line
    path.write_text(path.read_text().replace("name: topic", "name: senti"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "(regime.tasks[1].name): 'senti' is also the name" in e.value.render()
    assert "regime.regime" not in e.value.render()
    with pytest.raises(ValueError, match="at least 2 tasks"):
        regime.Config(tasks=[task])


def test_adapters_refuse_a_tuning_that_trains_the_base(in_tmp, tiny_bert, task_dirs):
    from tunesmith.config import load_config
    from tunesmith.run import train

    path = continual_config(in_tmp / "c.yaml", tiny_bert, task_dirs, "adapters: true")
    with pytest.raises(ConfigError, match="trains base weights"):
        train(load_config(path))
    assert not (in_tmp / "runs" / "seq").exists()  # refused before the run folder exists


def test_naive_sequence_scores_every_task_after_each(in_tmp, tiny_bert, task_dirs):
    from tunesmith.config import load_config
    from tunesmith.run import train

    dirs = {k: task_dirs[k] for k in ("senti", "topic")}
    summary = train(load_config(continual_config(in_tmp / "c.yaml", tiny_bert, dirs,
                                                 train="{max_steps: 48, batch_size: 16, lr: 5.0e-3, eval_every: 16, seed: 0}")))
    c = summary["continual"]
    assert c["tasks"] == ["senti", "topic"] and len(c["R"]) == 2 and all(len(r) == 2 for r in c["R"])
    assert c["strategy"] == "naive" and c["bwt"] == pytest.approx(c["R"][1][0] - c["R"][0][0])
    assert c["fwt"] == pytest.approx(c["R"][0][1] - c["base"][1])
    assert summary["test"] == {"senti/accuracy": c["R"][1][0], "topic/accuracy": c["R"][1][1]}
    assert summary["base"]["test"]["senti/accuracy"] == c["base"][0]
    assert c["R"][0][0] > c["base"][0] + 0.2, c  # the first task did learn
    run = in_tmp / "runs" / "seq"
    for name in c["tasks"]:
        assert (run / "tasks" / name / "end.safetensors").exists()
        assert (run / "tasks" / name / "metrics.jsonl").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_replay_and_ewc_use_the_finished_tasks_own_rows(in_tmp, tiny_bert, task_dirs, monkeypatch):
    from tunesmith.config import load_config
    from tunesmith.flows import continual as flow
    from tunesmith.run import train

    seen_fit, seen_fisher = [], []
    real_fit, real_fisher = flow.fit, regime.empirical_fisher

    def spy_fit(**kw):
        seen_fit.append(list(kw["train_examples"]))
        return real_fit(**kw)

    def spy_fisher(model, params, examples, loss_fn, pad_id, device):
        seen_fisher.append((list(examples), {n: p.detach().clone() for n, p in params}))
        return real_fisher(model, params, examples, loss_fn, pad_id, device)

    monkeypatch.setattr(flow, "fit", spy_fit)
    monkeypatch.setattr(regime, "empirical_fisher", spy_fisher)
    dirs = {k: task_dirs[k] for k in ("senti", "topic")}
    path = continual_config(in_tmp / "c.yaml", tiny_bert, dirs,
                            "replay: {per_task: 12}, penalty: {kind: ewc, weight: 10.0, fisher_rows: 20}")
    summary = train(load_config(path))
    assert summary["continual"]["strategy"] == "replay+ewc" and summary["continual"]["replay_rows"] == {"senti": 12, "topic": 12}
    first, second = seen_fit
    assert all(e["task"] == 0 for e in first)
    mixed = [e for e in second if e["task"] == 0]
    assert len(mixed) == 12 and len(second) == len([e for e in second if e["task"] == 1]) + 12
    assert all(e in first for e in mixed)  # replayed rows are the first task's training rows
    # the Fisher after task 1 is estimated on task 1's own first 20 training rows, at its end weights
    (rows0, weights0), (rows1, _) = seen_fisher
    assert rows0 == first[:20] and rows1 == [e for e in second if e["task"] == 1][:20]
    end0 = load_file(in_tmp / "runs" / "seq" / "tasks" / "senti" / "end.safetensors")
    assert all(torch.equal(weights0[n], end0[n]) for n in weights0)
    anchors = load_file(in_tmp / "runs" / "seq" / "tasks" / "topic" / "penalty.safetensors")
    assert {k.split(".")[0] for k in anchors} == {"0", "1"}  # one EWC anchor per finished task


def test_adapters_leave_earlier_tasks_bit_identical(in_tmp, tiny_bert, task_dirs, monkeypatch):
    from tunesmith.config import load_config
    from tunesmith.data.collate import collate
    from tunesmith.flows import continual as flow
    from tunesmith.run import train

    outputs = []  # (task index, logits) for every scoring of every task
    real = flow.evaluate

    def spy(model, objective, obj_cfg, examples, *a, **kw):
        batch = collate(examples, 0)
        was_training = model.training
        model.eval()  # as evaluate scores: no dropout
        with torch.no_grad():
            objective._slices.current = batch["task"]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            objective._slices.current = None
        model.train(was_training)
        outputs.append((examples[0]["task"], logits.clone()))
        return real(model, objective, obj_cfg, examples, *a, **kw)

    monkeypatch.setattr(flow, "evaluate", spy)
    path = continual_config(in_tmp / "c.yaml", tiny_bert, task_dirs, "adapters: true",
                            tuning="{kind: lora, r: 4, targets: [query, value]}")
    summary = train(load_config(path))
    c = summary["continual"]
    assert c["bwt"] == 0.0 and all(v == 0.0 for v in list(c["forgetting"].values())[:2])
    rounds = [outputs[i:i + 3] for i in range(0, len(outputs), 3)]  # start, after task 0, 1, 2
    assert len(rounds) == 4
    for j in range(3):
        after_own = rounds[j + 1][j][1]
        for later in rounds[j + 2:]:
            assert torch.equal(later[j][1], after_own), f"task {j}'s outputs changed after a later task"
    assert not torch.equal(rounds[1][0][1], rounds[0][0][1])  # the adapter did train


def test_freeze_sequence_with_the_feature_cache_scores_as_without(in_tmp, tiny_bert, task_dirs, capsys):
    """A task sequence with head-only freeze tuning gets the feature cache (one frozen body for every task): the
    same scores after every task as the uncached run, and its log says so."""
    from tunesmith.config import load_config
    from tunesmith.run import train

    path = continual_config(in_tmp / "c.yaml", tiny_bert, task_dirs, tuning="{kind: freeze}",
                            train="{max_steps: 16, batch_size: 16, lr: 5.0e-2, eval_every: 8, log_every: 2, seed: 0}")
    cached = train(load_config(path))["continual"]
    assert "feature cache: the outputs of the embeddings" in capsys.readouterr().out
    plain = train(load_config(path, ["name=plain", "tuning.cache_features=false"]))["continual"]
    assert "feature cache" not in capsys.readouterr().out
    assert cached["R"] == [pytest.approx(row, abs=1e-5) for row in plain["R"]] and cached["base"] == plain["base"]
    for task in ("senti", "topic", "flip"):  # every logged step of every task: losses, gradient norms, validations
        logs = [[{k: v for k, v in json.loads(line).items() if k != "examples_per_s"}
                 for line in (in_tmp / "runs" / name / "tasks" / task / "metrics.jsonl").read_text().splitlines()]
                for name in ("seq", "plain")]
        assert len(logs[0]) == len(logs[1]) > 2
        assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(*logs))
        assert logs[0][0]["grad_norm"] > 0 and logs[0][0]["loss"] != logs[0][-2]["loss"]  # the head trained


KILLER = textwrap.dedent("""
    import os, signal, sys
    from tunesmith.train import checkpoint
    real_save, calls = checkpoint.save, [0]
    def save_then_die(folder, model, optimizer, scheduler, state):
        real_save(folder, model, optimizer, scheduler, state)
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save = save_then_die
    from tunesmith.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_mid_sequence_then_resume_matches_uninterrupted_run(in_tmp, tiny_bert, task_dirs):
    """Two checkpoints per task (every 4 of 8 steps): the kill comes after save 3, half-way through the second
    of three tasks; the resumed run restores the first task's end state, its replay rows and EWC anchor, and
    the second task's own checkpoint."""
    kill_at = 3
    path = continual_config(in_tmp / "c.yaml", tiny_bert, task_dirs, "replay: {per_task: 8}, penalty: {kind: ewc}",
                            train="{max_steps: 8, batch_size: 16, lr: 3.0e-3, eval_every: 4, log_every: 2, seed: 0}")
    whole = cli(["train", str(path), "name=whole"], in_tmp)
    assert whole.returncode == 0, whole.stderr
    killed = cli(["train", str(path), "name=killed"], in_tmp, {"KILL_AT_SAVE": str(kill_at)}, KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = in_tmp / "runs" / "killed"
    assert not (run / "summary.json").exists()
    assert json.loads((run / "progress.json").read_text())["done"] == ["senti"]
    resumed = cli(["train", str(path), "name=killed", "--resume"], in_tmp)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after task 1 of 3 (senti)" in resumed.stdout

    a, b = in_tmp / "runs" / "whole", run
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["continual"] == sb["continual"] and sa["test"] == sb["test"]
    assert {k: {x: y for x, y in v.items() if x not in ("train_seconds", "examples_per_s", "tokens_per_s")}
            for k, v in sa["train"].items()} == \
        {k: {x: y for x, y in v.items() if x not in ("train_seconds", "examples_per_s", "tokens_per_s")}
         for k, v in sb["train"].items()}
    for task in ("senti", "topic", "flip"):
        wa, wb = (load_file(r / "tasks" / task / "end.safetensors") for r in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{task}: end weights differ"
    wa, wb = (load_file(r / "model" / "model.safetensors") for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
