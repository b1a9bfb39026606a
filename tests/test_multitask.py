"""Multi-task learning: tasks drawn in their configured shares (exact counts for a seed), a head per task over one
body saved in one artifact and reloaded to the outputs the run measured, every mistake and finding naming its
task, and a SIGKILLed run resumed to the same end as an uninterrupted one."""

from __future__ import annotations

import json
import random
import signal
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from test_resume import KILLER, cli
from tiny import FILLER, sentiment_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.checks import DataCheckError
from tunesmith.errors import ConfigError, DataError
from tunesmith.regimes import multitask
from tunesmith.run import train
from tunesmith.data.batches import train_batches

TOPICS = ["movie", "plot", "actor"]


def topic_rows(n: int, seed: int) -> list[dict]:
    """A three-label task: the label is the one topic word in the text."""
    rng, words = random.Random(seed), [w for w in FILLER if w not in TOPICS]
    rows = []
    for _ in range(n):
        label = rng.choice(TOPICS)
        text = rng.sample(words, rng.randint(3, 8))
        text.insert(rng.randrange(len(text) + 1), label)
        rows.append({"text": " ".join(text), "label": label})
    return rows


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for name, make, sizes in (("sent", sentiment_rows, (160, 32, 32)), ("topic", topic_rows, (64, 24, 24))):
        for split, n, seed in zip(("train", "validation", "test"), sizes, (11, 12, 13)):
            write_jsonl(root / name / f"{split}.jsonl", make(n, seed=seed))
    return root


def mt_config(path, model, dirs, tuning="{kind: full}", regime_extra="", train_cfg=None, name="mt"):
    train_cfg = train_cfg or "{epochs: 4, batch_size: 16, lr: 3.0e-3, eval_every: 6, log_every: 2, seed: 0}"
    return write_config(path, f"""\
name: {name}
model: {model}
tuning: {tuning}
regime:
  kind: multitask
  tasks:
    - {{name: sent, data: {{train: {dirs / 'sent'}, max_length: 32}}}}
    - {{name: topic, data: {{train: {dirs / 'topic'}, max_length: 32}}, objective: classify}}
  {regime_extra}
train: {train_cfg}
eval: {{forgetting: {{enabled: false}}}}
""")


# ---------------------------------------------------------------------------------------------- sampling


def _schedule(sampling: str, epoch: int = 0, seed: int = 0, temperature: float = 2.0):
    cfg = multitask.Config.model_construct(sampling=sampling, temperature=temperature)
    task_ids = [0] * 100 + [1] * 30 + [2] * 10
    batches = multitask.schedule(task_ids, [5] * len(task_ids), cfg, 10, seed, epoch, within=train_batches)
    tasks = []
    for b in batches:
        assert len({task_ids[i] for i in b}) == 1, "a batch mixes tasks"
        tasks.append(task_ids[b[0]])
    return batches, tasks


@pytest.mark.parametrize("sampling,want", [
    ("proportional", [10, 3, 1]),   # 14 batches in shares 100:30:10
    ("temperature", [8, 4, 2]),     # shares sqrt(100):sqrt(30):sqrt(10) of 14 = 7.51, 4.11, 2.37, largest remainders
    ("equal", [5, 5, 4]),           # 14 / 3 each, the spare batches to the earlier tasks
])
def test_sampler_draws_tasks_in_the_configured_shares(sampling, want):
    for epoch in (0, 1, 5):
        batches, tasks = _schedule(sampling, epoch)
        assert [Counter(tasks)[k] for k in range(3)] == want
    again, _ = _schedule(sampling, 1)
    assert again == _schedule(sampling, 1)[0]  # a pure function of (seed, epoch): --resume redraws the same
    assert again != _schedule(sampling, 2)[0] and again != _schedule(sampling, 1, seed=1)[0]


def test_proportional_sampling_sees_every_row_once_per_epoch():
    batches, _ = _schedule("proportional", 3)
    seen = sorted(i for b in batches for i in b)
    assert seen == list(range(140))


