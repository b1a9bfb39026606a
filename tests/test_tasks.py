"""Tasks (regimes/tasks.py): a name, a data section and an objective; every mistake names the task."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tunesmith.errors import DataError
from tunesmith.regimes.tasks import TaskConfig, check_tasks, load_task_splits


def test_task_defaults_to_classify_and_takes_a_shorthand(sentiment_dir):
    task = TaskConfig.model_validate({"name": "a", "data": {"train": str(sentiment_dir)}})
    assert task.objective.kind == "classify"
    task = TaskConfig.model_validate({"name": "b", "data": {"train": str(sentiment_dir)}, "objective": "clm"})
    assert task.objective.kind == "clm"


def test_duplicate_and_bad_names_name_the_task(sentiment_dir):
    tasks = [TaskConfig(name=n, data={"train": str(sentiment_dir)}) for n in ("a", "b", "a")]
    with pytest.raises(ValueError, match=r"regime.tasks\[2\].name: 'a' is also the name of regime.tasks\[0\]"):
        check_tasks(tasks)
    with pytest.raises(ValueError, match=r"regime.tasks\[0\].name: 'a b' is not a valid task name"):
        check_tasks([TaskConfig(name="a b", data={"train": str(sentiment_dir)})])
    with pytest.raises(ValidationError):
        TaskConfig.model_validate({"name": "a", "data": {"train": "x"}, "bogus": 1})


def test_missing_file_names_the_task_and_key(sentiment_dir, tmp_path):
    task = TaskConfig(name="topic", data={"train": str(sentiment_dir), "test": str(tmp_path / "nope.jsonl")})
    with pytest.raises(DataError) as e:
        load_task_splits(task, 1, seed=0)
    assert str(e.value).startswith(f"regime.tasks[1].data.test: file not found: {tmp_path / 'nope.jsonl'}")
    splits = load_task_splits(TaskConfig(name="ok", data={"train": str(sentiment_dir)}), 0, seed=0)
    assert set(splits) == {"train", "validation", "test"}


def test_loader_errors_are_prefixed_with_the_task(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    task = TaskConfig(name="tiny", data={"train": str(tmp_path / "train.jsonl"), "columns": {"text": "review"}})
    with pytest.raises(DataError) as e:
        load_task_splits(task, 0, seed=0)
    assert "task 'tiny': column 'review' (data.columns.text) not found" in str(e.value)


def test_overrides_reach_into_a_task(tmp_path, sentiment_dir):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""\
model: m
regime:
  kind: multitask
  tasks:
    - {{name: a, data: {{train: {sentiment_dir}}}}}
    - {{name: b, data: {{train: {sentiment_dir}}}}}
""")
    got = load_config(cfg, ["regime.tasks.1.data.max_rows.train=64", "regime.tasks.0.objective={kind: classify, labels: [neg, pos]}"])
    assert got.regime.tasks[1].data.max_rows == {"train": 64} and got.regime.tasks[0].data.max_rows == {}
    assert got.regime.tasks[0].objective.labels == ["neg", "pos"]
    assert got.data.train == str(sentiment_dir)  # a multitask run's data defaults to its first task's
    with pytest.raises(ConfigError, match="regime.tasks is a list of 2 items"):
        load_config(cfg, ["regime.tasks.2.data.max_length=8"])
    with pytest.raises(ConfigError, match=r"override 'regime.tasks.1.data.max_length=x' \(regime.tasks\[1\].data.max_length\)"):
        load_config(cfg, ["regime.tasks.1.data.max_length=x"])
