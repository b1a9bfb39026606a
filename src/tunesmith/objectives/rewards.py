"""The reward a PPO run maximises: one float per (prompt, answer), from one of three sources.

  reward-model run   a finished run whose objective scores answers itself (`score(trained, prompts, answers)`,
                     the `reward` objective)
  classifier run     a finished `classify` run: the probability (or logit) of one label, e.g. `positive`
  function           `module:function`, called with (prompts, answers), two lists of strings

`load(cfg)` returns a callable (prompts, answers) -> list[float]: prompts are conversations (lists of
messages), answers the decoded answers. A reward model reads the whole conversation, rendered with its own
chat template; a classifier and a function read the text of the last prompt message (what was asked, or
the text to continue).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from ..errors import ConfigError

Scorer = Callable[[list[list[dict]], list[str]], list[float]]


def last_message(prompts: list[list[dict]]) -> list[str]:
    return [p[-1]["content"] for p in prompts]


def import_function(ref: str, where: str = "objective.reward.function") -> Scorer:
    module_name, _, name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any failure while importing the user's module is a config problem here
        raise ConfigError(f"cannot import module {module_name!r} for the reward: {type(e).__name__}: {e}",
                          where=where, hint="put the module on PYTHONPATH (or in the folder you run from)") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"module {module_name!r} has no function {name!r}", where=where)
    return fn


def check_source(cfg) -> None:
    """Before any weights are read: the function imports; a run folder exists and is finished."""
    from .. import artifacts

    if cfg.function is not None:
        import_function(cfg.function)
        return
    from pathlib import Path

    if cfg.run.startswith("stage:"):
        return  # a staged config resolves it to the earlier stage's run folder before this is called
    path = Path(cfg.run)
    if not (path / artifacts.CONFIG).exists():
        raise ConfigError(f"{path} is not a run folder (no {artifacts.CONFIG})", where="objective.reward.run",
                          hint="train the reward model or classifier first, or fix the path")
    if not artifacts.is_finished(path):
        raise ConfigError(f"{path} is not a finished run (no {artifacts.SUMMARY})", where="objective.reward.run",
                          hint="finish it with `tunesmith train CONFIG --resume`")


def load(cfg, device, trust_remote_code: bool = False) -> Scorer:
    if cfg.function is not None:
        fn = import_function(cfg.function)
        return lambda prompts, answers: [float(x) for x in fn(last_message(prompts), answers)]
    from ..trained import load_trained

    trained = load_trained(cfg.run, trust_remote_code=trust_remote_code)
    trained.model.to(device)
    if hasattr(trained.objective, "score"):  # a reward model scores (prompt, answer) pairs itself
        return lambda prompts, answers: [float(x) for x in trained.objective.score(trained, prompts, answers,
                                                                                   cfg.batch_size)]
    if trained.objective.HEAD != "sequence-classification":
        raise ConfigError(f"{cfg.run} is a {trained.objective.HEAD} run; a reward comes from a reward model or a "
                          "classifier", where="objective.reward.run")
    return classifier_scorer(trained, cfg, device)


def classifier_scorer(trained, cfg, device) -> Scorer:
    from ..data.tokenize import tokenize_texts

    labels = trained.obj_cfg.labels
    if cfg.label is None or cfg.label not in labels:
        raise ConfigError(f"the classifier's labels are {', '.join(labels)}; "
                          + ("name the one to reward" if cfg.label is None else f"{cfg.label!r} is not one of them"),
                          where="objective.reward.label")
    index, model, tokenizer = labels.index(cfg.label), trained.model, trained.tokenizer

    @torch.no_grad()
    def score(prompts: list[list[dict]], answers: list[str]) -> list[float]:
        texts = answers if cfg.text == "answer" else [f"{p} {a}".strip() for p, a in zip(last_message(prompts), answers)]
        out = []
        for s in range(0, len(texts), cfg.batch_size):
            ids, _ = tokenize_texts(tokenizer, texts[s:s + cfg.batch_size], trained.data_cfg.max_length)
            enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            logits = model(input_ids=enc["input_ids"].to(device),
                           attention_mask=enc["attention_mask"].to(device)).logits.float()
            picked = logits.softmax(-1)[:, index] if cfg.use == "probability" else logits[:, index]
            out += picked.cpu().tolist()
        return out

    return score
