"""Load what a run produced (or a plain model folder, or a `sample:` model) back for evaluation,
prediction and generation."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .build import load_adapter, load_base
from .config import DataConfig, GenerateConfig, RunConfig
from .errors import TunesmithError
from .objectives import FOR_PLAIN_MODEL, OBJECTIVES
from .tuning import TUNINGS


@dataclass
class Trained:
    model: torch.nn.Module
    tokenizer: object
    objective: object
    """The objective module (classify, sft, ...)."""
    obj_cfg: object
    data_cfg: DataConfig
    cfg: RunConfig | None
    """The run's resolved config; None for a plain model folder."""
    chat: object = None
    """The ChatFormat that prompts this model as it was trained (causal LMs, reward models), else None."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """The run's generation settings (the defaults for a plain model)."""
    name: str = ""


def _head_of(model_dir: Path) -> str:
    """The head a saved model has, from the architecture named in its config.json."""
    arch = " ".join(json.loads((model_dir / "config.json").read_text()).get("architectures") or [])
    if "CausalLM" in arch or "LMHeadModel" in arch:
        return "causal-lm"
    if "MaskedLM" in arch:
        return "masked-lm"
    if arch and all(a.endswith("Model") for a in arch.split()):  # BertModel, ...: the bare body
        return "encoder"
    return "sequence-classification"


def _chat_format(tokenizer, objective, obj_cfg, templated: bool):
    from .data.templates import ChatFormat

    if objective.HEAD != "causal-lm" and not getattr(objective, "CHAT", False):
        return None
    if templated and tokenizer.chat_template:  # the tuned tokenizer carries the template it was trained with
        return ChatFormat.build(tokenizer, "tokenizer", getattr(obj_cfg, "system", None))
    return ChatFormat(tokenizer, None)


def load_weights(cfg: RunConfig, weights: Path, model_kwargs: dict, pad_token_id: int | None = None):
    """The trained model of a run from its weights folder: the tuning's own loader on the base if it has one, else
    the base (loaded as the tuning needs, e.g. 4-bit) with the peft adapter, else the full weights."""
    from .models.load import head_class, quiet_transformers

    head, tuning = OBJECTIVES[cfg.objective.kind].HEAD, TUNINGS[cfg.tuning.kind]
    if hasattr(tuning, "load"):
        return tuning.load(cfg.tuning, weights, head, load_base(cfg, head, model_kwargs, torch.float32, pad_token_id))
    if (weights / "adapter_config.json").exists():
        return load_adapter(cfg, weights, head, model_kwargs, pad_token_id)
    with quiet_transformers():
        return head_class(head).from_pretrained(weights, dtype=torch.float32,
                                                trust_remote_code=cfg.model.trust_remote_code)


def _guarded_load(where: Path, load):
    """Run a library loader over a folder of weights or tokenizer files; its failures on damaged files become
    a located error."""
    from .errors import TunesmithError as UserError
    from .models.load import load_error

    try:
        return load()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged files fail in many library-specific ways; all are bad input
        if isinstance(e, ValueError) and "trust_remote_code" in str(e):
            raise TunesmithError(f"{where} ships its own Python code, which runs only when you allow it",
                                 hint="pass --trust-remote-code if you trust this model") from None
        raise TunesmithError(load_error(str(where), "saved", e).message, where=str(where),
                             hint="the folder may be damaged: train or copy it again") from None


def load_trained(path: str | Path, head: str | None = None, trust_remote_code: bool = False) -> Trained:
    """A finished run folder, a model folder or `sample:<model>`; `head` picks the head of a plain model
    (default: the one in its config.json).

    Python code shipped with a model runs only when the caller passes `trust_remote_code` (the command line of
    this invocation): a run folder is often someone else's, so its config.yaml never turns it on."""
    from transformers import AutoTokenizer

    from . import artifacts
    from .models.load import check_model_folder, head_class, quiet_transformers, resolve

    name = str(path)
    path = Path(path)
    if (path / artifacts.CONFIG).exists():
        if not artifacts.is_finished(path):
            raise TunesmithError(f"{path} is not a finished run (no {artifacts.SUMMARY})",
                                 hint="finish it with `tunesmith train CONFIG --resume`")
        cfg, kwargs, summary, weights = artifacts.read_finished(path)
        if cfg.model.trust_remote_code and not trust_remote_code:
            print(f"note: {path / artifacts.CONFIG} says model.trust_remote_code: true; a run folder cannot allow "
                  "a model's own code to run, so it is not: pass --trust-remote-code if you trust this model",
                  file=sys.stderr)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"trust_remote_code": trust_remote_code})})
        objective = OBJECTIVES[cfg.objective.kind]
        tokenizer = _guarded_load(weights, lambda: AutoTokenizer.from_pretrained(weights,
                                                                                 trust_remote_code=trust_remote_code))
        model = _guarded_load(weights, lambda: load_weights(cfg, weights, kwargs, tokenizer.pad_token_id))
        obj_cfg, data_cfg, generate = cfg.objective, cfg.data, cfg.eval.generate
        templated = bool((summary.get("chat") or {}).get("template"))
    else:
        folder = Path(resolve(name)) if name.startswith("sample:") else path
        if not (folder / "config.json").exists():
            raise TunesmithError(f"{path} is neither a run folder (config.yaml) nor a model folder (config.json)")
        check_model_folder(folder)
        cfg, head = None, head or _head_of(folder)
        objective = OBJECTIVES[FOR_PLAIN_MODEL[head]]
        tokenizer = _guarded_load(folder, lambda: AutoTokenizer.from_pretrained(
            folder, trust_remote_code=trust_remote_code))
        with quiet_transformers():
            model = _guarded_load(folder, lambda: head_class(head).from_pretrained(
                folder, dtype=torch.float32, trust_remote_code=trust_remote_code))
        obj_cfg, data_cfg, generate = objective.Config(), DataConfig(train=""), GenerateConfig()
        templated = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if hasattr(objective, "configure_from_model"):
        obj_cfg = objective.configure_from_model(obj_cfg, model)
    model.eval()
    chat = _chat_format(tokenizer, objective, obj_cfg, templated)
    return Trained(model, tokenizer, objective, obj_cfg, data_cfg, cfg, chat, generate, name)
