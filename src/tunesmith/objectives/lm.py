"""Token-level language-model losses shared by the LM objectives (clm, sft, mlm, later dpo/ppo) and the
forgetting probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.collate import IGNORE_INDEX
from ..errors import ConfigError
from ..evaluate.metrics import perplexity
from .common import Loss


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


def causal_lm_logits(model, batch) -> torch.Tensor:
    """Logits for a causal LM batch, padded or packed.

    Packed batches (with `position_ids`) go in without a 2-D attention mask: transformers then reads
    the position restarts as example boundaries and builds a block-diagonal causal mask. No cache
    either: with one, the boundaries are ignored and attention crosses examples (checked in 5.x).
    """
    if "position_ids" in batch:
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def causal_lm_forward(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss per sequence and target-token count per sequence, for a causal LM batch."""
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


def masked_lm_forward(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss per example and masked-token count per example, for a masked LM batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view_as(labels)
    return losses.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def lm_losses(model, batch, head: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed loss and target count for a language-model head (causal-lm or masked-lm)."""
    return (causal_lm_forward if head == "causal-lm" else masked_lm_forward)(model, batch)


# The loss, evaluation step and metrics of every objective whose unit is a target token (clm, sft).

def causal_loss(model, batch, cfg) -> Loss:
    sums, counts = causal_lm_forward(model, batch)
    return Loss(sums.sum(), counts.sum())


def causal_eval_step(model, batch, cfg) -> dict[str, list]:
    sums, counts = causal_lm_forward(model, batch)
    return {"loss_sum": sums.tolist(), "tokens": counts.tolist()}


def token_metrics(outputs: dict[str, list], cfg) -> dict[str, float]:
    """Loss per target token over the whole split, and its exponential."""
    mean = sum(outputs["loss_sum"]) / max(1, sum(outputs["tokens"]))
    return {"loss": mean, "perplexity": perplexity(mean)}
