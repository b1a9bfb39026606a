"""What the tuning modules share: the peft wrapper, the task head, loading a base for a tuning, and the
checks that run before any weights are read.

A tuning module provides
  Config                                  the `tuning:` section, named by its `kind`
  MERGEABLE                               True if `export --format merged` can fold it into the base weights
  apply(model, cfg, head, tokenizer=None) the model to train, `requires_grad` set; tokenizer is None on the
                                          meta device (plan), where nothing is read
and, where it needs them,
  check(cfg, model_config, head)          combinations that cannot work, found from the model's config alone
  load_kwargs(cfg, model_config, head, dtype) -> dict   extra `from_pretrained` arguments (qlora: quantization)
  save(run_dir, model, tokenizer) -> str  write the weights, return the folder name (default: artifacts.save_weights)
  load(cfg, weights_dir, head, kwargs)    rebuild the trained model (default: base + peft adapter, or full weights)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError

# peft's task types decide what the wrapper saves with the adapter (e.g. the new classifier head).
PEFT_TASK_TYPES = {
    "sequence-classification": "SEQ_CLS",
    "causal-lm": "CAUSAL_LM",
    "masked-lm": None,
}


MASKED_LM_TUNINGS = ("full", "freeze")


def head_to_train(model, head: str, train_head: bool) -> list[str] | None:
    """peft's `modules_to_save`: the new classification head trains in full; a pretrained LM head stays frozen."""
    from ..models.anatomy import head_modules

    if head != "sequence-classification" or not train_head:
        return None
    return head_modules(model)


def check_head(head: str, train_head: bool) -> None:
    if head == "sequence-classification" and not train_head:
        raise ConfigError("train_head: false would keep the new classification head at its random initialisation",
                          where="tuning.train_head", hint="remove train_head (a new head must train to be useful)")


def wrap(model, peft_config, head: str):
    """`get_peft_model`, with peft's complaints about the config turned into config errors."""
    from peft import get_peft_model

    peft_config.task_type = PEFT_TASK_TYPES.get(head)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        raise ConfigError(f"peft cannot apply this tuning to {type(model).__name__}: {e}", where="tuning") from None


def is_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def load_base(cfg, head: str, model_kwargs: dict, dtype: torch.dtype, pad_token_id: int | None):
    """The base model as this run's tuning needs it loaded (e.g. 4-bit for qlora)."""
    from ..models.load import build_config, load_model, resolve
    from . import TUNINGS

    tuning = TUNINGS[cfg.tuning.kind]
    extra = {}
    if hasattr(tuning, "load_kwargs"):
        config = build_config(cfg.model, model_kwargs, resolve(cfg.model.name))
        extra = tuning.load_kwargs(cfg.tuning, config, head, dtype)
    return load_model(cfg.model, head, model_kwargs, dtype, pad_token_id, extra=extra)


def load_adapter(cfg, weights: Path, head: str, model_kwargs: dict, pad_token_id: int | None = None):
    """The default reload of a peft run: its base, then the saved adapter on top (frozen, for inference)."""
    from peft import PeftModel

    base = load_base(cfg, head, model_kwargs, torch.float32, pad_token_id)
    return PeftModel.from_pretrained(base, weights)


def check_before_loading(cfg, model_kwargs: dict) -> None:
    """Everything about the tuning that can be wrong, found before any weights are read: the tuning's own
    check on the model's config, then the tuning applied to the model built on the meta device (which
    catches target names that match nothing, layer ranges out of bounds, ...)."""
    from ..models.load import build_config, build_on_meta, check_architecture, resolve
    from ..objectives import OBJECTIVES
    from . import TUNINGS

    head = OBJECTIVES[cfg.objective.kind].HEAD
    tuning = TUNINGS[cfg.tuning.kind]
    if head == "masked-lm" and cfg.tuning.kind not in MASKED_LM_TUNINGS:
        # An encoder's masked-LM head is often missing from the checkpoint (MiniLM's is) and starts random;
        # an adapter over a frozen random head neither learns it nor saves it, so the run would not reload.
        raise ConfigError(f"objective mlm trains with tuning {' or '.join(MASKED_LM_TUNINGS)}, not {cfg.tuning.kind!r}",
                          where="tuning.kind", hint="use tuning.kind=full, or freeze (the last blocks and the head)")
    resolved = resolve(cfg.model.name)
    config = build_config(cfg.model, model_kwargs, resolved)
    check_architecture(cfg.model, config, head, cfg.data.max_length)
    if hasattr(tuning, "check"):
        tuning.check(cfg.tuning, config, head)
    if hasattr(OBJECTIVES[cfg.objective.kind], "check"):
        OBJECTIVES[cfg.objective.kind].check(cfg.objective, config)
    if hasattr(tuning, "load_kwargs") and resolved.startswith("arch:"):
        raise ConfigError(f"tuning {cfg.tuning.kind!r} quantizes pretrained weights, and {cfg.model.name} has none "
                          "(an arch: model is random)", where="model.name",
                          hint="use arch: models with `tunesmith plan`, or train from a model folder or sample")
    model = build_on_meta(cfg.model, head, model_kwargs)
    if cfg.train.gradient_checkpointing:
        _checkpointable(model)
    with torch.device("meta"):
        tuning.apply(model, cfg.tuning, head)


def enable_gradient_checkpointing(model) -> None:
    """Recompute block activations in backward (`train.gradient_checkpointing`). Non-reentrant checkpoints
    need no input that requires grad (frozen embeddings are fine) and replay dropout's random state, so the
    gradients equal those without checkpointing."""
    _checkpointable(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpointable(model):
    """The transformers model inside (a peft wrapper's base), if it supports gradient checkpointing."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(inner).__name__} does not support gradient checkpointing",
                          where="train.gradient_checkpointing", hint="set it to false")
    return inner
