"""4-bit quantization of a frozen base (QLoRA) with bitsandbytes, and what plan and export need to know about it.

bitsandbytes stores each quantized linear layer's weight as uint8 bytes, two 4-bit codes per byte, plus
one fp32 scale ("absmax") per block of 64 values. Double quantization stores those scales in 8 bits,
with one fp32 scale per 256 blocks. A forward pass dequantizes the weight and multiplies in the
compute dtype. Embeddings, norms and the task/LM head stay in floating point.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCK = 64
"""Values per absmax scale (bitsandbytes' 4-bit block size)."""
NESTED_BLOCK = 256
"""Blocks per second-level fp32 scale under double quantization."""


def bnb_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype, skip: list[str]):
    """The `quantization_config` that makes `from_pretrained` load the body's linear layers in 4 bits.

    skip: module names left in floating point; the task head (new, and trained in full) and the LM head.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=skip or None)


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")


def keep_compute_dtype(model: nn.Module) -> None:
    """Keep 4-bit layers computing in their configured dtype on CPU.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place on its first no-grad
    forward in eval mode and from then on multiplies in bf16: evaluation would then see other numbers
    (about 1e-3 apart) than training did, and merged exports could not match. Turning that path off
    keeps fp32 compute exact: a 4-bit layer then equals its dequantized weight in a plain matmul.
    """
    for m in model.modules():
        if is_4bit(m) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def release_checkpoint(model: nn.Module) -> None:
    """Give the weights that were not quantized (embeddings, norms, head, biases) memory of their own.

    transformers reads safetensors through a memory map and leaves tensors it did not convert as views of
    it. With a 4-bit base that map stays alive for those few tensors, and every page of it that was read
    while quantizing, i.e. the whole fp32 checkpoint, stays counted in the process's resident memory.
    Copying the unconverted tensors (a small part of the model) lets the map go. The fp32 temporaries of
    quantization are freed by then, but glibc keeps freed heap pages resident; handing them back to the
    system keeps them from adding to the training peak.
    """
    import ctypes
    import gc

    seen = set()
    with torch.no_grad():
        for module in model.modules():
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for _, t in tensors:
                if id(t) in seen or t.device.type != "cpu" or not t.is_floating_point():
                    continue
                seen.add(id(t))
                t.data = t.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


def quantized_linears(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Module]]:
    """The linear layers `from_pretrained` would quantize (works on the meta device): every linear layer
    outside `skip` and outside the model's keep-in-fp32 modules."""
    from ..tuning.targets import is_linear

    keep = list(skip) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    out = []
    for name, m in model.named_modules():
        if not is_linear(m) or any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in keep):
            continue
        out.append((name, m))
    return out


def storage(model: nn.Module, skip: list[str], double_quant: bool) -> dict[str, int]:
    """How a 4-bit base is stored, counted analytically from the (meta-device) model.

    params: true number of quantized weights; packed: bytes (= uint8 elements, what a parameter count of the
    quantized model sees); constants: bytes of the block scales.
    """
    n = layers = constants = 0
    for _, m in quantized_linears(model, skip):
        numel = m.weight.numel()
        blocks = -(-numel // BLOCK)
        n += numel
        layers += 1
        # an fp32 scale per block, or (double quant) a uint8 one plus an fp32 scale per 256 blocks
        constants += (blocks + 4 * -(-blocks // NESTED_BLOCK)) if double_quant else 4 * blocks
    return {"params": n, "layers": layers, "packed": -(-n // 2) if n else 0, "constants": constants}


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as F

    weight = module.weight
    return F.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)


def as_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain fp32 nn.Linear with `weight` and the module's bias."""
    bias = getattr(module, "bias", None)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach().to(torch.float32))
    return out


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
