"""Find the parts of a transformers model by structure, not by architecture name.

Tuning methods need "the transformer blocks" and "the task head" for any architecture; looking
them up structurally keeps a per-architecture table out of the code.
"""

from __future__ import annotations

from torch import nn


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the ModuleList of same-typed modules holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise ValueError(f"no stack of transformer blocks found in {type(model).__name__}")
    return best[1], best[2]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the task head: everything outside the pretrained body (`base_model_prefix`).

    Tied weights (an LM head sharing the embedding matrix) are returned once, as the shared tensor.
    """
    inner = unwrap(model)
    prefix = getattr(inner, "base_model_prefix", "")
    body = getattr(inner, prefix, None) if prefix else None
    if body is None or body is inner:
        return []
    body_ids = {id(p) for p in body.parameters()}
    head, seen = [], set()
    for name, p in inner.named_parameters(remove_duplicate=False):
        if name.startswith(prefix + "."):
            continue
        if id(p) not in seen:
            seen.add(id(p))
            head.append(p)
    # A head tied to the input embeddings is still the head: keep it even though the body owns it.
    return [p for p in head if id(p) not in body_ids or _is_tied_output(inner, p)]


def logits_layer(model: nn.Module, outputs: int) -> nn.Linear:
    """The layer that produces a classifier's logits: the last trainable Linear with `outputs` outputs (under a
    peft wrapper, the trainable copy of the head, not the frozen original)."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == outputs
             and m.weight.requires_grad]
    if not found:
        raise ValueError(f"no trainable {outputs}-output linear layer (the classifier head) in {type(model).__name__}")
    return found[-1]


def _is_tied_output(model: nn.Module, p: nn.Parameter) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and getattr(out, "weight", None) is p


MASKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that apply an attention mask as given, whatever its pattern: a 4-D mask, or a 2-D one
with zeros between a row's tokens (transformers' masking utilities pass both through)."""


def attention_implementation(model: nn.Module) -> str | None:
    """The attention kernel transformers runs the model with (`config._attn_implementation`), or None."""
    return getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside its wrappers, if any: a DistributedDataParallel's module, a peft model's base."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def head_modules(model: nn.Module) -> list[str]:
    """Names of the top-level modules outside the pretrained body: the task head (`classifier`, `score`,
    `pre_classifier`, `lm_head`, ...). Read from structure, so a meta-device model answers too."""
    inner = unwrap(model)
    prefix = getattr(inner, "base_model_prefix", "")
    if not prefix or getattr(inner, prefix, None) is None:
        return []
    return [name for name, child in inner.named_children() if name != prefix and any(True for _ in child.parameters())]


def block_index(name: str, blocks_prefix: str) -> int | None:
    """The block a module belongs to, from its full name (`model.layers.3.mlp.up_proj` -> 3), or None."""
    if not name.startswith(blocks_prefix + "."):
        return None
    head = name[len(blocks_prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None
