"""Fold a tuning into its base: the result is a plain transformers model, with nothing of peft left.

LoRA, DoRA and (IA)^3 merge through peft. A 4-bit (QLoRA) base is dequantized first: each adapted layer
becomes dequant(W) + its LoRA update in fp32, every other 4-bit layer becomes dequant(W), so the merged
model computes what the quantized model plus adapter computed (not what the original full-precision base
plus adapter would). Prompt and prefix tuning and bottleneck adapters add computation that no weight
matrix can hold; they are refused with the reason.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import TunesmithError


class NotMergeable(TunesmithError):
    """The tuning cannot be folded into the base weights."""


def refuse_unmergeable(model: nn.Module) -> None:
    """Refuse what no weight can hold: peft's virtual tokens, or any module that says why (`NOT_MERGEABLE`)."""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and peft_cfg.is_prompt_learning:
        kind = str(peft_cfg.peft_type.value).lower().replace("_", " ")
        raise NotMergeable(f"{kind} adds virtual tokens to the input; no weight of the base can hold them",
                           hint="ship the base model and the adapter folder together (PeftModel.from_pretrained)")
    reason = next((m.NOT_MERGEABLE for m in model.modules() if getattr(m, "NOT_MERGEABLE", None)), None)
    if reason:
        raise NotMergeable(reason, hint="ship the run's adapter/ folder with its base model, loaded with tunesmith")


def is_quantized(model: nn.Module) -> bool:
    from ..models.quantize import is_4bit

    return any(is_4bit(m) for m in model.modules())


def merge(model: nn.Module) -> nn.Module:
    """A plain fp32 transformers model computing what `model` (tuned, possibly peft, possibly 4-bit) computes.

    Consumes `model`: its modules are reused or replaced in place.
    """
    refuse_unmergeable(model)
    if hasattr(model, "peft_config"):
        model = _dequantize_and_merge(model) if is_quantized(model) else model.merge_and_unload()
    elif is_quantized(model):
        model = _dequantize(model)
    return model.float()


def _dequantize_and_merge(peft_model) -> nn.Module:
    from peft.tuners.lora import LoraLayer

    from ..models.quantize import as_linear, dequantized_weight, is_4bit, replace

    base = peft_model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer) and is_4bit(module.get_base_layer()):
            weight = dequantized_weight(module.get_base_layer())
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).to(weight.dtype)
            replace(base, name, as_linear(module.get_base_layer(), weight))
    plain = peft_model.unload()  # what is left of peft: the head's modules_to_save wrapper
    return _dequantize(plain)


def _dequantize(model: nn.Module) -> nn.Module:
    """Every 4-bit layer as an fp32 nn.Linear, then the whole as a freshly built model without any trace of
    quantization in its config or attributes (so save_pretrained writes an ordinary checkpoint)."""
    from ..models.quantize import as_linear, dequantized_weight, is_4bit, replace

    for name, module in list(model.named_modules()):
        if is_4bit(module):
            replace(model, name, as_linear(module, dequantized_weight(module)))
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    fresh = type(model)._from_config(config, dtype=torch.float32)
    for name, child in list(fresh.named_children()):  # a part the model had dropped (an encoder's pooler) stays so
        if getattr(model, name, child) is None:
            setattr(fresh, name, None)
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()
