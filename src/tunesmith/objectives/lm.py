"""Token-level language-model losses shared by the LM objectives (clm, sft, mlm, later dpo/ppo) and the
forgetting probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.collate import IGNORE_INDEX


def shifted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of predicting labels[t+1] from position t, and the mask of real targets.

    Returns (losses, mask), both (batch, seq-1); losses are 0 where the label is IGNORE_INDEX.
    """
    logits, targets = logits[:, :-1, :].float(), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    return losses, mask


def causal_lm_forward(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss per example and target-token count per example, for a causal LM batch."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    logits = model(**kwargs).logits
    losses, mask = shifted_token_losses(logits, batch["labels"])
    return losses.sum(-1), mask.sum(-1)


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
