"""LoRA (Hu et al., 2021) through peft: frozen base, trainable low-rank updates B·A on chosen layers.

The adapter is saved in peft's format, so `PeftModel.from_pretrained(base, run/adapter)` loads it
anywhere, and it merges into the base weights for export.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from ..schema import Section

# peft's task types decide what the wrapper saves with the adapter (e.g. the new classifier head).
PEFT_TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "causal-lm": "CAUSAL_LM",
    "masked-lm": None,
}


class Config(Section):
    kind: Literal["lora"] = "lora"
    """Low-rank adapters on the target layers; the base stays frozen."""
    r: int = Field(8, ge=1)
    """Rank of the update matrices."""
    alpha: float = Field(16, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    targets: Union[list[str], str] = "all-linear"
    """Layers to adapt: a list of module names (`query`, `v_proj`; matched at the end of the full name),
    `all-linear` (every linear layer but the output head), or a regular expression written `re:<pattern>`
    matched against the full module name."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train alongside the adapters."""
    train_head: bool = True
    """Train the task head as well (a new classifier head must train to be useful)."""


def peft_targets(targets: Union[list[str], str]):
    """Translate our `targets` value into peft's `target_modules` argument."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return "all-linear"
        if targets.startswith("re:"):
            return targets[3:]
        return [targets]
    return list(targets)


def apply(model, cfg: Config, head: str):
    from peft import LoraConfig, get_peft_model

    task_type = PEFT_TASK_TYPES.get(head)
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=peft_targets(cfg.targets),
        bias=cfg.bias,
        task_type=task_type,
    )
    if task_type == "SEQ_CLS" and not cfg.train_head:
        peft_cfg.modules_to_save = []
    return get_peft_model(model, peft_cfg)
