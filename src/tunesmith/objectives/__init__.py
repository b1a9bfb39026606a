"""What is optimised. One module per objective; see `common.py` for what each module provides."""

from . import classify, clm, dpo, mlm, ppo, reward, sft

OBJECTIVES = {
    "classify": classify,
    "clm": clm,
    "mlm": mlm,
    "sft": sft,
    "reward": reward,
    "dpo": dpo,
    "ppo": ppo,
}
