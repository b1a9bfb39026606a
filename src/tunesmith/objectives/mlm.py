"""Masked language modelling: adapt an encoder (BERT-style) to a domain's text.

Data: the `text` format, one column `text`. Of the tokens that are not special, `mask_probability`
(15%) are chosen; of those, 80% become the mask token, 10% a random token, 10% stay as they are
(Devlin et al., 2019), and the model predicts the original of every chosen token. Training draws
new masks at every step (dynamic masking, as in RoBERTa) from the seeded torch generator, so a run
repeats and resumes exactly; validation and test masks are drawn once with the seed, so the base
and the tuned model are scored on the same masked tokens.

Metrics: loss (cross-entropy per masked token) and its exponential, perplexity.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch
from pydantic import Field

from ..data.collate import IGNORE_INDEX
from ..data.tokenize import length_stats, tokenize_texts
from ..errors import DataError, ModelError
from ..schema import Section
from .common import Loss, Prepared
from .lm import LOSS_CHUNK, masked_lm_forward, token_metrics

HEAD = "masked-lm"
METRICS = {"loss": "min", "perplexity": "min"}
MAIN_METRIC = "loss"
MASK, RANDOM = 0.8, 0.1  # shares of chosen tokens masked / replaced by a random token (the rest stay)


class Config(Section):
    kind: Literal["mlm"] = "mlm"
    """Masked-token prediction on plain text (encoders)."""
    mask_probability: float = Field(0.15, gt=0, lt=1)
    """Share of (non-special) tokens chosen for prediction; 80% of them masked, 10% random, 10% kept."""
    loss_chunk: int = Field(LOSS_CHUNK, ge=0)
    """Masked tokens whose vocabulary-wide logits exist at a time: the output layer and the loss run over them
    chunk by chunk, recomputed in the backward pass, so a batch's logits are never all held (objectives/lm.py);
    0: the whole batch's logits at once."""


def _choose(maskable: torch.Tensor, probability: float, generator: torch.Generator | None):
    """(chosen, masked, randomised) boolean tensors: the 15% / 80-10-10 draw."""
    def draw(p):
        return torch.rand(maskable.shape, generator=generator, device=maskable.device) < p

    chosen = draw(probability) & maskable
    masked = chosen & draw(MASK)
    randomised = chosen & ~masked & draw(RANDOM / (1 - MASK))
    return chosen, masked, randomised


def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, mask_id: torch.Tensor, vocab: int, probability: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked input ids and labels (the original id where chosen, IGNORE_INDEX elsewhere)."""
    chosen, masked, randomised = _choose(maskable.bool(), probability, generator)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    noise = torch.randint(vocab, ids.shape, generator=generator, device=ids.device)
    inputs = torch.where(masked, mask_id.view(-1, 1).expand_as(ids), ids)
    inputs = torch.where(randomised, noise, inputs)
    return inputs, labels


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    if tokenizer.mask_token_id is None:
        raise ModelError("the tokenizer has no mask token, so the model cannot be trained by masking",
                         where="model.name", hint="mlm is for encoders such as BERT; use clm for decoders")
    examples, card = {}, {}
    for name, part in splits.items():
        for i, row in enumerate(part.rows):
            if not isinstance(row.get("text"), str):
                raise DataError(f"row has no 'text' string; columns found: {', '.join(row)}", where=part.where(i),
                                hint="map your column with data.columns.text: <your column name>")
        ids, truncated = tokenize_texts(tokenizer, [r["text"] for r in part.rows], data.max_length)
        items = []
        for x in ids:
            special = tokenizer.get_special_tokens_mask(x, already_has_special_tokens=True)
            items.append({"input_ids": x, "maskable": [1 - m for m in special], "mask_id": tokenizer.mask_token_id})
        if name != "train":  # fixed masks, so every model (and every run) is scored on the same tokens
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            items = [_masked_once(ex, len(tokenizer), cfg.mask_probability, g) for ex in items]
        examples[name] = items
        card[name] = {"rows": len(ids), "truncated": truncated, "tokens": length_stats([len(x) for x in ids])}
    return Prepared(examples, {}, card)


def _masked_once(ex: dict, vocab: int, probability: float, generator: torch.Generator) -> dict:
    ids, maskable, mask_id = (torch.tensor([ex[k]]) for k in ("input_ids", "maskable", "mask_id"))
    inputs, labels = mask_tokens(ids, maskable, mask_id, vocab, probability, generator)
    return {"input_ids": inputs[0].tolist(), "labels": labels[0].tolist()}


def _forward(model, batch, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and masked-token count per sequence."""
    if "labels" in batch:  # validation / test: masked once in prepare
        inputs, labels = batch["input_ids"], batch["labels"]
    else:
        inputs, labels = mask_tokens(batch["input_ids"], batch["maskable"] * batch["attention_mask"],
                                     batch["mask_id"], model.config.vocab_size, cfg.mask_probability)
    return masked_lm_forward(model, {"input_ids": inputs, "attention_mask": batch["attention_mask"], "labels": labels},
                             cfg.loss_chunk)


def loss(model, batch, cfg: Config) -> Loss:
    sums, counts = _forward(model, batch, cfg)
    return Loss(sums.sum(), counts.sum())


def eval_step(model, batch, cfg: Config) -> dict[str, list]:
    sums, counts = _forward(model, batch, cfg)
    return {"loss_sum": sums.tolist(), "tokens": counts.tolist()}


metrics = token_metrics
