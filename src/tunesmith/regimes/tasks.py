"""Tasks: the unit of the regimes that train on several datasets (multitask, continual over tasks, meta).

A task is a name, its own `data:` section and its own `objective:`, exactly as a single run has them:

    regime:
      kind: multitask
      tasks:
        - {name: sentiment, data: {train: sample:rotten-tomatoes}, objective: classify}
        - {name: topic, data: {train: sample:reuters-r8, max_rows: {train: 2000}}}

Everything here names the task it is about: a config mistake reads `regime.tasks[1].data.train: ...`,
whether pydantic finds it (the dotted location of the key) or the data loader does (`load_task_splits`).
A regime's Config holds `tasks: list[TaskConfig]` and calls `check_tasks` in its own validator.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, field_validator

from ..data.config import DataConfig
from ..data.load import load_splits
from ..errors import DataError, TunesmithError
from ..objectives import DEFAULT as DEFAULT_OBJECTIVE
from ..objectives import OBJECTIVES
from ..schema import Section

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""Task names appear in metric keys (`sentiment/accuracy`) and on the command line (`--task sentiment`)."""


def _objective_union() -> Any:
    members = tuple(m.Config for m in OBJECTIVES.values())
    return Annotated[Union[members], Field(discriminator="kind")]


class TaskConfig(Section):
    name: str
    """The task's name: metric keys (`<name>/accuracy`), `--task <name>` of predict and eval."""
    data: DataConfig
    """The task's data, as the top-level `data:` section of a single run (its own splits, columns, checks)."""
    objective: _objective_union() = Field(default_factory=lambda: OBJECTIVES[DEFAULT_OBJECTIVE].Config())
    """What is optimised on this task (`kind`: classify, ...); default classify."""

    @field_validator("objective", mode="before")
    @classmethod
    def _kind_shorthand(cls, v):
        return {"kind": v} if isinstance(v, str) else v


def check_tasks(tasks: list[TaskConfig], where: str = "regime.tasks", least: int = 1,
                heads_needed: str | None = None) -> None:
    """Names valid and distinct, and at least `least` tasks; raises ValueError naming the task (pydantic
    validators turn it into a ConfigError). `heads_needed`: the regime gives every task a classification head
    of its own, and says why; a task whose objective has none is refused."""
    if len(tasks) < least:
        raise ValueError(f"{where}: list at least {least} tasks (found {len(tasks)})")
    seen: dict[str, int] = {}
    for i, task in enumerate(tasks):
        if not NAME.match(task.name):
            raise ValueError(f"{where}[{i}].name: {task.name!r} is not a valid task name (letters, digits, "
                             "`_`, `.`, `-`; it appears in metric keys and on the command line)")
        if task.name in seen:
            raise ValueError(f"{where}[{i}].name: {task.name!r} is also the name of {where}[{seen[task.name]}]; "
                             "give each task a distinct name")
        seen[task.name] = i
    for i, task in enumerate(tasks if heads_needed else []):
        objective = OBJECTIVES[task.objective.kind]
        if objective.HEAD != "sequence-classification" or getattr(objective, "OWNS_STEP", False):
            raise ValueError(f"{where}[{i}].objective.kind: {heads_needed}; {task.objective.kind!r} has none "
                             "(use classify)")


def task_where(i: int, where: str | None, prefix: str = "regime.tasks") -> str:
    """Prefix a place inside a task's own sections (`data.train`) with the task's place in the config."""
    if not where:
        return f"{prefix}[{i}]"
    if where.startswith(("data.", "objective.")) or where in ("data", "objective"):
        return f"{prefix}[{i}].{where}"
    return f"{prefix}[{i}] ({where})"


def load_task_splits(task: TaskConfig, i: int, seed: int, prefix: str = "regime.tasks") -> dict:
    """The task's train/validation/test splits (`data.load.load_splits`), every error naming the task."""
    for key in ("train", "validation", "test"):
        ref = getattr(task.data, key)
        if ref and not ref.startswith("sample:") and not Path(ref).expanduser().exists():
            raise DataError(f"file not found: {ref}", where=f"{prefix}[{i}].data.{key}",
                            hint="give a path to a file or folder, or sample:<name>")
    try:
        return load_splits(task.data, seed)
    except TunesmithError as e:
        raise type(e)(f"task {task.name!r}: {e.message}", where=task_where(i, e.where, prefix), hint=e.hint) from None
