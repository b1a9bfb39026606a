"""`tunesmith plan`: what a run would train and how much memory it needs, before loading any weights.

The model is built on PyTorch's meta device (shapes only, nothing allocated, no weights read), the
tuning is applied to it, and the parameters are counted. Memory is estimated as weights +
gradients + AdamW state + activations at the configured batch size and max_length.
"""

from __future__ import annotations

import torch

from .config import RunConfig
from .models.load import build_on_meta
from .models.params import count_parameters, format_parameters
from .objectives import OBJECTIVES
from .tuning import TUNINGS

GiB = 2**30


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes:.0f} B"


def activation_bytes(config, batch: int, seq: int, head: str, bytes_per_value: int) -> float:
    """Stored activations for backward, after Korthikanti et al. (2022): per layer
    s*b*h*(34 + 5*a*s/h) bytes in 16-bit without recomputation; plus the LM logits and their gradient."""
    h = getattr(config, "hidden_size", None) or getattr(config, "dim", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", 1)
    if not h or not layers:
        return 0.0
    per_layer = seq * batch * h * (34 + 5 * heads * seq / h) * bytes_per_value / 2
    logits = batch * seq * getattr(config, "vocab_size", 0) * 4 * 2 if head != "sequence-classification" else 0
    return layers * per_layer + logits


def estimate(model, cfg: RunConfig, trainable: int, dtype: torch.dtype) -> dict[str, float]:
    weight_bytes = 0
    for p in model.parameters():
        # Trainable tensors are kept in fp32 (master weights), the frozen base in its load dtype.
        size = 4 if p.requires_grad else torch.empty((), dtype=dtype).element_size()
        weight_bytes += p.numel() * size
    head = OBJECTIVES[cfg.objective.kind].HEAD
    compute = 2 if cfg.train.precision in ("bf16", "fp16") or dtype != torch.float32 else 4
    return {
        "weights": weight_bytes,
        "gradients": trainable * 4,
        "optimizer": trainable * 8,  # AdamW: two fp32 moments per trainable value
        "activations": activation_bytes(model.config, cfg.train.batch_size, cfg.data.max_length, head, compute),
    }


def plan(cfg: RunConfig) -> dict:
    from .run import precision_and_dtype

    objective, tuning = OBJECTIVES[cfg.objective.kind], TUNINGS[cfg.tuning.kind]
    kwargs = objective.plan_kwargs(cfg.objective) if hasattr(objective, "plan_kwargs") else {}
    model = build_on_meta(cfg.model, objective.HEAD, kwargs)
    with torch.device("meta"):
        model = tuning.apply(model, cfg.tuning, objective.HEAD)
    trainable, total = count_parameters(model)
    _, dtype = precision_and_dtype(cfg)
    memory = estimate(model, cfg, trainable, dtype)
    return {"model": cfg.model.name, "architecture": type(getattr(model, "base_model", model)).__name__,
            "trainable": trainable, "total": total, "dtype": str(dtype).replace("torch.", ""), "memory": memory}


def render(result: dict, cfg: RunConfig) -> str:
    mem = result["memory"]
    lines = [
        f"model: {result['model']}   tuning: {cfg.tuning.kind}   objective: {cfg.objective.kind}",
        format_parameters(result["trainable"], result["total"]),
        f"training memory estimate (base weights {result['dtype']}, batch {cfg.train.batch_size} x "
        f"{cfg.data.max_length} tokens):",
    ]
    labels = {"weights": "weights", "gradients": "gradients", "optimizer": "AdamW state", "activations": "activations"}
    for key, label in labels.items():
        lines.append(f"  {label:<16}{_size(mem[key]):>12}")
    lines.append(f"  {'total':<16}{_size(sum(mem.values())):>12}  (activations: upper bound at max_length)")
    return "\n".join(lines)
