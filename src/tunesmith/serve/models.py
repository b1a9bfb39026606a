"""The models one `tunesmith serve` answers for, each loaded once and named by its run.

A run folder is named by its run name (`name:` in its config), a model folder by its folder name, a
sample by `sample:<name>`. A multi-task classifier serves each task as `<run>/<task>`. What a model
can do decides its endpoints: a causal LM with a chat template chats and completes text, one without
(a clm run) completes text, a classifier labels texts, an embedding model (an embed run) embeds them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunesmithError

ENDPOINTS = {
    "chat": ["/v1/chat/completions", "/v1/completions"],
    "text": ["/v1/completions"],
    "classifier": ["/v1/classifications"],
    "embedder": ["/v1/embeddings"],
}
"""What each kind of served model answers."""


@dataclass
class Served:
    name: str
    trained: object
    """trained.Trained: the model, its tokenizer, chat format and generation settings."""
    kind: str
    """chat, text, classifier or embedder (see ENDPOINTS)."""
    source: str
    """What was given on the command line."""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def context(self) -> int | None:
        """Most tokens the model attends to (prompt and answer together), if its config says."""
        return getattr(self.trained.model.config, "max_position_embeddings", None)

    @functools.cached_property
    def plain(self):
        """The model's chat format without its template: a text completion continues the prompt as it is."""
        from ..data.templates import ChatFormat

        chat = self.trained.chat
        return chat if chat.template is None else ChatFormat(chat.tokenizer, None)

    def describe(self) -> dict:
        """The model as /v1/models lists it (OpenAI's fields, then tunesmith's)."""
        cfg = self.trained.cfg
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "tunesmith",
                "kind": self.kind, "endpoints": ENDPOINTS[self.kind],
                "objective": cfg.objective.kind if cfg else None, "tuning": cfg.tuning.kind if cfg else None}


def _kind(trained, source: str) -> str:
    if trained.chat is not None and trained.objective.HEAD == "causal-lm":
        return "chat" if trained.chat.template is not None else "text"
    if hasattr(trained.objective, "predict"):
        return "classifier"
    if hasattr(trained.objective, "encode"):
        return "embedder"
    raise TunesmithError(f"{source} neither generates text nor labels texts (objective "
                         f"{trained.cfg.objective.kind if trained.cfg else trained.objective.HEAD}), so it cannot "
                         "be served", hint="serve runs of sft, clm or classify, or causal LM / classifier folders")


def _name(trained, source: str) -> str:
    if trained.cfg is not None:
        return trained.cfg.name
    return source if source.startswith("sample:") else Path(source).resolve().name


def _tasks(trained) -> list[str] | None:
    """The task names of a run that trained several heads (its regime has a `task_view`), else None."""
    from ..regimes import REGIMES

    if trained.cfg is None or not hasattr(REGIMES[trained.cfg.regime.kind], "task_view"):
        return None
    return [task.name for task in trained.cfg.regime.tasks]


def load(sources: list[str], trust_remote_code: bool = False) -> dict[str, Served]:
    """Every run or model named on the command line, by the name requests use; two of one name are refused."""
    from ..regimes import REGIMES
    from ..trained import load_trained

    served: dict[str, Served] = {}
    for source in sources:
        trained = load_trained(source, trust_remote_code=trust_remote_code)
        name = _name(trained, source)
        tasks = _tasks(trained)
        views = [(name, trained)] if tasks is None else \
            [(f"{name}/{task}", REGIMES[trained.cfg.regime.kind].task_view(trained, task)) for task in tasks]
        for view_name, view in views:
            if view_name in served:
                raise TunesmithError(f"two models are named {view_name!r} ({served[view_name].source} and {source})",
                                     hint="requests pick a model by name: serve runs of different names")
            served[view_name] = Served(view_name, view, _kind(view, source), source)
    return served