def test_temperature_one_is_proportional_and_shares_are_exact():
    assert multitask.shares([100, 30, 10], "temperature", 1.0) == pytest.approx(multitask.shares([100, 30, 10],
                                                                                                "proportional", 2.0))
    assert multitask.counts(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5, 1.75, 1.75: the two largest remainders
    assert sum(multitask.counts(1001, multitask.shares([3, 5, 7], "temperature", 3.0))) == 1001


def test_each_task_loss_runs_over_its_own_head_only():
    """A batch mixing tasks: the loss is each row's cross-entropy over its task's rows of the classifier, and a
    task's head rows get no gradient from another task's examples (as separate heads would)."""
    heads = [multitask.TaskHead("a", ["x", "y"], 0), multitask.TaskHead("b", ["p", "q", "r"], 2)]
    from tunesmith.objectives import OBJECTIVES

    objective = multitask.MultiTask(OBJECTIVES["classify"], heads, "mean")
    layer = torch.nn.Linear(4, 5)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, input_ids, attention_mask):
            return multitask._Output(self.layer(input_ids.float()))

    torch.manual_seed(0)
    x = torch.randn(4, 4)
    batch = {"input_ids": x, "attention_mask": torch.ones(4, 4), "task": torch.tensor([0, 1, 1, 0]),
             "labels": torch.tensor([1, 4, 2, 0])}  # global rows: a:y, b:r, b:p, a:x
    got = objective.loss(Model(), batch, None)
    logits = layer(x)
    want = (torch.nn.functional.cross_entropy(logits[[0, 3], 0:2], torch.tensor([1, 0]), reduction="sum")
            + torch.nn.functional.cross_entropy(logits[[1, 2], 2:5], torch.tensor([2, 0]), reduction="sum"))
    assert got.count == 4 and torch.allclose(got.total, want)
    only_a = {k: v[[0, 3]] for k, v in batch.items()}
    layer.zero_grad()
    objective.loss(Model(), only_a, None).total.backward()
    assert layer.weight.grad[2:].abs().sum() == 0 and layer.weight.grad[:2].abs().sum() > 0
    assert objective.METRICS == {"a/accuracy": "max", "a/macro_f1": "max", "a/loss": "min", "b/accuracy": "max",
                                 "b/macro_f1": "max", "b/loss": "min", "main_mean": "max"}


# ---------------------------------------------------------------------------------------------- config


def test_config_mistakes_name_the_task(in_tmp, tiny_bert, task_dirs):
    cfg = mt_config(in_tmp / "c.yaml", tiny_bert, task_dirs)
    text = cfg.read_text()

    bad = write_config(in_tmp / "b.yaml", text.replace(f"train: {task_dirs / 'topic'}", "train: nope/topic.jsonl"))
    with pytest.raises(DataError, match=r"^regime.tasks\[1\].data.train: file not found: \S*nope/topic.jsonl"):
        train(load_config(bad))
    assert not (in_tmp / "runs").exists()

    bad = write_config(in_tmp / "b.yaml", text.replace("max_length: 32}, objective", "max_lenght: 32}, objective"))
    with pytest.raises(ConfigError, match=r"b.yaml:8 \(regime.tasks\[1\].data.max_lenght\)") as e:
        load_config(bad)
    assert "did you mean 'regime.tasks[1].data.max_length'" in str(e.value)

    with pytest.raises(ConfigError, match=r"b.yaml:8 \(regime.tasks\[1\].objective.kind\): multitask trains a classification head"):
        load_config(write_config(in_tmp / "b.yaml", text.replace("objective: classify", "objective: clm")))
    with pytest.raises(ConfigError, match=r"b.yaml:8 \(regime.tasks\[1\].name\): 'sent' is also the name of tasks\[0\]"):
        load_config(write_config(in_tmp / "b.yaml", text.replace("name: topic", "name: sent")))
    with pytest.raises(ConfigError, match=r"\(regime.early_stopping\): 'nope' is neither"):
        load_config(cfg, ["regime.early_stopping=nope"])


