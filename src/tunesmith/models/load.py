"""Find and load the base model and its tokenizer.

A model is named as `sample:<name>` (pulled into the cache on first use), a local folder, a hub id
(needs the network; offline it fails within seconds), or `arch:<model_type>` (an untrained model
built from the architecture's default config, for planning and tests).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import ModelError

OFFLINE_HINT = ("use a packaged sample instead: sample:minilm-l6 (encoder) or sample:smollm2-135m-instruct "
                "(chat LM); `tunesmith pull --list` shows all samples")


def head_class(head: str):
    import transformers

    classes = {
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
    }
    return classes[head]


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def resolve(name: str, what: str = "model") -> str:
    """A loadable path or hub id for `name`; pulls samples; fails fast when a hub id cannot be reached."""
    if name.startswith("sample:"):
        from ..samples import pull

        return str(pull(name[len("sample:"):], kind="model"))
    if name.startswith("arch:"):
        return name
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and what == "model":
            raise ModelError(f"{path} has no config.json; it is not a transformers model folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{what} folder not found: {name}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if _hub_cached(name):
        return name
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        raise ModelError(f"{what} {name!r} is not a local folder and {why}", hint=OFFLINE_HINT)
    return name


@contextmanager
def quiet_transformers():
    """Silence the load report (e.g. 'newly initialized: classifier': a new head is expected here)
    and the per-file progress bars of loading and saving."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def build_config(model_cfg, model_kwargs: dict, resolved: str):
    from transformers import AutoConfig

    kwargs = {**model_cfg.config, **model_kwargs}
    try:
        if resolved.startswith("arch:"):
            return AutoConfig.for_model(resolved[len("arch:"):], **kwargs)
        return AutoConfig.from_pretrained(resolved, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    except ValueError as e:
        hint = ("set model.trust_remote_code: true in the config, or pass --trust-remote-code, if you trust it"
                if "trust_remote_code" in str(e) else None)
        raise ModelError(f"cannot build the config of {model_cfg.name!r}: {e}", where="model", hint=hint) from None
    except OSError as e:
        raise ModelError(f"cannot read the model {model_cfg.name!r}: {e}", where="model.name",
                         hint=OFFLINE_HINT) from None


def load_model(model_cfg, head: str, model_kwargs: dict, dtype: torch.dtype, pad_token_id: int | None = None,
               extra: dict | None = None):
    """The base model with the objective's head, weights in `dtype` (random init for `arch:`).

    `extra`: further `from_pretrained` arguments a tuning asks for, e.g. qlora's `quantization_config`.
    """
    extra = extra or {}
    resolved = resolve(model_cfg.name)
    config = build_config(model_cfg, model_kwargs, resolved)
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id  # classifiers on decoder models find the last token by it
    cls = head_class(head)
    with quiet_transformers():
        if resolved.startswith("arch:"):
            if extra:
                raise ModelError(f"{model_cfg.name} is a random architecture; it cannot be loaded with "
                                 f"{', '.join(extra)}", where="model.name")
            return cls.from_config(config, dtype=dtype)
        try:
            model = cls.from_pretrained(resolved, config=config, dtype=dtype,
                                        trust_remote_code=model_cfg.trust_remote_code, **extra)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load {model_cfg.name!r} as a {head} model: {e}", where="model.name") from None
    if "quantization_config" in extra:
        from .quantize import keep_compute_dtype, release_checkpoint

        keep_compute_dtype(model)
        release_checkpoint(model)
    return model


def is_decoder_only(config) -> bool:
    """A causal LM with no masked-LM form (GPT, Llama, ...): its sequence classifier reads the last token."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    kind = type(config)
    return kind in AutoModelForCausalLM._model_mapping and kind not in AutoModelForMaskedLM._model_mapping


def build_on_meta(model_cfg, head: str, model_kwargs: dict):
    """The model's structure with no weights allocated (for planning): reads only its config."""
    resolved = resolve(model_cfg.name)
    config = build_config(model_cfg, model_kwargs, resolved)
    with torch.device("meta"), quiet_transformers():
        return head_class(head).from_config(config, trust_remote_code=model_cfg.trust_remote_code)


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    source = model_cfg.tokenizer or model_cfg.name
    if source.startswith("arch:"):
        raise ModelError(f"{model_cfg.name} is an untrained architecture with no tokenizer",
                         where="model.tokenizer", hint="set model.tokenizer to a folder or sample holding one")
    resolved = resolve(source, what="tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {source!r}: {e}", where="model.tokenizer") from None
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padding is masked out, so any id works.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
