"""QLoRA (Dettmers et al., 2023): LoRA on a base whose linear layers are stored in 4 bits.

The base loads through bitsandbytes as NF4 (4-bit NormalFloat; or FP4), optionally with double
quantization of the block scales, and computes in fp32 on CPU (no bf16 units there) or bf16 on GPUs that
have them. k-bit preparation (peft's `prepare_model_for_kbit_training`) freezes the base, keeps the
non-quantized weights (embeddings, norms, head) in fp32 and turns on gradient checkpointing; LoRA goes on
top, in fp32. The adapter saves in peft's format; export merges it into the dequantized base.
"""

from __future__ import annotations

from typing import Literal

from ..errors import ConfigError
from ..models.anatomy import head_modules
from ..models.load import head_class, quiet_transformers
from ..models.quantize import bnb_config
from . import lora
from .common import wrap
from .lora import LowRank, activation_values  # noqa: F401  (the same adapters as LoRA)

MERGEABLE = True
TRAINS_BASE = False
LR_RANGE = lora.LR_RANGE
advice = lora.advice  # the same rank and dropout
HEADS = frozenset({"sequence-classification", "causal-lm", "encoder"})  # not masked-lm: a random MLM head would stay frozen


class Config(LowRank):
    kind: Literal["qlora"] = "qlora"
    """LoRA on a 4-bit quantized base (bitsandbytes); the base stays frozen."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the base weights: nf4 (NormalFloat, suits normally distributed weights) or fp4."""
    double_quant: bool = True
    """Quantize the per-block scales too (8-bit, one fp32 scale per 256 blocks): about 0.4 bits less per weight."""
    gradient_checkpointing: bool = True
    """Recompute each block's activations in the backward pass instead of storing them (part of the QLoRA
    recipe: activations, not weights, dominate memory once the base is 4-bit); slower per step."""


def check_model(cfg: Config, model_config, head: str) -> None:
    lora.check_model(cfg, model_config, head)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("qlora needs the bitsandbytes package", where="tuning.kind",
                          hint="pip install -c constraints.txt bitsandbytes") from None


def load_kwargs(cfg: Config, model_config, head: str, dtype):
    """Load the base in 4 bits; the head modules (task head, LM head) stay in floating point."""
    import torch

    with torch.device("meta"), quiet_transformers():
        skip = head_modules(head_class(head).from_config(model_config))
    return {"quantization_config": bnb_config(cfg.quant_type, cfg.double_quant, dtype, skip)}


def apply(model, cfg: Config, head: str, tokenizer=None):
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):  # not on the meta device, where plan counts analytically
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return wrap(model, lora.peft_config(model, cfg, head), head)


def trainable_count(base, cfg: Config, head_params: int) -> int:
    return lora.trainable_count(base, cfg, head_params)
