"""Token-level language-model losses shared by the causal objectives (clm, sft, and later dpo/ppo)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.collate import IGNORE_INDEX


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


def causal_lm_forward(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss per example and target-token count per example, for a causal LM batch."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    logits = model(**kwargs).logits
    losses, mask = shifted_token_losses(logits, batch["labels"])
    return losses.sum(-1), mask.sum(-1)