def test_leakage_across_tasks_is_found(in_tmp, tiny_bert, task_dirs, tmp_path):
    """Task sent's test rows copied into task topic's train: the check names both tasks and refuses."""
    leaky = tmp_path / "leaky"
    for split in ("validation", "test"):
        (leaky / f"{split}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (leaky / f"{split}.jsonl").write_text((task_dirs / "topic" / f"{split}.jsonl").read_text())
    stolen = [dict(r, label="movie") for r in sentiment_rows(32, seed=13)[:5]]
    write_jsonl(leaky / "train.jsonl", topic_rows(64, seed=11) + stolen)
    cfg = mt_config(in_tmp / "c.yaml", tiny_bert, task_dirs)
    cfg.write_text(cfg.read_text().replace(str(task_dirs / "topic"), str(leaky)))
    with pytest.raises(DataCheckError) as e:
        train(load_config(cfg))
    assert "sent test ~ topic train: 5 test rows have their text in train" in str(e.value)


# ---------------------------------------------------------------------------------------------- a run


def test_lora_run_one_artifact_per_task_metrics_and_reload(in_tmp, tiny_bert, task_dirs, capsys):
    cfg = mt_config(in_tmp / "c.yaml", tiny_bert, task_dirs, "{kind: lora, r: 4}", "sampling: temperature",
                    "{epochs: 3, batch_size: 16, lr: 1.0e-2, eval_every: 6, log_every: 2, seed: 0}")
    summary = train(load_config(cfg))
    out = capsys.readouterr().out
    run = in_tmp / "runs" / "mt"
    assert "data card: task sent" in out and "data card: task topic" in out
    tasks = summary["tasks"]
    assert tasks["topic"]["labels"] == ["actor", "movie", "plot"] and tasks["sent"]["labels"] == ["neg", "pos"]
    for name in ("sent", "topic"):
        assert set(tasks[name]["test"]) == {"accuracy", "macro_f1", "loss"}
        assert set(tasks[name]["base"]["test"]) == {"accuracy", "macro_f1", "loss"}
    assert summary["test"]["main_mean"] == pytest.approx((tasks["sent"]["test"]["accuracy"]
                                                          + tasks["topic"]["test"]["accuracy"]) / 2)
    assert summary["diagnosis"]["early_stopping"]["metric"] == "main_mean"

    # one artifact: the adapter with the shared classifier holding both heads (2 + 3 rows)
    assert summary["weights"] == "adapter"
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    heads = [v for k, v in weights.items() if "classifier" in k and k.endswith("weight")]
    assert heads and all(v.shape[0] == 5 for v in heads)

    # reloaded, each task's head scores its test split exactly as the run measured it
    for name in ("sent", "topic"):
        assert main(["eval", str(run), "--task", name, "--data", str(task_dirs / name)]) == 0
        scores = json.loads(capsys.readouterr().out)
        assert scores["accuracy"] == tasks[name]["test"]["accuracy"]
        assert scores["macro_f1"] == tasks[name]["test"]["macro_f1"]
        assert scores["loss"] == pytest.approx(tasks[name]["test"]["loss"], abs=1e-5)
    assert main(["predict", str(run), "--task", "topic", "the plot was long", "an actor of note"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(r["scores"]) for r in lines] == [{"actor", "movie", "plot"}] * 2
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-3 for r in lines)
    assert main(["predict", str(run), "a text"]) == 2
    assert "--task: this run trained 2 tasks (sent, topic); name one" in capsys.readouterr().err


def test_sigkill_then_resume_matches_uninterrupted_run(in_tmp, tiny_bert, task_dirs):
    cfg = mt_config(in_tmp / "c.yaml", tiny_bert, task_dirs, regime_extra="sampling: equal",
                    train_cfg="{epochs: 3, batch_size: 8, grad_accum: 2, lr: 3.0e-3, eval_every: 5, log_every: 2}")
    whole = cli(["train", str(cfg), "name=whole"], in_tmp)
    assert whole.returncode == 0, whole.stderr

    killed = cli(["train", str(cfg), "name=killed"], in_tmp, {"KILL_AT_STEP": "10"}, KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = in_tmp / "runs" / "killed"
    assert not (run / "summary.json").exists()
    resumed = cli(["train", str(cfg), "name=killed", "--resume"], in_tmp)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 10" in resumed.stdout

    a, b = in_tmp / "runs" / "whole", in_tmp / "runs" / "killed"
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["tasks"] == sb["tasks"] and sa["test"] == sb["test"] and sa["train"]["steps"] == sb["train"]["steps"]

    def log(run):
        return [{k: v for k, v in json.loads(line).items() if k != "examples_per_s"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert log(a) == log(b)
