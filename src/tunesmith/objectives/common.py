"""The small types every objective shares.

What an objective module provides is written down in `tunesmith/axes.py` (`Objective`,
`SupervisedObjective`, `ObjectiveHooks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Prepared:
    """Tokenized examples per split, plus what the model needs to be built for them."""

    examples: dict[str, list[dict]]
    """Per split: dicts of token ids and targets, ready for `collate`."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra arguments for building the model (e.g. num_labels, id2label)."""
    card: dict[str, Any] = field(default_factory=dict)
    """Facts for the data card (label balance, truncation counts, ...)."""
    chat: Any = None
    """The ChatFormat (data/templates.py) that rendered the examples, for causal LMs; generation and the
    saved tokenizer use the same, so a tuned model is prompted as it was trained."""
    prompts: dict[str, list[dict]] = field(default_factory=dict)
    """Per split: `{"messages": prompt conversation, "reference": answer}` for generation metrics."""


@dataclass
class Loss:
    """A summed loss and what it was summed over, so accumulation can weight micro-batches exactly."""

    total: torch.Tensor
    """Sum of per-unit losses (units: examples, or target tokens for sequence objectives)."""
    count: torch.Tensor | int
    """Number of units in `total`."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra training metrics to log (already averaged over this micro-batch)."""
