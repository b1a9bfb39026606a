"""Causal language modelling (continued pretraining): predict every next token of plain text.

Data: the `text` format, one column `text`. Loss and perplexity are averaged over target tokens,
so long and short examples weigh by their length, as in pretraining.

Each row is one example, truncated at data.max_length, by default. `blocks` concatenates the
documents and cuts them into blocks of data.max_length tokens (nothing lost to truncation or
padding); `pack` puts several whole documents into each sequence without attention crossing them.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..data.pack import blocks, pack
from ..data.templates import ChatFormat
from ..data.tokenize import length_stats, tokenize_texts
from ..errors import DataError
from ..schema import Section
from .common import Prepared
from .distill import DistillConfig
from .lm import LOSS_CHUNK, causal_eval_step, causal_loss, token_metrics

HEAD = "causal-lm"
METRICS = {"loss": "min", "perplexity": "min"}
MAIN_METRIC = "loss"


class Config(Section):
    kind: Literal["clm"] = "clm"
    """Next-token prediction on plain text."""
    blocks: bool = False
    """Concatenate the documents (each closed by EOS) and cut them into blocks of data.max_length tokens, as in
    pretraining: no truncation, no padding; a document may continue into the next block."""
    pack: bool = False
    """Keep attention inside each document: several whole documents per sequence of up to data.max_length
    tokens (or, with blocks, document boundaries inside each block); the loss equals the unpacked loss."""
    distill: Optional[DistillConfig] = None
    """Also learn from a teacher's outputs (knowledge distillation, objectives/distill.py), e.g.
    `{teacher: runs/<name>, temperature: 2.0, alpha: 0.5}`."""
    loss_chunk: int = Field(LOSS_CHUNK, ge=0)
    """Target tokens whose vocabulary-wide logits exist at a time: the output layer and the loss run over them
    chunk by chunk, recomputed in the backward pass, so a batch's logits are never all held (objectives/lm.py);
    0: the whole batch's logits at once."""


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    examples, card = {}, {}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for name, part in splits.items():
        for i, row in enumerate(part.rows):
            if not isinstance(row.get("text"), str):
                raise DataError(f"row has no 'text' string; columns found: {', '.join(row)}", where=part.where(i),
                                hint="map your column with data.columns.text: <your column name>")
        texts = [r["text"] for r in part.rows]
        if cfg.blocks:
            docs = [x + eos for x in tokenizer(texts, add_special_tokens=True)["input_ids"]]
            examples[name] = blocks(docs, data.max_length, separate=cfg.pack)
            card[name] = {"rows": len(docs), "truncated": 0, "tokens": length_stats([len(x) for x in docs]),
                          "blocks": len(examples[name])}
            continue
        ids, truncated = tokenize_texts(tokenizer, texts, data.max_length)
        # a document ends with EOS, so the model learns where text stops
        ids = [x + eos if len(x) < data.max_length else x for x in ids]
        examples[name] = [{"input_ids": x, "labels": list(x)} for x in ids if len(x) > 1]
        card[name] = {"rows": len(ids), "truncated": truncated, "tokens": length_stats([len(x) for x in ids])}
        if cfg.pack:
            examples[name] = pack(examples[name], data.max_length)
            card[name]["packed_sequences"] = len(examples[name])
    return Prepared(examples, {}, card, chat=ChatFormat(tokenizer, None) if eos else None)


loss, eval_step, metrics = causal_loss, causal_eval_step, token_metrics
