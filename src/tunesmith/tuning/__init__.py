"""Which parameters train. One module per method; `common.py` says what each module provides.

Every `apply(model, cfg, head, tokenizer=None)` takes a transformers model and the objective's head kind
(`sequence-classification`, `causal-lm`, `masked-lm`) and returns the model to train, `requires_grad` set,
with logits that line up with the input ids whatever the method adds.
"""

from . import adapter, dora, freeze, full, ia3, lora, prefix, prompt, qlora

TUNINGS = {
    "full": full,
    "freeze": freeze,
    "lora": lora,
    "qlora": qlora,
    "dora": dora,
    "ia3": ia3,
    "prefix": prefix,
    "prompt": prompt,
    "adapter": adapter,
}

DEFAULT = "lora"
"""The tuning of a config that names none."""

PLAN_BASELINE = lora
"""`tunesmith plan` sets every run beside full fine-tuning and this low-rank method (plain and 4-bit)."""
