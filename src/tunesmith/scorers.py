"""The reward scorer of an RL run, built here in the run layer (it loads finished runs) and passed to the loop.

`load(cfg, device)` returns a callable (prompts, answers) -> list[float]: prompts are conversations (lists of
messages), answers the decoded answers. A reward model reads the whole conversation, rendered with its own
chat template; a classifier and a function read the text of the last prompt message (what was asked, or
the text to continue). (`build.check_source` checks the source before any weights are read.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data.tokenize import tokenize_texts
from .errors import ConfigError
from .objectives.rewards import Scorer, import_function, last_message
from .trained import load_trained


def load(cfg, device, trust_remote_code: bool = False) -> Scorer:
    if cfg.function is not None:
        fn = import_function(cfg.function)
        return lambda prompts, answers: [float(x) for x in fn(last_message(prompts), answers)]
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
