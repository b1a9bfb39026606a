"""Supervised fine-tuning on instructions and chats: next-token loss on the responses only.

Data: any format of docs/formats.md (prompt/completion, alpaca, sharegpt, messages; `text` rows
train on every token). Conversations are rendered by the chat template (data/templates.py);
prompt tokens carry IGNORE_INDEX, the response tokens and their closing end-of-turn token are
targets. By default only the last assistant turn of a conversation trains (earlier turns are
context); `turns: all` trains every assistant turn.

Metrics: loss and perplexity of the responses at every evaluation; after training, base and
tuned model answer held-out prompts once (eval.generate) for ROUGE, exact match and stop rate.
"""

from __future__ import annotations

from typing import Literal, Optional

from ..data.collate import IGNORE_INDEX
from ..errors import DataError
from ..evaluate.metrics import perplexity
from ..schema import Section
from .common import Loss, Prepared
from .lm import causal_lm_forward

HEAD = "causal-lm"
METRICS = ("loss", "perplexity")
GENERATION_METRICS = ("rouge1", "rouge2", "rougeL", "exact_match", "stop_rate", "new_tokens")
MAIN_METRIC, MAIN_MODE = "loss", "min"


class Config(Section):
    kind: Literal["sft"] = "sft"
    """Instruction / chat fine-tuning: loss on the assistant's responses, prompts masked."""
    template: Literal["auto", "tokenizer", "plain", "alpaca", "raw"] = "auto"
    """Chat template: the tokenizer's own (auto uses it when there is one, else plain), or a fallback:
    plain (`User:`/`Assistant:`), alpaca (`### Instruction:`/`### Response:`), raw (prompt continued by the
    completion, no markup). The one used is saved with the tuned tokenizer."""
    system: Optional[str] = None
    """System message put first in every conversation that has none, in training and in generate/chat/compare."""
    turns: Literal["last", "all"] = "last"
    """Which assistant turns of a multi-turn conversation carry loss: the last one, or all of them."""
    pack: bool = False
    """Pack several examples into each sequence of up to data.max_length tokens, attention kept inside each
    example; fewer, fuller sequences and the same loss as unpacked."""


def chat_format(tokenizer, cfg: Config):
    from ..data.templates import ChatFormat

    return ChatFormat.build(tokenizer, cfg.template, cfg.system)


def fit_length(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], str | None]:
    """Make an example fit `max_length`, keeping its last response whole with its end-of-turn token.

    The prompt is cut from the left (the text nearest the answer stays); a response longer than
    max_length on its own is cut at the right and loses its EOS. Returns which of the two happened.
    """
    if len(ids) <= max_length:
        return ids, labels, None
    start = max((i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX),
                default=0)
    if len(ids) - start <= max_length:
        return ids[-max_length:], labels[-max_length:], "prompt"
    return ids[:max_length], labels[:max_length], "response"


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    from ..data.formats import conversations, split_format
    from ..data.pack import pack
    from ..data.templates import ChatFormat, TemplateError
    from ..data.tokenize import length_stats

    chat = chat_format(tokenizer, cfg)
    used_template = False
    examples, card, prompts = {}, {}, {}
    for name, part in splits.items():
        fmt = split_format(part, data.format)
        rows = conversations(part, fmt)
        encoded, cut = [], {"prompt": 0, "response": 0}
        for i, conv in enumerate(rows):
            try:
                ids, labels = chat.encode_text(conv) if isinstance(conv, str) else chat.encode(conv, cfg.turns)
            except TemplateError as e:
                raise DataError(f"row {i}: {e}", where=part.where(i),
                                hint="try another objective.template, or turns: last") from None
            ids, labels, what = fit_length(ids, labels, data.max_length)
            if what:
                cut[what] += 1
            encoded.append({"input_ids": ids, "labels": labels})
        if fmt != "text":
            used_template = True
            prompts[name] = [{"messages": c[:-1], "reference": c[-1]["content"]} for c in rows]
        targets = sum(sum(l != IGNORE_INDEX for l in ex["labels"]) for ex in encoded)
        tokens = sum(len(ex["input_ids"]) for ex in encoded)
        examples[name] = pack(encoded, data.max_length) if cfg.pack else encoded
        card[name] = {
            "rows": len(encoded), "format": fmt, "truncated": cut["prompt"] + cut["response"],
            "responses_cut": cut["response"], "tokens": length_stats([len(ex["input_ids"]) for ex in encoded]),
            "target_share": round(targets / max(1, tokens), 4),
        }
        if cfg.pack:
            card[name]["packed_sequences"] = len(examples[name])
            card[name]["pack_fill"] = round(tokens / max(1, len(examples[name]) * data.max_length), 4)
    card["template"] = chat.name if used_template else None
    card["end_of_turn"] = chat.end_of_turn if used_template else None
    chat = chat if used_template else ChatFormat(tokenizer, None)
    return Prepared(examples, {}, card, chat=chat, prompts=prompts)


def loss(model, batch, cfg: Config) -> Loss:
    sums, counts = causal_lm_forward(model, batch)
    return Loss(sums.sum(), counts.sum())


def eval_step(model, batch, cfg: Config) -> dict[str, list]:
    sums, counts = causal_lm_forward(model, batch)
    return {"loss_sum": sums.tolist(), "tokens": counts.tolist()}


def metrics(outputs: dict[str, list], cfg: Config) -> dict[str, float]:
    mean = sum(outputs["loss_sum"]) / max(1, sum(outputs["tokens"]))
    return {"loss": mean, "perplexity": perplexity(mean)}
