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

from pydantic import Field

from ..data.collate import IGNORE_INDEX
from ..data.formats import conversations, split_format
from ..data.pack import pack
from ..data.templates import ChatFormat, TemplateError
from ..data.tokenize import length_stats
from ..errors import DataError
from ..schema import Section
from .common import Prepared
from .distill import DistillConfig
from .lm import LOSS_CHUNK, causal_eval_step, causal_loss, token_metrics

HEAD = "causal-lm"
METRICS = {"loss": "min", "perplexity": "min"}
GENERATION_METRICS = {"rouge1": "max", "rouge2": "max", "rougeL": "max", "exact_match": "max", "stop_rate": "max",
                      "new_tokens": None}  # longer answers are not better or worse in themselves
MAIN_METRIC = "loss"


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
    distill: Optional[DistillConfig] = None
    """Also learn from a teacher's outputs (knowledge distillation, objectives/distill.py), e.g.
    `{teacher: runs/<name>, temperature: 2.0, alpha: 0.5}`."""
    loss_chunk: int = Field(LOSS_CHUNK, ge=0)
    """Answer tokens whose vocabulary-wide logits exist at a time: the output layer and the loss run over them
    chunk by chunk, recomputed in the backward pass, so a batch's logits are never all held (objectives/lm.py);
    0: the whole batch's logits at once."""


def chat_format(tokenizer, cfg: Config):
    return ChatFormat.build(tokenizer, cfg.template, cfg.system)


def fit_length(chat, conv, turns: str, max_length: int) -> tuple[list[int], list[int], list[dict] | str, str | None]:
    """Encode an example so it fits `max_length`, keeping the template and the answer's end-of-turn whole.

    A conversation too long is shortened inside its prompt: the end of its longest prompt message
    is cut (a document to summarise, say) until it fits, so the system message, the instruction's
    start and the assistant header stay. If the prompt cannot shrink enough (or the row is plain
    text), the example is cut at the right and its answer loses its end. Returns the ids, labels,
    the conversation as trained, and what was cut ("prompt", "response" or None).
    """
    if isinstance(conv, str):
        ids, labels = chat.encode_text(conv)
        return (ids, labels, conv, None) if len(ids) <= max_length else (ids[:max_length], labels[:max_length],
                                                                           conv, "response")
    ids, labels = chat.encode(conv, turns)
    if len(ids) <= max_length:
        return ids, labels, conv, None
    conv = [dict(m) for m in conv]
    tok = chat.tokenizer
    for _ in range(2 * len(conv)):
        i = max(range(len(conv) - 1), key=lambda k: len(conv[k]["content"]), default=None)
        if i is None or not conv[i]["content"]:
            break
        content = tok(conv[i]["content"], add_special_tokens=False)["input_ids"]
        # decoding and re-encoding can shift a token or two, hence the small margin
        conv[i]["content"] = tok.decode(content[:max(0, len(content) - (len(ids) - max_length) - 2)])
        ids, labels = chat.encode(conv, turns)
        if len(ids) <= max_length:
            return ids, labels, conv, "prompt"
    return ids[:max_length], labels[:max_length], conv, "response"


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    chat = chat_format(tokenizer, cfg)
    used_template = False
    examples, card, prompts = {}, {}, {}
    for name, part in splits.items():
        fmt = split_format(part, data.format)
        rows = conversations(part, fmt)
        encoded, trained, cut = [], [], {"prompt": 0, "response": 0}
        for i, conv in enumerate(rows):
            try:
                ids, labels, conv, what = fit_length(chat, conv, cfg.turns, data.max_length)
            except TemplateError as e:
                raise DataError(f"row {i}: {e}", where=part.where(i),
                                hint="try another objective.template, or turns: last") from None
            if what:
                cut[what] += 1
            encoded.append({"input_ids": ids, "labels": labels})
            trained.append(conv)
        if fmt != "text":
            used_template = True
            # generation metrics prompt with the conversation as trained (shortened if it had to be)
            prompts[name] = [{"messages": c[:-1], "reference": rows[i][-1]["content"]} for i, c in enumerate(trained)]
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


loss, eval_step, metrics = causal_loss, causal_eval_step, token_metrics
