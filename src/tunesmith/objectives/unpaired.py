"""Unpaired answers for KTO (dpo's `loss: kto`): rows -> (prompt, answer, label) -> tokens.

Rows are `{"prompt", "completion", "label": true/false}` (data/formats.py `unpaired`), or preference rows,
which are unpaired: a pair's chosen answer becomes a row labelled true and its rejected answer one labelled
false (both keep the pair's number, so held-out splits can still be compared pair by pair). Each answer is
rendered with the chat template as sft renders it (objectives/pairs.py does the same for pairs): only answer
tokens count, the prompt is shortened first when too long.

KTO's reference point is an estimate of KL(policy || reference) taken on mismatched (prompt, answer)
pairs: each example also holds `kl_input_ids`/`kl_labels`, its own prompt with the answer of the next row
(cyclically) whose prompt differs. trl pairs prompt i with answer i-1 inside each training batch; here the
partner is fixed once per split, so every epoch, `--resume` and evaluation see the same pairs.
"""

from __future__ import annotations

from ..data.formats import UNPAIRED_FORMATS, split_format, unpaired_rows
from ..data.templates import ChatFormat, TemplateError
from ..data.tokenize import length_stats
from ..errors import DataError
from .common import Prepared
from .sft import fit_length


def kl_partners(prompts: list) -> list[int]:
    """For each row, the next row (cyclically) whose prompt differs; the next row if all prompts are one."""
    n = len(prompts)
    out = []
    for i in range(n):
        j = next(((i + k) % n for k in range(1, n) if prompts[(i + k) % n] != prompts[i]), (i + 1) % n)
        out.append(j)
    return out


def prepare_unpaired(splits, tokenizer, template: str, system: str | None, data) -> Prepared:
    chat = ChatFormat.build(tokenizer, template, system)
    examples, card, prompts = {}, {}, {}
    for name, part in splits.items():
        fmt = split_format(part, data.format, allowed=UNPAIRED_FORMATS)
        rows = unpaired_rows(part, fmt)
        if not rows:
            raise DataError(f"the {name} split gives no answers to label (every scored row's answers tie)",
                            where=part.where(0), hint="give scored rows answers with different scores")
        partners = kl_partners([r[1] for r in rows])
        encoded, cut, prompts[name] = [], 0, []
        for (i, prompt, answer, label, pair), j in zip(rows, partners):
            try:
                ids, labels, conv, what = fit_length(chat, prompt + [{"role": "assistant", "content": answer}],
                                                     "last", data.max_length)
                kl_ids, kl_labels, _, _ = fit_length(chat, prompt + [{"role": "assistant", "content": rows[j][2]}],
                                                     "last", data.max_length)
            except TemplateError as e:
                raise DataError(f"row {i}: {e}", where=part.where(i), hint="try another objective.template") from None
            cut += what is not None
            encoded.append({"input_ids": ids, "labels": labels, "kl_input_ids": kl_ids, "kl_labels": kl_labels,
                            "desirable": int(label), "pair": pair})
            prompts[name].append({"messages": conv[:-1], "reference": answer, "label": label})
        examples[name] = encoded
        desirable = sum(e["desirable"] for e in encoded)
        card[name] = {"rows": len(part.rows), "answers": len(encoded), "format": fmt, "desirable": desirable,
                      "undesirable": len(encoded) - desirable, "truncated": cut,
                      "tokens": length_stats([len(e["input_ids"]) for e in encoded])}
    card["template"], card["end_of_turn"] = chat.name, chat.end_of_turn
    return Prepared(examples, {}, card, chat=chat, prompts=prompts)
