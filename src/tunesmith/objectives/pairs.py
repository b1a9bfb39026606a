"""Preference pairs for the preference objectives (reward, dpo): rows -> (prompt, chosen, rejected) -> tokens.

Rows are any preference format of data/formats.py (prompt/chosen/rejected with text or messages,
sharegpt preference rows, scored answers). Each answer is rendered with the same chat template as sft
(data/templates.py `ChatFormat`): the prompt exactly as sft renders it, the answer as an assistant turn
closed by the end-of-turn token. So what is preferred is what the model later generates.

An example holds both sides: `input_ids`/`labels` (prompt + chosen) and `rejected_input_ids`/
`rejected_labels` (prompt + rejected); labels are IGNORE_INDEX on the prompt, as in sft. A pair too long
for data.max_length has its prompt shortened (as sft does), the same cut for both answers, so the two
sides always share one prompt; if that is not enough, both are cut at the right.
"""

from __future__ import annotations

from ..data.formats import PREFERENCE_FORMATS, preference_pairs, split_format
from ..data.templates import ChatFormat, TemplateError
from ..data.tokenize import length_stats
from ..errors import DataError
from .common import Prepared
from .sft import fit_length


def encode_pair(chat, prompt: list[dict], chosen: str, rejected: str, max_length: int):
    """(chosen ids, chosen labels, rejected ids, rejected labels, prompt as used, what was cut or None)."""
    answers = {"chosen": chosen, "rejected": rejected}
    # fit the longer side first; the shorter one reuses its (possibly shortened) prompt
    first = max(answers, key=lambda k: len(answers[k]))
    ids, labels, conv, cut = fit_length(chat, prompt + [{"role": "assistant", "content": answers[first]}], "last",
                                        max_length)
    prompt = conv[:-1]
    other = "rejected" if first == "chosen" else "chosen"
    o_ids, o_labels = chat.encode(prompt + [{"role": "assistant", "content": answers[other]}], "last")
    if len(o_ids) > max_length:
        o_ids, o_labels, cut = o_ids[:max_length], o_labels[:max_length], "response"
    sides = {first: (ids, labels), other: (o_ids, o_labels)}
    return (*sides["chosen"], *sides["rejected"], prompt, cut)


def prepare_pairs(splits, tokenizer, template: str, system: str | None, data, labels: bool = True) -> Prepared:
    """Every split's pairs tokenized; `labels` False keeps token ids only (a reward model scores whole texts)."""
    chat = ChatFormat.build(tokenizer, template, system)
    examples, card, prompts = {}, {}, {}
    for name, part in splits.items():
        fmt = split_format(part, data.format, allowed=PREFERENCE_FORMATS)
        pairs = preference_pairs(part, fmt)
        if not pairs:
            raise DataError(f"the {name} split gives no preference pairs (every scored row's answers tie)",
                            where=part.where(0), hint="give scored rows answers with different scores")
        encoded, cut, prompts[name] = [], {"prompt": 0, "response": 0}, []
        for i, prompt, chosen, rejected in pairs:
            try:
                c_ids, c_labels, r_ids, r_labels, used, what = encode_pair(chat, prompt, chosen, rejected,
                                                                           data.max_length)
            except TemplateError as e:
                raise DataError(f"row {i}: {e}", where=part.where(i), hint="try another objective.template") from None
            if what:
                cut[what] += 1
            example = {"input_ids": c_ids, "rejected_input_ids": r_ids}
            if labels:
                example.update(labels=c_labels, rejected_labels=r_labels)
            encoded.append(example)
            prompts[name].append({"messages": used, "reference": chosen, "rejected": rejected})
        examples[name] = encoded
        card[name] = {
            "rows": len(part.rows), "pairs": len(encoded), "format": fmt,
            "truncated": cut["prompt"] + cut["response"], "responses_cut": cut["response"],
            "tokens": length_stats([max(len(e["input_ids"]), len(e["rejected_input_ids"])) for e in encoded]),
        }
    card["template"], card["end_of_turn"] = chat.name, chat.end_of_turn
    return Prepared(examples, {}, card, chat=chat, prompts=prompts)
