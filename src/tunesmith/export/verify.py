"""Does an exported model compute what the tuned model computed? Logits on a few prompts, and for language
models the greedy continuation of each.

The reference outputs are taken from the tuned model before it is merged (merging consumes it), then each
candidate (the merged model in memory, the folder reloaded from disk, a GGUF file read back) is run on the
same prompts and compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPTS = (
    "The old house at the end of the street",
    "To make a good cup of tea, first",
    "The most important lesson I learned was",
    "When the storm finally passed, the villagers",
    "Here is a short list of things to pack for a trip:",
)
"""Used when no prompts are given: plain English openings, not from any training set here."""


@dataclass
class Outputs:
    ids: list[list[int]]
    logits: list[torch.Tensor]
    greedy: list[list[int]] | None
    """New token ids of each greedy continuation (language models only)."""


@torch.no_grad()
def outputs(model, tokenizer, prompts, generate: bool, max_new_tokens: int = 16) -> Outputs:
    ids, logits, greedy = [], [], [] if generate else None
    device = next(model.parameters()).device
    for text in prompts:
        enc = tokenizer(text, return_tensors="pt").to(device)
        ids.append(enc["input_ids"][0].tolist())
        out = model(**enc)
        # an encoder (objective embed) has no logits: its last hidden states are what it outputs
        logits.append((out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float().cpu())
        if generate:
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id)
            greedy.append(out[0, enc["input_ids"].shape[1]:].tolist())
    return Outputs(ids, logits, greedy)


def compare(reference: Outputs, candidate: Outputs) -> dict:
    """How far the candidate is from the reference: tokenization, logits, greedy continuations."""
    same_ids = [a == b for a, b in zip(reference.ids, candidate.ids)]
    diffs = [float((a - b).abs().max()) for a, b, same in zip(reference.logits, candidate.logits, same_ids) if same]
    report = {
        "prompts": len(reference.ids),
        "same_tokenization": sum(same_ids),
        "max_abs_logit_diff": max(diffs) if diffs else None,
    }
    if reference.greedy is not None and candidate.greedy is not None:
        report["greedy_match"] = sum(a == b for a, b in zip(reference.greedy, candidate.greedy))
    else:
        report["argmax_match"] = sum(
            bool(torch.equal(a.argmax(-1), b.argmax(-1))) for a, b, same in
            zip(reference.logits, candidate.logits, same_ids) if same)
    return report


def describe(report: dict) -> str:
    n = report["prompts"]
    parts = [f"max |logit diff| {report['max_abs_logit_diff']:.2e}" if report["max_abs_logit_diff"] is not None
             else "no comparable logits"]
    if "greedy_match" in report:
        parts.append(f"greedy output identical on {report['greedy_match']}/{n} prompts")
    else:
        parts.append(f"same predicted class on {report['argmax_match']}/{n} prompts")
    if report["same_tokenization"] != n:
        parts.append(f"tokenized identically on {report['same_tokenization']}/{n}")
    return ", ".join(parts)
