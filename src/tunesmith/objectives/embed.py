"""Embedding fine-tuning: train an encoder's pooled sentence embedding so an anchor lies nearest its positive.

Data: rows `{"anchor", "positive"}` or `{"anchor", "positive", "negative"}` (a query and its passage, a
question and its answer, two paraphrases; rename other columns with `data.columns`, e.g.
`{anchor: instruction, positive: output}`). Each text is tokenized alone, cut at data.max_length.

The model is the bare encoder (head `encoder`: `AutoModel`, no head, no pooler); an embedding is its last
hidden states pooled, by the mean over real tokens (`pooling: mean`, the default, as sentence-transformers'
MiniLM models) or the first token (`cls`).

Loss: multiple-negatives ranking (Henderson et al. 2017; sentence-transformers' MultipleNegativesRankingLoss,
InfoNCE with in-batch negatives). For a batch of B anchors a_i with positives p_i (and negatives n_i, if the
rows have them), with s = scale x cosine similarity:
    loss_i = -log( exp s(a_i, p_i) / (sum_j exp s(a_i, p_j) + sum_j exp s(a_i, n_j)) )
every other row's positive (and every negative) is a negative for a_i. `scale` is 1 / temperature. The loss
unit is an anchor; note that it depends on which rows share a batch (larger batches, harder negatives).
Anchors and candidates go through the model in one forward.

Metrics on held-out pairs (retrieval): every anchor of the split ranks all of the split's positives (and
negatives) by cosine similarity; with `rank` the place of its own positive (ties broken by row order):
`recall@1`, `recall@10` (share of anchors whose positive ranks within the first 1 or 10), `mrr` (mean of
1 / rank over every anchor) and `ndcg@10` (one relevant text: 1 / log2(rank + 1) within the first 10, else 0),
and `loss` (the in-batch loss on evaluation batches).

The trained model is a plain transformers encoder: `AutoModel.from_pretrained(run/model)` (merged) or the base
with the adapter, pooled as above, gives the embeddings training produced.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.tokenize import length_stats
from ..errors import DataError
from ..schema import Section
from .common import Loss, Prepared

HEAD = "encoder"
METRICS = {"recall@1": "max", "recall@10": "max", "mrr": "max", "ndcg@10": "max", "loss": "min"}
MAIN_METRIC = "mrr"
SEQUENCES_PER_EXAMPLE = 2  # an anchor and its positive run in one forward (for `tunesmith plan`)
SIDES = ("anchor", "positive", "negative")


class Config(Section):
    kind: Literal["embed"] = "embed"
    """Contrastive training of a pooled sentence embedding on (anchor, positive[, negative]) rows."""
    pooling: Literal["mean", "cls"] = "mean"
    """How token states become one embedding: the mean over real tokens, or the first token's state."""
    scale: float = Field(20.0, gt=0)
    """Multiplies the cosine similarities before the softmax (1 / temperature); 20 is sentence-transformers'
    default (temperature 0.05). Higher sharpens the contrast between the positive and the negatives."""


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    examples, card = {}, {}
    for name, part in splits.items():
        has_negative = "negative" in part.rows[0]
        texts = {side: [] for side in SIDES[:3 if has_negative else 2]}
        for i, row in enumerate(part.rows):
            for side in texts:
                value = row.get(side)
                if not isinstance(value, str) or not value.strip():
                    found = ", ".join(map(str, row)) or "none"
                    why = "missing" if side not in row else f"not a non-empty string ({type(value).__name__})"
                    raise DataError(f"row {i}: {side} is {why}; its keys: {found}", where=part.where(i),
                                    hint="embed rows are {anchor, positive} or {anchor, positive, negative} (every row "
                                         "alike); rename columns with data.columns, e.g. {anchor: question, "
                                         "positive: answer}")
                texts[side].append(value)
        ids = {side: tokenizer(t, truncation=True, max_length=data.max_length)["input_ids"] for side, t in texts.items()}
        examples[name] = [{"input_ids": a, **{f"{side}_input_ids": ids[side][i] for side in SIDES[1:] if side in ids}}
                          for i, a in enumerate(ids["anchor"])]
        card[name] = {"rows": len(part.rows), "negatives": has_negative,
                      "truncated": sum(len(x) >= data.max_length for side in ids.values() for x in side),
                      "tokens": length_stats([len(x) for side in ids.values() for x in side])}
    return Prepared(examples, {}, card)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, tokens, width) states -> (batch, width) embeddings: the mean over real tokens, or the first."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pooled embeddings of a padded batch (float32)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return pool(out.last_hidden_state.float(), attention_mask, pooling)


