"""Token-level language-model losses shared by the LM objectives (clm, sft, mlm, dpo, distillation) and the
forgetting probe.

Without the full logits. A loss needs the output layer only at target tokens (answers in sft and dpo, the
masked 15% in mlm), and never all of them at once: `head_run` runs the model with its output layer fed one
position per row (a forward pre-hook keeps what it would have read: the last hidden states), the target
positions are gathered, and `chunked_losses` runs the output layer and the cross-entropy over `chunk` of them
at a time, so the [tokens x vocab] logits and their softmax copies are never all alive: a chunk of them is.
For backward, a frozen output layer (LoRA and the other adapters) has its gradient with respect to its input
taken chunk by chunk in the forward pass (nothing kept, nothing recomputed: no slower than the full logits);
a trainable one (full tuning, tied embeddings) has each chunk checkpointed, its logits recomputed in backward.
(torchtune's CEWithChunkedOutputLoss chunks only the float upcast and keeps every chunk for backward; Liger's fused
linear cross-entropy computes the weight's gradient in the forward pass too, which needs the upstream gradient
to be one scalar: per-sequence log-probs (dpo) break that, recomputation does not.)

Whatever the output layer is (a Linear tied to the embeddings, a peft LoRA or modules_to_save wrapper
of it, BERT's MLM decoder), it is called as the model calls it, so gradients reach the same weights. A
model whose logits are not just that layer over those states (Gemma 2's soft-capping, a logit scale) is
found on its first batch, by comparing the one position it computed with the layer's own output, and
then uses the full logits, as `chunk: 0` does.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.collate import IGNORE_INDEX
from ..errors import ConfigError
from ..evaluate.metrics import perplexity
from .common import Loss

LOSS_CHUNK = 1024
"""Default target tokens per chunk (objective.loss_chunk): a chunk's float32 logits are chunk x vocab x 4 bytes
(200 MB at a 49k vocabulary), held two or three times while its softmax and gradient are formed."""

def shifted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of predicting labels[t+1] from position t, and the mask of real targets.

    Returns (losses, mask), both (batch, seq-1); losses are 0 where the label is IGNORE_INDEX.
    The labels are shifted, not the logits (as transformers' own loss does): slicing the
    (batch, seq, vocab) logits would copy them, and again in the backward pass, which for a small
    model with a large vocabulary is a good part of its training memory.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    return losses[:, :-1], targets[:, :-1] != IGNORE_INDEX


def causal_inputs(batch) -> dict:
    """The model's inputs for a causal LM batch, padded or packed.

    Packed batches (with `position_ids`) go in without a 2-D attention mask: transformers then reads
    the position restarts as example boundaries and builds a block-diagonal causal mask. No cache
    either: with one, the boundaries are ignored and attention crosses examples (checked in 5.x).
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def causal_lm_logits(model, batch) -> torch.Tensor:
    """Logits for a causal LM batch, padded or packed (all of them: see `head_run` for the way without)."""
    return model(**causal_inputs(batch)).logits


# ---------------------------------------------------------------------------------------------
# The output layer apart from the body


@dataclass
class HeadRun:
    """One forward pass of a model with its output layer held back."""

    hidden: torch.Tensor
    """(batch, seq, hidden): what the output layer reads at every input position."""
    head: torch.nn.Module
    """The output layer, as the model calls it (peft wrappers included): `head(hidden)` are the logits."""
    out: object
    """The model's own output (its `logits` cover the last position only; `hidden_states` if asked for)."""


_SEPARABLE: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
"""Per model object: are its logits its output layer over the states that layer reads? Found on its first batch."""


def output_layer(model) -> torch.nn.Module | None:
    inner = getattr(model, "module", model)  # under DDP
    get = getattr(inner, "get_output_embeddings", None)
    return get() if get is not None else None


@contextmanager
def _held_back(head: torch.nn.Module, seen: list, check: list | None):
    """While inside: each call of `head` records its input in `seen` and computes only the last position. With
    `check`, the first call also puts there the output layer's own logits at that position, formed with the
    random state the model's call then uses (so dropout in a LoRA'd head draws the same mask)."""
    def grab(module, args, kwargs):
        if not args or args[0].dim() < 2 or inside:
            return None
        seen.append(args[0])
        last = args[0][..., -1:, :]
        if check is not None and not check:
            inside.append(True)
            devices = [last.device] if last.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                check.append(head(last, *args[1:], **kwargs).float())
            inside.clear()
        return (last, *args[1:]), kwargs

    inside: list = []
    handle = head.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def head_run(model, inputs: dict) -> HeadRun | None:
    """Run `model(**inputs)` without forming its logits; None if its logits cannot be formed from its output
    layer alone (then call it as usual).

    Prompt tuning puts virtual tokens before the input: their states are dropped, so `hidden` lines up with
    `input_ids`.
    """
    head = output_layer(model)
    if head is None or _SEPARABLE.get(model) is False:
        return None
    seen: list[torch.Tensor] = []
    check = [] if model not in _SEPARABLE else None
    with _held_back(head, seen, check):
        out = model(**inputs)
    if check is not None:
        theirs = getattr(out, "logits", None)
        _SEPARABLE[model] = (len(seen) == 1 and theirs is not None and theirs.shape == check[0].shape
                             and bool(torch.allclose(theirs.float(), check[0], atol=1e-5, rtol=1e-4)))
    if not _SEPARABLE[model] or len(seen) != 1:
        return None
    hidden = seen[0]
    n = inputs["input_ids"].size(1)
    return HeadRun(hidden[:, hidden.size(1) - n:], head, out)


