"""What is optimised. One module per objective; see `common.py` for what each module provides."""

from . import classify, clm, mlm, ppo, sft

OBJECTIVES = {
    "classify": classify,
    "clm": clm,
    "mlm": mlm,
    "sft": sft,
    "ppo": ppo,
}
