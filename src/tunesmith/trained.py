"""Load what a run produced (or a plain model folder) back for evaluation and prediction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .config import DataConfig, RunConfig
from .errors import TunesmithError
from .objectives import OBJECTIVES
from .tuning import TUNINGS


@dataclass
class Trained:
    model: torch.nn.Module
    tokenizer: object
    objective: object
    """The objective module (classify, ...)."""
    obj_cfg: object
    data_cfg: DataConfig
    cfg: RunConfig | None
    """The run's resolved config; None for a plain model folder."""


def load_weights(cfg: RunConfig, weights: Path, model_kwargs: dict, pad_token_id: int | None = None):
    """The trained model of a run from its weights folder: the tuning's own loader if it has one, else
    the base (loaded as the tuning needs, e.g. 4-bit) with the peft adapter, else the full weights."""
    from .models.load import head_class, quiet_transformers
    from .tuning.common import load_adapter

    head, tuning = OBJECTIVES[cfg.objective.kind].HEAD, TUNINGS[cfg.tuning.kind]
    if hasattr(tuning, "load"):
        return tuning.load(cfg, weights, head, model_kwargs, pad_token_id)
    if (weights / "adapter_config.json").exists():
        return load_adapter(cfg, weights, head, model_kwargs, pad_token_id)
    with quiet_transformers():
        return head_class(head).from_pretrained(weights, dtype=torch.float32)


def load_trained(path: str | Path) -> Trained:
    from transformers import AutoTokenizer

    from . import artifacts
    from .models.load import head_class, quiet_transformers

    path = Path(path)
    if (path / artifacts.CONFIG).exists():
        if not artifacts.is_finished(path):
            raise TunesmithError(f"{path} is not a finished run (no {artifacts.SUMMARY})",
                                 hint="finish it with `tunesmith train CONFIG --resume`")
        cfg = RunConfig.model_validate(yaml.safe_load((path / artifacts.CONFIG).read_text()))
        objective = OBJECTIVES[cfg.objective.kind]
        kwargs = artifacts.read_json(path / artifacts.MANIFEST)["model_kwargs"]
        weights = path / artifacts.read_json(path / artifacts.SUMMARY)["weights"]
        tokenizer = AutoTokenizer.from_pretrained(weights)
        model = load_weights(cfg, weights, kwargs, tokenizer.pad_token_id)
        obj_cfg, data_cfg = cfg.objective, cfg.data
    elif (path / "config.json").exists():
        cfg, objective = None, OBJECTIVES["classify"]
        tokenizer = AutoTokenizer.from_pretrained(path)
        with quiet_transformers():
            model = head_class(objective.HEAD).from_pretrained(path, dtype=torch.float32)
        obj_cfg, data_cfg = objective.Config(), DataConfig(train="")
    else:
        raise TunesmithError(f"{path} is neither a run folder (config.yaml) nor a model folder (config.json)")
    if hasattr(objective, "configure_from_model"):
        obj_cfg = objective.configure_from_model(obj_cfg, model)
    model.eval()
    return Trained(model, tokenizer, objective, obj_cfg, data_cfg, cfg)
