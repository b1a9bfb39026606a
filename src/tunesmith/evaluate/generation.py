"""Generate answers and score them: batched, left-padded, stopping on the template's end-of-turn token.

Used by sft's generation metrics, `generate`, `chat` and `compare` (and meant for PPO rollouts):
prompts are token ids from `ChatFormat.encode_prompt`, so a model is prompted exactly as it was
trained. A generation *stopped* when it produced a stop token before `max_new_tokens`; the stop
rate is the share of generations that did.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from ..progress import bar
from .decoding import decode, plain_decode, supports_fast_path
from .metrics import text_metrics


@dataclass
class Generation:
    text: str
    """The answer, decoded without special tokens and without the stop token."""
    tokens: int
    """New tokens generated, the stop token included."""
    stopped: bool
    """Ended with a stop token before max_new_tokens."""
    ids: list[int] = field(default_factory=list, repr=False)
    """The generated token ids, the stop token included (what a rollout scores)."""


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], settings, stop_ids: list[int], seed: int = 0,
             expected: list[int] | None = None, streamer=None, stopping=None) -> list[Generation]:
    """One generation per prompt (token ids), in prompt order, `settings.batch_size` generated together.

    Prompts are decoded with continuous batching (evaluate/decoding.py): a finished row leaves the batch and
    the next prompt takes its place. They enter longest first, by `expected` answer length when known (the
    references' lengths, in evaluation), else by prompt length. `streamer` (a transformers streamer, one
    prompt only) receives the tokens as they are generated; `stopping` (transformers stopping criteria) may
    end a generation early (a server's stop strings, a cancelled request).
    """
    if streamer is not None and len(prompts) != 1:
        raise ValueError("a streamer follows one generation; give one prompt")
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    stops = set(stop_ids)
    key = expected if expected is not None else [len(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -key[i])
    run = decode if supports_fast_path(model) else plain_decode
    progress = bar(range(len(prompts)), "generate", total=len(prompts))
    ticks = iter(progress)
    try:
        rows = run(model, prompts, settings, stop_ids, pad, seed, order, streamer, stopping,
                   on_done=lambda i: next(ticks, None))
    finally:
        model.train(was_training)
        if hasattr(progress, "close"):
            progress.close()
    out = []
    for row in rows:
        stopped = bool(row) and row[-1] in stops
        kept = row[:-1] if stopped else row
        out.append(Generation(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(row), stopped, row))
    return out


def describe(settings) -> str:
    """The settings a generation used, in one line (printed by generate and chat, so none is applied unseen)."""
    parts = [f"max_new_tokens {settings.max_new_tokens}"]
    if settings.do_sample:
        parts.append(f"sampling (temperature {settings.temperature:g}, top_p {settings.top_p:g})")
    else:
        parts.append("greedy")
    parts.append(f"repetition_penalty {settings.repetition_penalty:g}" +
                 ("" if settings.repetition_penalty != 1.0 else " (off)"))
    parts.append(f"batch_size {settings.batch_size}")
    return "generation: " + ", ".join(parts)


def answer(model, chat, conversations: list[list[dict]], settings, seed: int = 0,
           expected: list[int] | None = None, streamer=None, stopping=None) -> list[Generation]:
    """The model's next turn for each conversation, prompted through `chat` (a ChatFormat)."""
    prompts = [chat.encode_prompt(c) for c in conversations]
    return generate(model, chat.tokenizer, prompts, settings, chat.stop_ids(), seed, expected, streamer, stopping)


def metric_names(references: list[str], configured: list[str] | None) -> list[str]:
    """The configured text metrics, or ROUGE-1/2/L plus exact match when references are short."""
    if configured is not None:
        return list(configured)
    short = statistics.median(len(r.split()) for r in references) <= 10 if references else False
    return ["rouge1", "rouge2", "rougeL"] + (["exact_match"] if short else [])


def score(generations: list[Generation], references: list[str], names: list[str]) -> dict[str, float]:
    """Text metrics against the references, the stop rate, and the mean answer length in tokens."""
    scores = text_metrics([g.text for g in generations], references, names)
    scores["stop_rate"] = sum(g.stopped for g in generations) / max(1, len(generations))
    scores["new_tokens"] = sum(g.tokens for g in generations) / max(1, len(generations))
    return scores


def evaluate_generation(model, chat, items: list[dict], settings, seed: int = 0) -> tuple[dict, list[Generation]]:
    """Answer held-out prompts (`{"messages", "reference"}` items) and score the answers."""
    references = [it["reference"] for it in items]
    expected = [len(ids) for ids in chat.tokenizer(references, add_special_tokens=False)["input_ids"]]
    generations = answer(model, chat, [it["messages"] for it in items], settings, seed, expected)
    return score(generations, references, metric_names(references, settings.metrics)), generations