def _chunk_losses(head, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="none")


class _FrozenHeadLosses(torch.autograd.Function):
    """Per-row cross-entropy through an output layer with no trainable weights, its gradient taken in the forward
    pass, chunk by chunk: a row's loss depends on its own row alone, so d loss_i / d row_i is all backward needs
    (scaled by the upstream gradient of loss_i), and no logits are kept or recomputed. (With trainable weights
    their gradient sums over rows weighted by upstream gradients not known yet: those heads recompute instead.)"""

    @staticmethod
    def forward(ctx, rows, targets, head, chunk):
        losses, grads = [], []
        for s in range(0, len(rows), chunk):
            with torch.enable_grad():
                part = rows[s:s + chunk].detach().requires_grad_(True)
                loss = _chunk_losses(head, part, targets[s:s + chunk])
                grads.append(torch.autograd.grad(loss.sum(), part)[0])
            losses.append(loss.detach())
        ctx.save_for_backward(torch.cat(grads))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad):
        (row_grads,) = ctx.saved_tensors
        return row_grads * grad.unsqueeze(-1).to(row_grads.dtype), None, None, None


def chunked_losses(head, rows: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cross-entropy of `head(rows)` against `targets`, per row, `chunk` rows at a time. With gradients, a frozen
    output layer's gradient is taken chunk by chunk in the forward pass (`_FrozenHeadLosses`); a trainable one's
    chunks are checkpointed, their logits recomputed in the backward pass instead of kept."""
    if not len(rows):
        return rows.new_zeros(0, dtype=torch.float32)
    trainable_head = any(p.requires_grad for p in head.parameters())
    if not torch.is_grad_enabled() or not (rows.requires_grad or trainable_head):
        return torch.cat([_chunk_losses(head, rows[s:s + chunk], targets[s:s + chunk])
                          for s in range(0, len(rows), chunk)])
    if not trainable_head:
        return _FrozenHeadLosses.apply(rows, targets, head, chunk)
    return torch.cat([checkpoint(_chunk_losses, head, rows[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
                      for s in range(0, len(rows), chunk)])


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels[t + 1] at position t (what position t predicts); IGNORE_INDEX at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_losses(model, inputs: dict, targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Summed cross-entropy per sequence and target count per sequence, `targets` aligned with the input
    positions (IGNORE_INDEX: no target), computed in chunks (`chunked_losses`); None if this model cannot."""
    run = head_run(model, inputs) if chunk > 0 else None
    if run is None:
        return None
    mask = targets != IGNORE_INDEX
    b, t = mask.nonzero(as_tuple=True)
    losses = chunked_losses(run.head, run.hidden[b, t], targets[b, t], chunk)
    sums = losses.new_zeros(targets.size(0)).index_add(0, b, losses)
    return sums, mask.sum(-1)


def causal_lm_forward(model, batch, chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss per sequence and target-token count per sequence, for a causal LM batch; `chunk` target
    tokens of logits at a time (0: the whole batch's logits at once)."""
    chunked = token_losses(model, causal_inputs(batch), shifted_targets(batch["labels"]), chunk)
    if chunked is not None:
        return chunked
    losses, mask = shifted_token_losses(causal_lm_logits(model, batch), batch["labels"])
    return losses.sum(-1), mask.sum(-1)


@torch.no_grad()
def check_packing(model) -> None:
    """Fail before training if this model lets attention cross packed examples.

    Runs two short random sequences one by one and packed into one row, and compares the logits.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (1, n), generator=g).to(device) for n in (5, 4))
    alone = [model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits for x in (a, b)]
    positions = torch.tensor([list(range(5)) + list(range(4))], device=device)
    packed = model(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False).logits
    model.train(was_training)
    together = torch.cat(alone, 1)
    tol = 1e-3 if packed.dtype == torch.float32 else 5e-2  # bf16 kernels differ a little between the two ways
    if not torch.allclose(packed.float(), together.float(), atol=tol, rtol=tol):
        raise ConfigError(
            f"{type(model).__name__} does not keep attention inside packed examples (its logits change when "
            "examples share a sequence)", where="objective.pack",
            hint="set objective.pack: false for this model")


def masked_lm_forward(model, batch, chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss per example and masked-token count per example, for a masked LM batch; `chunk` masked
    tokens of logits at a time (0: all at once)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    chunked = token_losses(model, inputs, labels, chunk)
    if chunked is not None:
        return chunked
    logits = model(**inputs).logits.float()
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(labels)
    return losses.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def lm_losses(model, batch, head: str, chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed loss and target count for a language-model head (causal-lm or masked-lm)."""
    return (causal_lm_forward if head == "causal-lm" else masked_lm_forward)(model, batch, chunk)


# The loss, evaluation step and metrics of every objective whose unit is a target token (clm, sft).

def causal_loss(model, batch, cfg) -> Loss:
    sums, counts = causal_lm_forward(model, batch, cfg.loss_chunk)
    return Loss(sums.sum(), counts.sum())


def causal_eval_step(model, batch, cfg) -> dict[str, list]:
    sums, counts = causal_lm_forward(model, batch, cfg.loss_chunk)
    return {"loss_sum": sums.tolist(), "tokens": counts.tolist()}


def token_metrics(outputs: dict[str, list], cfg) -> dict[str, float]:
    """Loss per target token over the whole split, and its exponential."""
    mean = sum(outputs["loss_sum"]) / max(1, sum(outputs["tokens"]))
    return {"loss": mean, "perplexity": perplexity(mean)}
