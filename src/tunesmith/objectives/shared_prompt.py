"""An example's two answers to one prompt in one row: the prompt runs once.

dpo's chosen and rejected answers (kto's answer and its KL answer) start with the same prompt tokens. Run as two
padded sequences, the prompt runs twice and both are padded to the longer one. Here each example becomes one
row, prompt + first answer + second answer, with position ids that restart the second answer where the prompt
ended and an attention mask that lets each answer see the prompt and itself, never the other answer:

    tokens     p0 p1 p2 | a0 a1 | b0 b1 b2
    positions   0  1  2 |  3  4 |  3  4  5
    b1 sees    p0 p1 p2            b0 b1

A causal model computes at every position exactly what it computes in the separate sequences (same tokens before
it, same positions), so the log-probs are the same, with fewer tokens through the model: on the dpo example's
pairs (max_length 128) about 20% fewer. The answer's first token is predicted from the prompt's last position,
shared by both answers.

Whether a model honours a custom mask and position ids is checked once per model object, on a few random tokens,
against the separate sequences; a model that does not (attention kernels without custom masks, prompt-learning
adapters that prepend virtual tokens, a sliding window that a custom mask would override) keeps the two-sequence
forward, as does a batch where some example shares no prompt token.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..data.collate import IGNORE_INDEX
from ..models.anatomy import MASKABLE_ATTENTION, attention_implementation, unwrap
from .lm import chunked_losses, head_run

_SUPPORTED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


@dataclass
class Layout:
    """One batch of examples laid out as one row each."""

    ids: torch.Tensor
    """(batch, length) token ids: prompt, first answer, second answer, right-padded."""
    positions: torch.Tensor
    """(batch, length) position ids: each answer continues from the prompt's end."""
    segments: torch.Tensor
    """(batch, length): 0 prompt, 1 first answer, 2 second answer, -1 padding."""
    rows: torch.Tensor
    """(targets,) the row of each target token."""
    predictors: torch.Tensor
    """(targets,) the position in that row whose output predicts the target."""
    targets: torch.Tensor
    """(targets,) the target token ids."""
    sequence: torch.Tensor
    """(targets,) which sequence a target counts for: i for example i's first, batch + i for its second."""


def _prompt_length(a: list[int], b: list[int], la: list[int], lb: list[int]) -> int:
    """Leading positions two sequences share: the same tokens, no target on either side."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p] and la[p] == IGNORE_INDEX and lb[p] == IGNORE_INDEX:
        p += 1
    return p


def row_length(example: dict, second: str) -> int:
    """Positions `example` takes as one row (its prompt once), for grouping batches by length."""
    a, b = example["input_ids"], example[f"{second}input_ids"]
    return len(a) + len(b) - _prompt_length(a, b, example["labels"], example[f"{second}labels"])


def layout(batch: dict, second: str) -> Layout | None:
    """The one-row layout of `batch` (fields `input_ids`, `labels` and the `second`-prefixed ones), or None if
    some example's two sequences share no leading prompt token."""
    size = batch["input_ids"].size(0)
    lengths = (batch["attention_mask"].sum(1).tolist(), batch[f"{second}attention_mask"].sum(1).tolist())
    ids, positions, segments = [], [], []
    rows, predictors, targets, sequence = [], [], [], []
    for i in range(size):
        n1, n2 = lengths[0][i], lengths[1][i]
        a, b = batch["input_ids"][i, :n1].tolist(), batch[f"{second}input_ids"][i, :n2].tolist()
        la, lb = batch["labels"][i, :n1].tolist(), batch[f"{second}labels"][i, :n2].tolist()
        p = _prompt_length(a, b, la, lb)
        if p == 0:
            return None
        ids.append(a + b[p:])
        positions.append(list(range(n1)) + list(range(p, n2)))
        segments.append([0] * p + [1] * (n1 - p) + [2] * (n2 - p))
        for q in range(p, n1):  # token q of the first answer, predicted by position q - 1
            if la[q] != IGNORE_INDEX:
                rows.append(i), predictors.append(q - 1), targets.append(la[q]), sequence.append(i)
        for q in range(p, n2):  # the second answer sits n1 - p further along, after the first
            if lb[q] != IGNORE_INDEX:
                predictor = q - 1 if q - 1 < p else q - 1 + n1 - p
                rows.append(i), predictors.append(predictor), targets.append(lb[q]), sequence.append(size + i)
    width = max(len(r) for r in ids)
    device = batch["input_ids"].device

    def padded(values, fill):
        return torch.tensor([r + [fill] * (width - len(r)) for r in values], dtype=torch.long, device=device)

    def flat(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return Layout(padded(ids, 0), padded(positions, 0), padded(segments, -1), flat(rows), flat(predictors),
                  flat(targets), flat(sequence))


def attention_mask(segments: torch.Tensor, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, length, length): a position sees earlier positions of the prompt and of its own answer (padding
    sees itself only). Boolean (True: seen) for sdpa; additive (0 or the dtype's minimum) for eager attention."""
    n = segments.size(1)
    earlier = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)
    seen = earlier & (key >= 0) & ((key == 0) | (key == query))
    seen |= torch.eye(n, dtype=torch.bool, device=segments.device)
    seen = seen.unsqueeze(1)
    if not eager:
        return seen
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)


