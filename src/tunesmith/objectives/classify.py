"""Sequence classification (sentiment, spam, topic, ...): cross-entropy on a classifier head.

Data: the `label` format, columns `text` and `label` (and optionally `text_pair`). Labels may be
strings or integers; their order is `objective.labels` if given, else sorted as seen in train.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..data.tokenize import length_stats, tokenize_texts
from ..errors import DataError
from ..evaluate import baselines as trivial
from ..evaluate.metrics import accuracy, macro_f1
from ..schema import Section
from .common import Loss, Prepared
from .distill import DistillConfig

HEAD = "sequence-classification"
METRICS = {"accuracy": "max", "macro_f1": "max", "loss": "min"}
MAIN_METRIC = "accuracy"


class Config(Section):
    kind: Literal["classify"] = "classify"
    """Classify each text into one of a fixed set of labels."""
    labels: Optional[list[str]] = None
    """Label names in class-index order; default: the labels seen in train, sorted."""
    distill: Optional[DistillConfig] = None
    """Also learn from a teacher's outputs (knowledge distillation, objectives/distill.py), e.g.
    `{teacher: runs/<name>, temperature: 2.0, alpha: 0.5}`."""


def _bad_label(value) -> str | None:
    """Why a label value cannot name a class (labels are strings or whole numbers), else None."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        kind = {bool: "a boolean", float: "a decimal number", list: "a list", dict: "an object"}.get(type(value))
        return f"label {str(value)[:40]!r} is {kind or type(value).__name__}; labels are strings or whole numbers"
    if isinstance(value, int) and abs(value) >= 2**63:
        return "label is a number over 64 bits; labels are strings or whole numbers"
    if isinstance(value, str) and not value.strip():
        return "label is blank"
    return None


def _check_rows(splits) -> None:
    """Every row has a text and a label that can name a class, before any label set is built."""
    for part in splits.values():
        for i, row in enumerate(part.rows):
            for col in ("text", "label"):
                if row.get(col) is None:
                    others = [c for c in row if c not in ("text", "label", "text_pair")]
                    hint = f"map your column with data.columns.{col}: <your column name>"
                    if col == "label" and "label" not in row and len(others) == 1:
                        hint = f"if {others[0]!r} holds the labels, map it: data: {{columns: {{label: {others[0]}}}}}"
                    raise DataError(f"row has no {col!r} column; columns found: {', '.join(map(str, row))}",
                                    where=part.where(i), hint=hint)
            problem = _bad_label(row["label"])
            if problem:
                raise DataError(problem, where=part.where(i), hint="fix this row's label, or drop the row")


def _label_names(splits, cfg: Config) -> list[str]:
    _check_rows(splits)
    if cfg.labels:
        return list(cfg.labels)
    seen = {row["label"] for row in splits["train"].rows}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in seen):
        return [str(v) for v in sorted(seen)]
    return sorted(str(v) for v in seen)


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    labels = _label_names(splits, cfg)
    index = {name: i for i, name in enumerate(labels)}
    examples, card = {}, {"labels": labels}
    for name, part in splits.items():
        for i, row in enumerate(part.rows):
            for col in ("text", "label"):
                if row.get(col) is None:
                    raise DataError(
                        f"row has no {col!r} column; columns found: {', '.join(row)}",
                        where=part.where(i),
                        hint=f"map your column with data.columns.{col}: <your column name>",
                    )
            if str(row["label"]) not in index:
                source = "objective.labels" if cfg.labels else "train"
                raise DataError(
                    f"label {row['label']!r} in {name} was not seen in {source} (labels: {', '.join(labels)})",
                    where=part.where(i),
                    hint="a model cannot learn a label it never sees in training; fix the data or the split",
                )
        texts = [str(r["text"]) for r in part.rows]
        pairs = [str(r.get("text_pair", "")) for r in part.rows] if "text_pair" in part.rows[0] else None
        ids, truncated = tokenize_texts(tokenizer, texts, data.max_length, pairs)
        targets = [index[str(r["label"])] for r in part.rows]
        examples[name] = [{"input_ids": x, "labels": y} for x, y in zip(ids, targets)]
        card[name] = {
            "rows": len(ids),
            "truncated": truncated,
            "tokens": length_stats([len(x) for x in ids]),
            "label_balance": {labels[k]: v for k, v in sorted(Counter(targets).items())},
        }
    model_kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                    "label2id": dict(index)}
    return Prepared(examples, model_kwargs, card)


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def loss(model, batch, cfg: Config) -> Loss:
    logits = _logits(model, batch)
    total = F.cross_entropy(logits, batch["labels"], reduction="sum")
    return Loss(total, batch["labels"].numel())


