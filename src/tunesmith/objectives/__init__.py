"""What is optimised. One module per objective; see `common.py` for what each module provides."""

from . import classify, clm, dpo, embed, grpo, mlm, ppo, reward, sft

OBJECTIVES = {
    "classify": classify,
    "clm": clm,
    "mlm": mlm,
    "sft": sft,
    "reward": reward,
    "dpo": dpo,
    "ppo": ppo,
    "grpo": grpo,
    "embed": embed,
}

DEFAULT = "classify"
"""The objective of a config that names none."""

FOR_PLAIN_MODEL = {"sequence-classification": "classify", "causal-lm": "sft", "masked-lm": "mlm", "encoder": "embed"}
"""A plain model folder (not a run) is read back as the objective its head is trained by."""