def _inputs(model, lay: Layout) -> dict:
    dtype = unwrap(model).get_input_embeddings().weight.dtype
    mask = attention_mask(lay.segments, attention_implementation(model) == "eager", dtype)
    return {"input_ids": lay.ids, "attention_mask": mask, "position_ids": lay.positions, "use_cache": False}


def supported(model) -> bool:
    """Does this model compute a shared-prompt row as it computes the separate sequences? Checked once per model,
    in eval mode without gradients, on random tokens: a 3-token prompt with answers of 2 and 3 tokens."""
    if model in _SUPPORTED:
        return _SUPPORTED[model]
    inner = getattr(model, "module", model)
    config = getattr(inner, "active_peft_config", None)
    ok = attention_implementation(model) in MASKABLE_ATTENTION and not getattr(config, "is_prompt_learning", False)
    if ok:
        ok = _same_as_separate(model)
    _SUPPORTED[model] = ok
    return ok


@torch.no_grad()
def _same_as_separate(model) -> bool:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = unwrap(model).get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompt, first, second = (torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 2, 3))
    a, b = prompt + first, prompt + second
    batch = {"input_ids": torch.tensor([a]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "labels": torch.tensor([[IGNORE_INDEX] * 3 + first]), "second_input_ids": torch.tensor([b]),
             "second_attention_mask": torch.ones(1, 6, dtype=torch.long),
             "second_labels": torch.tensor([[IGNORE_INDEX] * 3 + second])}
    lay = layout({k: v.to(device) for k, v in batch.items()}, "second_")
    try:  # a model that cannot take the mask or the positions at all fails here: it keeps the separate forward
        row = model(**_inputs(model, lay)).logits[0]
        separate = [model(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0] for s in (a, b)]
    except (RuntimeError, ValueError, TypeError, IndexError):
        return False
    finally:
        model.train(was_training)
    together = torch.cat([separate[0], separate[1][3:]])  # the second's prompt positions are the shared ones
    tol = 1e-4 if row.dtype == torch.float32 else 5e-2
    return bool(torch.allclose(row.float(), together.float(), atol=tol, rtol=tol))


def logps(model, batch: dict, chunk: int, second: str):
    """(logp first, logp second, answer tokens first, answer tokens second) as `dpo.sequence_logps` returns them,
    from one row per example; None where this model or batch cannot (then run the two sequences)."""
    if chunk <= 0 or not supported(model):
        return None
    lay = layout(batch, second)
    if lay is None:
        return None
    run = head_run(model, _inputs(model, lay))
    if run is None:
        return None
    size = batch["input_ids"].size(0)
    losses = chunked_losses(run.head, run.hidden[lay.rows, lay.predictors], lay.targets, chunk)
    sums = losses.new_zeros(2 * size).index_add(0, lay.sequence, losses)
    counts = torch.zeros(2 * size, dtype=torch.long, device=losses.device).index_add(
        0, lay.sequence, torch.ones_like(lay.sequence))
    return -sums[:size], -sums[size:], counts[:size], counts[size:]