def eval_step(model, batch, cfg: Config) -> dict[str, list]:
    logits = _logits(model, batch)
    losses = F.cross_entropy(logits, batch["labels"], reduction="none")
    return {"pred": logits.argmax(-1).tolist(), "label": batch["labels"].tolist(), "loss": losses.tolist()}


def metrics(outputs: dict[str, list], cfg: Config) -> dict[str, float]:
    return {
        "accuracy": accuracy(outputs["pred"], outputs["label"]),
        "macro_f1": macro_f1(outputs["pred"], outputs["label"]),
        "loss": sum(outputs["loss"]) / max(1, len(outputs["loss"])),
    }


def details(outputs: dict[str, list], cfg: Config) -> dict:
    """The confusion counts: row i, column j = examples of label id i predicted as j (the run's manifest names
    the ids)."""
    if not ("pred" in outputs and "label" in outputs):  # a wrapping regime's own outputs
        return {}
    n = 1 + max([*outputs["pred"], *outputs["label"]], default=-1)
    counts = [[0] * n for _ in range(n)]
    for p, y in zip(outputs["pred"], outputs["label"]):
        counts[y][p] += 1
    return {"confusion": counts}


HELD_OUT = ("validation", "test")


def baselines(prepared: Prepared, cfg: Config, seed: int) -> dict:
    """What the data gives away for free, scored on the held-out splits as the model is: always the commonest
    train label, and a bag-of-words logistic regression on the train token ids. {name: {"about": what it does,
    <split>: metrics}}; a baseline that would not be cheap has "skipped": why instead of scores."""
    train = prepared.examples["train"]
    held = {s: prepared.examples[s] for s in HELD_OUT if prepared.examples.get(s)}
    if not held:
        return {}
    names = {int(k): v for k, v in prepared.model_kwargs["id2label"].items()}
    train_labels = [e["labels"] for e in train]
    out = {}
    for split, examples in held.items():
        top, outputs = trivial.majority(train_labels, [e["labels"] for e in examples], len(names))
        out.setdefault("majority", {"about": f"always predicting {names[top]!r}"})[split] = metrics(outputs, cfg)
    bow = out["bag_of_words"] = {"about": "a logistic regression on unigram and bigram counts of the tokens, fit to "
                                          "train"}
    try:
        scored, seconds = trivial.bag_of_words([e["input_ids"] for e in train], train_labels,
                                               {s: ([e["input_ids"] for e in ex], [e["labels"] for e in ex])
                                                for s, ex in held.items()}, len(names), seed)
    except trivial.Skipped as e:
        bow["skipped"] = str(e)
        return out
    bow.update({s: metrics(o, cfg) for s, o in scored.items()})
    bow["seconds"] = round(seconds, 1)
    return out


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], data) -> list[dict]:
    """Label and class probabilities for each text."""
    ids, _ = tokenize_texts(tokenizer, texts, data.max_length)
    enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    device = next(model.parameters()).device
    logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
    probs = logits.float().softmax(-1).cpu()
    id2label = _id2label(model)
    out = []
    for row in probs:
        scores = {id2label[i]: round(float(p), 4) for i, p in enumerate(row)}
        out.append({"label": id2label[int(row.argmax())], "scores": scores})
    return out


def configure_from_model(cfg: Config, model) -> Config:
    """Fix the label order to the trained model's, so new data is scored against the same classes."""
    id2label = _id2label(model)
    return cfg.model_copy(update={"labels": [id2label[i] for i in range(len(id2label))]})


def plan_kwargs(cfg: Config) -> dict:
    """Head arguments for planning without reading data: only known if labels are listed."""
    if not cfg.labels:
        return {}
    return {"num_labels": len(cfg.labels), "id2label": dict(enumerate(cfg.labels)),
            "label2id": {k: i for i, k in enumerate(cfg.labels)}}


def _id2label(model) -> dict[int, str]:
    # JSON round trips turn the integer keys into strings
    return {int(k): v for k, v in model.config.id2label.items()}
