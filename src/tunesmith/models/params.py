"""Parameter counts, reported in peft's `print_trainable_parameters` format."""

from __future__ import annotations


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), each shared tensor counted once; peft models use peft's own count."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for p in model.parameters():  # parameters() already yields a tied tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def format_parameters(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
