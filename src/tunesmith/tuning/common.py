"""What the tuning modules share: the peft wrapper and the task head. (Loading a base as a tuning needs
it and the checks before any weights are read are the run layer's: tunesmith/build.py.)

What a tuning module provides is written down in `tunesmith/axes.py` (`Tuning`, `TuningHooks`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..models.anatomy import head_modules

# peft's task types decide what the wrapper saves with the adapter (e.g. the new classifier head).
PEFT_TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "causal-lm": "CAUSAL_LM",
    "masked-lm": None,
    "encoder": "FEATURE_EXTRACTION",
}


def head_to_train(model, head: str, train_head: bool) -> list[str] | None:
    """peft's `modules_to_save`: the new classification head trains in full; a pretrained LM head stays frozen."""
    if head != "sequence-classification" or not train_head:
        return None
    return head_modules(model)


def check_head(head: str, train_head: bool) -> None:
    if head == "sequence-classification" and not train_head:
        raise ConfigError("train_head: false would keep the new classification head at its random initialisation",
                          where="tuning.train_head", hint="remove train_head (a new head must train to be useful)")


def wrap(model, peft_config, head: str):
    """`get_peft_model`, with peft's complaints about the config turned into config errors."""
    from peft import get_peft_model

    peft_config.task_type = PEFT_TASK_TYPES.get(head)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        raise ConfigError(f"peft cannot apply this tuning to {type(model).__name__}: {e}", where="tuning") from None


def is_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())
