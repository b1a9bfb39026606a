"""Causal language modelling (continued pretraining): predict every next token of plain text.

Data: the `text` format, one column `text`. Loss and perplexity are averaged over target tokens,
so long and short examples weigh by their length, as in pretraining.
"""

from __future__ import annotations

from typing import Literal

from ..errors import DataError
from ..evaluate.metrics import perplexity
from ..schema import Section
from .common import Loss, Prepared
from .lm import causal_lm_forward

HEAD = "causal-lm"
METRICS = ("loss", "perplexity")
MAIN_METRIC, MAIN_MODE = "loss", "min"


class Config(Section):
    kind: Literal["clm"] = "clm"
    """Next-token prediction on plain text."""


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    from ..data.tokenize import length_stats, tokenize_texts

    examples, card = {}, {}
    for name, part in splits.items():
        for i, row in enumerate(part.rows):
            if not isinstance(row.get("text"), str):
                raise DataError(f"row has no 'text' string; columns found: {', '.join(row)}", where=part.where(i),
                                hint="map your column with data.columns.text: <your column name>")
        ids, truncated = tokenize_texts(tokenizer, [r["text"] for r in part.rows], data.max_length)
        if tokenizer.eos_token_id is not None:
            # a document ends with EOS, so the model learns where text stops
            ids = [x + [tokenizer.eos_token_id] if len(x) < data.max_length else x for x in ids]
        examples[name] = [{"input_ids": x, "labels": list(x)} for x in ids if len(x) > 1]
        card[name] = {"rows": len(ids), "truncated": truncated, "tokens": length_stats([len(x) for x in ids])}
    return Prepared(examples, {}, card)


def loss(model, batch, cfg: Config) -> Loss:
    sums, counts = causal_lm_forward(model, batch)
    return Loss(sums.sum(), counts.sum())


def eval_step(model, batch, cfg: Config) -> dict[str, list]:
    sums, counts = causal_lm_forward(model, batch)
    return {"loss_sum": sums.tolist(), "tokens": counts.tolist()}


def metrics(outputs: dict[str, list], cfg: Config) -> dict[str, float]:
    mean = sum(outputs["loss_sum"]) / max(1, sum(outputs["tokens"]))
    return {"loss": mean, "perplexity": perplexity(mean)}
