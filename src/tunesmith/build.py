"""Building the model a run trains, in the run layer: the precision, the base loaded as the tuning needs it
(e.g. 4-bit), gradient checkpointing, a finished run's weights or starting model loaded back, and every check
that can run before any weights are read. Method modules never load models themselves: what they need is
built here and passed in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import artifacts
from .errors import ConfigError, TunesmithError
from .models.anatomy import unwrap
from .models.dropout import swap_dropout
from .models.load import build_config, build_on_meta, check_architecture, load_model, resolve
from .objectives import OBJECTIVES
from .objectives.rewards import RewardConfig, import_function
from .tuning import TUNINGS


def precision_and_dtype(cfg) -> tuple[str, torch.dtype]:
    """accelerate's mixed-precision mode and the dtype of the base weights.

    CPUs here have no bf16 units (bf16 runs 20-30x slower), so auto means fp32 on CPU and bf16
    autocast on a GPU that supports it; a frozen base (a tuning that does not train the base weights)
    can then also be stored in bf16.
    """
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    mode = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}.get(cfg.train.precision, "bf16" if gpu_bf16 else "no")
    if cfg.model.dtype != "auto":
        dtype = getattr(torch, cfg.model.dtype)
    elif gpu_bf16 and not TUNINGS[cfg.tuning.kind].TRAINS_BASE:
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    return mode, dtype


def load_base(cfg, head: str, model_kwargs: dict, dtype: torch.dtype, pad_token_id: int | None):
    """The base model as this run's tuning needs it loaded (e.g. 4-bit for qlora)."""
    tuning = TUNINGS[cfg.tuning.kind]
    extra = {}
    if hasattr(tuning, "load_kwargs"):
        config = build_config(cfg.model, model_kwargs, resolve(cfg.model.name))
        extra = tuning.load_kwargs(cfg.tuning, config, head, dtype)
    return load_model(cfg.model, head, model_kwargs, dtype, pad_token_id, extra=extra)


def load_adapter(cfg, weights: Path, head: str, model_kwargs: dict, pad_token_id: int | None = None):
    """The default reload of a peft run: its base, then the saved adapter on top (frozen, for inference)."""
    from peft import PeftModel  # heavy (it imports bitsandbytes): only when a peft run is loaded back
    base = load_base(cfg, head, model_kwargs, torch.float32, pad_token_id)
    return PeftModel.from_pretrained(base, weights)


def check_before_loading(cfg, model_kwargs: dict) -> None:
    """Everything about the tuning that can be wrong, found before any weights are read: the tuning's own
    check on the model's config, then the tuning applied to the model built on the meta device (which
    catches target names that match nothing, layer ranges out of bounds, ...)."""
    objective, tuning = OBJECTIVES[cfg.objective.kind], TUNINGS[cfg.tuning.kind]
    head = objective.HEAD
    if head not in tuning.HEADS:
        able = [kind for kind, t in TUNINGS.items() if head in t.HEADS]
        raise ConfigError(f"objective {cfg.objective.kind} trains with tuning {' or '.join(able)}, not "
                          f"{cfg.tuning.kind!r} (tuning {cfg.tuning.kind} cannot train a {head} head)",
                          where="tuning.kind", hint=f"use tuning.kind={able[0]}" if able else None)
    resolved = resolve(cfg.model.name)
    config = build_config(cfg.model, model_kwargs, resolved)
    check_architecture(cfg.model, config, head, cfg.data.max_length)
    if hasattr(tuning, "check_model"):
        tuning.check_model(cfg.tuning, config, head)
    if hasattr(objective, "check_model"):
        objective.check_model(cfg.objective, config)
    for _, value in cfg.objective:
        if isinstance(value, RewardConfig):  # an RL objective's reward: its run must be finished
            check_source(value)
    if hasattr(tuning, "load_kwargs") and resolved.startswith("arch:"):
        raise ConfigError(f"tuning {cfg.tuning.kind!r} quantizes pretrained weights, and {cfg.model.name} has none "
                          "(an arch: model is random)", where="model.name",
                          hint="use arch: models with `tunesmith plan`, or train from a model folder or sample")
    model = build_on_meta(cfg.model, head, model_kwargs)
    if cfg.train.gradient_checkpointing:
        _checkpointable(model)
    with torch.device("meta"):
        tuning.apply(model, cfg.tuning, head)


def apply_tuning(model, tuning, cfg, head: str, tokenizer, say):
    """`tuning` (a tuning module) applied to `model` as `cfg.tuning` says, then what makes the tuned model cheaper to
    train with the same numbers: the CPU dropout (models/dropout.py) and the tuning's own `speed_up` (LoRA's fused
    products, freeze's feature cache), whose line goes to `say`."""
    model = tuning.apply(model, cfg.tuning, head, tokenizer)
    swap_dropout(model)
    if hasattr(tuning, "speed_up") and (said := tuning.speed_up(cfg.tuning, model)):
        say(said)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute block activations in backward (`train.gradient_checkpointing`). Non-reentrant checkpoints
    need no input that requires grad (frozen embeddings are fine) and replay dropout's random state, so the
    gradients equal those without checkpointing."""
    _checkpointable(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _checkpointable(model):
    """The transformers model inside (a peft wrapper's base), if it supports gradient checkpointing."""
    inner = unwrap(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(inner).__name__} does not support gradient checkpointing",
                          where="train.gradient_checkpointing", hint="set it to false")
    return inner


def starting_model(cfg, run_dir: Path, pad_token_id: int | None):
    """A finished run's base model, loaded as the run loaded it (in fp32): the reference of an objective that
    compares against the start, for a tuning that trained the base weights."""
    if cfg.model.name.startswith("arch:"):
        raise TunesmithError(f"{run_dir} started from a random {cfg.model.name} model, which cannot be rebuilt as "
                             "its reference", where="model.name")
    kwargs = artifacts.read_json(Path(run_dir) / artifacts.MANIFEST)["model_kwargs"]
    head = OBJECTIVES[cfg.objective.kind].HEAD
    return load_model(cfg.model, head, kwargs, torch.float32, pad_token_id).eval()


def check_source(cfg) -> None:
    """Before any weights are read: the function imports; a run folder exists and is finished."""
    if cfg.function is not None:
        import_function(cfg.function)
        return
    if cfg.run.startswith("stage:"):
        return  # a staged config resolves it to the earlier stage's run folder before this is called
    path = Path(cfg.run)
    if not (path / artifacts.CONFIG).exists():
        raise ConfigError(f"{path} is not a run folder (no {artifacts.CONFIG})", where="objective.reward.run",
                          hint="train the reward model or classifier first, or fix the path")
    if not artifacts.is_finished(path):
        raise ConfigError(f"{path} is not a finished run (no {artifacts.SUMMARY})", where="objective.reward.run",
                          hint="finish it with `tunesmith train CONFIG --resume`")
