"""`tunesmith plan`: what a run would train and how much memory it needs, before loading any weights.

The model is built on PyTorch's meta device (shapes only, nothing allocated, no weights read), the
tuning's checks run on its config, the tuning is applied, and the parameters are counted. Memory is
estimated as weights + gradients + AdamW state + activations at the configured batch size and max_length,
for the configured tuning and, side by side, for full fine-tuning, LoRA and QLoRA of the same model.

A 4-bit base is counted analytically: bitsandbytes packs two 4-bit weights into each uint8 byte, so a
parameter count of the loaded model (as older peft printed it) sees half the true number for every
quantized layer; the plan reports the true count and the packed storage separately.
"""

from __future__ import annotations

import torch

from . import distilling
from .build import precision_and_dtype
from .config import RunConfig
from .models.anatomy import head_modules
from .models.load import build_on_meta
from .models.params import count_parameters, format_parameters
from .models.quantize import storage
from .objectives import OBJECTIVES
from .tuning import PLAN_BASELINE, TUNINGS

FP32 = 4


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes:.0f} B"


def activation_bytes(config, batch: int, seq: int, head: str, bytes_per_value: int,
                     checkpointing: bool = False) -> float:
    """Stored activations for backward, after Korthikanti et al. (2022): per layer
    s*b*h*(34 + 5*a*s/h) bytes in 16-bit without recomputation; plus the LM logits and their gradient.
    With gradient checkpointing each block keeps only its input (s*b*h values), and one block's full
    activations exist at a time, while it is recomputed."""
    h = getattr(config, "hidden_size", None) or getattr(config, "dim", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", 1)
    if not h or not layers:
        return 0.0
    per_layer = seq * batch * h * (34 + 5 * heads * seq / h) * bytes_per_value / 2
    logits = batch * seq * getattr(config, "vocab_size", 0) * 4 * 2 if head != "sequence-classification" else 0
    if checkpointing:
        return layers * seq * batch * h * bytes_per_value + per_layer + logits
    return layers * per_layer + logits


def memory(*, trainable: int, frozen: int, frozen_bytes: int, packed: dict | None, activations: float) -> dict:
    """Training memory by part. Trainable tensors are fp32 (master weights, gradients, two AdamW moments);
    frozen ones are in the load dtype, except the 4-bit weights, counted as packed bytes plus block scales."""
    weights = trainable * FP32 + frozen * frozen_bytes
    if packed:
        weights += packed["packed"] + packed["constants"] - packed["params"] * frozen_bytes
    return {"weights": weights, "gradients": trainable * FP32, "optimizer": trainable * 2 * FP32,
            "activations": activations}


def plan(cfg: RunConfig) -> dict:
    objective, tuning = OBJECTIVES[cfg.objective.kind], TUNINGS[cfg.tuning.kind]
    head = objective.HEAD
    kwargs = objective.plan_kwargs(cfg.objective) if hasattr(objective, "plan_kwargs") else {}
    base = distilling.student_on_meta(cfg, head) or build_on_meta(cfg.model, head, kwargs)
    distill = distilling.plan_lines(cfg, head, base)  # counted before the tuning wraps the student
    if hasattr(tuning, "check_model"):
        tuning.check_model(cfg.tuning, base.config, head)
    _, dtype = precision_and_dtype(cfg)
    frozen_bytes = torch.empty((), dtype=dtype).element_size()
    compute = 2 if cfg.train.precision in ("bf16", "fp16") or dtype != torch.float32 else 4
    heads = head_modules(base)
    head_params = sum(p.numel() for h in heads for p in base.get_submodule(h).parameters()) \
        if head == "sequence-classification" else 0
    base_total = sum(p.numel() for p in base.parameters())
    packed = storage(base, heads, getattr(cfg.tuning, "double_quant", True))
    seq = cfg.data.max_length + (tuning.added_positions(cfg.tuning) if hasattr(tuning, "added_positions") else 0)

    def act(checkpointing: bool) -> float:
        return activation_bytes(base.config, cfg.train.batch_size, seq, head, compute, checkpointing)

    # the comparison rows: this run's low-rank settings if it has them, else the baseline's defaults
    lowrank = tuning if hasattr(tuning, "trainable_count") else PLAN_BASELINE
    lowrank_cfg = cfg.tuning if lowrank is tuning else PLAN_BASELINE.Config()
    lora_trainable = lowrank.trainable_count(base, lowrank_cfg, head_params)
    with torch.device("meta"):
        model = tuning.apply(base, cfg.tuning, head)
    trainable, total = count_parameters(model)

    quantized = hasattr(tuning, "load_kwargs")  # the base is loaded quantized (qlora)
    checkpointing = uses_checkpointing(cfg)
    # k-bit preparation keeps every non-quantized frozen weight in fp32
    current = memory(trainable=trainable, frozen=total - trainable, frozen_bytes=FP32 if quantized else frozen_bytes,
                     packed=packed if quantized else None, activations=act(checkpointing))
    compare = {
        "full": (base_total, memory(trainable=base_total, frozen=0, frozen_bytes=FP32, packed=None,
                                    activations=act(False))),
        f"lora (r={lowrank_cfg.r})": (lora_trainable, memory(trainable=lora_trainable, frozen=base_total - head_params,
                                                         frozen_bytes=frozen_bytes, packed=None,
                                                         activations=act(False))),
        f"qlora (r={lowrank_cfg.r}, 4-bit)": (lora_trainable, memory(
            trainable=lora_trainable, frozen=base_total - head_params, frozen_bytes=FP32, packed=packed,
            activations=act(getattr(cfg.tuning, "gradient_checkpointing", True)))),
    }
    return {"model": cfg.model.name, "architecture": type(base).__name__, "trainable": trainable, "total": total,
            "dtype": str(dtype).replace("torch.", ""), "memory": current,
            "quantized": packed if quantized else None, "compare": compare, "distill": distill}


def uses_checkpointing(cfg: RunConfig) -> bool:
    """train.gradient_checkpointing, or qlora's own switch (on by default, part of its recipe)."""
    return cfg.train.gradient_checkpointing or getattr(cfg.tuning, "gradient_checkpointing", False)


def render(result: dict, cfg: RunConfig) -> str:
    mem = result["memory"]
    lines = [
        f"model: {result['model']}   tuning: {cfg.tuning.kind}   objective: {cfg.objective.kind}",
        format_parameters(result["trainable"], result["total"]),
        *result.get("distill", []),
    ]
    q = result["quantized"]
    if q:
        packed_total = result["total"] - q["params"] + q["packed"]
        scales = "block scales, double-quantized" if cfg.tuning.double_quant else "block scales"
        lines += [
            f"4-bit base: {q['params']:,d} weights in {q['layers']} linear layers, stored as "
            f"{cfg.tuning.quant_type.upper()} two per byte",
            f"  ({_size(q['packed'])} packed + {_size(q['constants'])} of {scales}). Counting each packed byte as "
            f"one parameter",
            f"  gives the \"all params: {packed_total:,d}\" that older peft printed for this setup; the true",
            f"  number of parameters is {result['total']:,d}.",
        ]
    base = "4-bit + fp32" if q else result["dtype"]
    lines.append(f"training memory estimate (base weights {base}, batch {cfg.train.batch_size} x "
                 f"{cfg.data.max_length} tokens{', gradient checkpointing' if uses_checkpointing(cfg) else ''}):")
    labels = {"weights": "weights", "gradients": "gradients", "optimizer": "AdamW state", "activations": "activations"}
    for key, label in labels.items():
        lines.append(f"  {label:<16}{_size(mem[key]):>12}")
    lines.append(f"  {'total':<16}{_size(sum(mem.values())):>12}  (activations: upper bound at max_length)")
    lines.append("the same run with:              trainable       memory")
    for name, (n, m) in result["compare"].items():
        lines.append(f"  {name:<24}{n:>16,d}{_size(sum(m.values())):>13}")
    return "\n".join(lines)