def _sides(model, batch, cfg: Config) -> list[torch.Tensor]:
    """Anchor, positive (and negative) embeddings from one forward over all the batch's texts."""
    names = [s for s in ("", "positive_", "negative_") if f"{s}input_ids" in batch]
    width = max(batch[f"{s}input_ids"].size(1) for s in names)
    ids = torch.cat([F.pad(batch[f"{s}input_ids"], (0, width - batch[f"{s}input_ids"].size(1))) for s in names])
    mask = torch.cat([F.pad(batch[f"{s}attention_mask"], (0, width - batch[f"{s}attention_mask"].size(1)))
                      for s in names])
    return list(embed(model, ids, mask, cfg.pooling).chunk(len(names)))


def ranking_losses(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """Per-anchor multiple-negatives ranking loss (see the module docstring)."""
    candidates = positives if negatives is None else torch.cat([positives, negatives])
    scores = scale * F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device), reduction="none")


def loss(model, batch, cfg: Config) -> Loss:
    sides = _sides(model, batch, cfg)
    per_anchor = ranking_losses(sides[0], sides[1], sides[2] if len(sides) > 2 else None, cfg.scale)
    return Loss(per_anchor.sum(), per_anchor.numel())


def eval_step(model, batch, cfg: Config) -> dict[str, list]:
    sides = _sides(model, batch, cfg)
    out = {"anchor": sides[0].tolist(), "positive": sides[1].tolist(),
           "loss": ranking_losses(sides[0], sides[1], sides[2] if len(sides) > 2 else None, cfg.scale).tolist()}
    if len(sides) > 2:
        out["negative"] = sides[2].tolist()
    return out


def ranks(anchors: torch.Tensor, corpus: torch.Tensor) -> list[int]:
    """The 1-based rank of corpus[i] among all of `corpus` for anchors[i], by cosine similarity; a tie goes to
    the text earlier in the corpus (so a model that cannot tell texts apart is not credited)."""
    sims = F.normalize(anchors.double(), dim=-1) @ F.normalize(corpus.double(), dim=-1).T
    gold = sims.diagonal()[:, None]
    earlier = torch.arange(corpus.size(0))[None, :] < torch.arange(anchors.size(0))[:, None]
    return (1 + (sims > gold).sum(1) + ((sims == gold) & earlier).sum(1)).tolist()


def ranking_metrics(rank: list[int]) -> dict[str, float]:
    n = max(1, len(rank))
    return {"recall@1": sum(r <= 1 for r in rank) / n, "recall@10": sum(r <= 10 for r in rank) / n,
            "mrr": sum(1 / r for r in rank) / n,
            "ndcg@10": sum(1 / math.log2(r + 1) for r in rank if r <= 10) / n}


@torch.no_grad()
def encode(model, tokenizer, texts: list[str], cfg: Config, data, batch_size: int = 32) -> list[list[float]]:
    """The embedding of each text, in order: tokenized and pooled as in training (cut at data.max_length)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], truncation=True, max_length=data.max_length, padding=True,
                        return_tensors="pt")
        out += embed(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), cfg.pooling).tolist()
    model.train(was_training)
    return out


def metrics(outputs: dict[str, list], cfg: Config) -> dict[str, float]:
    anchors, corpus = torch.tensor(outputs["anchor"]), torch.tensor(outputs["positive"])
    if outputs.get("negative"):
        corpus = torch.cat([corpus, torch.tensor(outputs["negative"])])
    losses = outputs["loss"]
    return {**ranking_metrics(ranks(anchors, corpus)), "loss": sum(losses) / max(1, len(losses))}
