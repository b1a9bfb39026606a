"""Find and load the base model and its tokenizer.

A model is named as `sample:<name>` (pulled into the cache on first use), a local folder, a hub id
(needs the network; offline it fails within seconds), or `arch:<model_type>` (an untrained model
built from the architecture's default config, for planning and tests).
"""

from __future__ import annotations

import json
import os
import pickle
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
        "encoder": transformers.AutoModel,
    }
    return classes[head]


def bare(model, head: str):
    """An `encoder` is the body alone: its pooler (BERT's dense + tanh over [CLS], which no embedding pooling
    reads) is dropped, so nothing untrained is saved with it; `AutoModel` reloads it as a plain encoder."""
    if head == "encoder" and getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


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
        if what == "model":
            check_model_folder(path)
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt",
                   "vocab.json")


def check_model_folder(path: Path) -> None:
    """A local model folder as transformers will read it: config.json a JSON object, and every safetensors
    file's header readable and consistent with its size (a truncated or garbage file is caught here, before
    any run folder exists, instead of deep inside loading)."""
    if not path.is_dir():
        raise ModelError(f"{path} is a file; a model is a folder with config.json and weights", where="model.name")
    config = path / "config.json"
    if not config.exists():
        raise ModelError(f"{path} has no config.json; it is not a transformers model folder", where="model.name")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelError(f"config.json is not readable JSON ({type(e).__name__})", where=str(config)) from None
    if not isinstance(data, dict):
        raise ModelError(f"config.json holds a {type(data).__name__}, not an object of settings", where=str(config))
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)


def check_safetensors(path: Path) -> None:
    """The safetensors header (8-byte length, JSON table of tensors) is readable and the file holds every byte
    the table points to."""
    size = path.stat().st_size
    problem = None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > size - 8:
                problem = "empty or truncated" if len(head) < 8 else f"its header length ({n} bytes) does not fit the file"
            else:
                table = json.loads(f.read(n))
                ends = [v["data_offsets"][1] for k, v in table.items() if k != "__metadata__"]
                need = 8 + n + max(ends, default=0)
                if need != size:
                    problem = f"truncated or padded: its tensors take {need} bytes, the file has {size}"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        problem = f"its header is not valid ({type(e).__name__})"
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    if problem:
        raise ModelError(f"damaged weights file: {problem}", where=str(path),
                         hint="copy or download the model again")


def check_architecture(model_cfg, config, head: str, max_length: int | None) -> None:
    """The objective's head exists for this architecture (no clm on an encoder), and examples fit the model's
    positions."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    kind, name = type(config), model_cfg.name
    model_type = getattr(config, "model_type", kind.__name__)
    auto = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification",
            "masked-lm": "AutoModelForMaskedLM", "encoder": "AutoModel"}[head]
    own_code = auto in (getattr(config, "auto_map", None) or {})  # a model with its own classes says what it has
    if head == "causal-lm" and not own_code and not is_decoder_only(config):
        raise ModelError(f"{name} is a {model_type} model, not a decoder-only causal language model, so it cannot "
                         "generate or be trained left to right", where="objective.kind",
                         hint="use a causal LM (e.g. sample:smollm2-135m-instruct), or objective mlm / classify")
    mapping = {"sequence-classification": AutoModelForSequenceClassification,
               "masked-lm": AutoModelForMaskedLM}.get(head)
    if mapping is not None and not own_code and kind not in mapping._model_mapping:
        raise ModelError(f"transformers has no {head} model for the {model_type} architecture of {name}",
                         where="objective.kind")
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                      if isinstance(getattr(config, k, None), int)), None)
    if max_length is not None and positions is not None and max_length > positions:
        raise ModelError(f"{max_length} tokens per example, but {name} has {positions} positions",
                         where="data.max_length", hint=f"set data.max_length to {positions} or less")


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
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        hint = ("set model.trust_remote_code: true in the config, or pass --trust-remote-code, if you trust it"
                if "trust_remote_code" in str(e) else None)
        raise ModelError(f"cannot build the config of {model_cfg.name!r}: {type(e).__name__}: {str(e)[:300]}",
                         where="model", hint=hint) from None
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
            return bare(cls.from_config(config, dtype=dtype), head)
        try:
            model = cls.from_pretrained(resolved, config=config, dtype=dtype,
                                        trust_remote_code=model_cfg.trust_remote_code, **extra)
        except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise load_error(model_cfg.name, head, e) from None
    if "quantization_config" in extra:
        from .quantize import keep_compute_dtype, release_checkpoint

        keep_compute_dtype(model)
        release_checkpoint(model)
    return bare(model, head)


def load_error(name: str, head: str, e: BaseException) -> ModelError:
    """A failure to read a model's weights as a located error: a pickle torch refused (weights_only) is named
    as such, and never with the advice to turn that protection off."""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return ModelError(f"{name}'s weights are a pickle holding more than tensors; tunesmith does not run code "
                          "from weights files, so it refused to load them", where="model.name",
                          hint="use a model saved as safetensors (model.save_pretrained(..., safe_serialization=True))")
    return ModelError(f"cannot load {name!r} as a {head} model: {type(e).__name__}: {str(e)[:300]}",
                      where="model.name")


def is_decoder_only(config) -> bool:
    """A causal LM with no masked-LM form (GPT, Llama, ...): its sequence classifier reads the last token."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    kind = type(config)
    return kind in AutoModelForCausalLM._model_mapping and kind not in AutoModelForMaskedLM._model_mapping


def build_on_meta(model_cfg, head: str, model_kwargs: dict):
    """The model's structure with no weights allocated (for planning): reads only its config."""
    resolved = resolve(model_cfg.name)
    config = build_config(model_cfg, model_kwargs, resolved)
    try:
        with torch.device("meta"), quiet_transformers():
            return bare(head_class(head).from_config(config, trust_remote_code=model_cfg.trust_remote_code), head)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, ZeroDivisionError, IndexError) as e:
        raise ModelError(f"its config describes a model that cannot be built ({type(e).__name__}: {str(e)[:200]})",
                         where=f"{model_cfg.name} (config.json)", hint="check the sizes in config.json") from None


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    source = model_cfg.tokenizer or model_cfg.name
    if source.startswith("arch:"):
        raise ModelError(f"{model_cfg.name} is an untrained architecture with no tokenizer",
                         where="model.tokenizer", hint="set model.tokenizer to a folder or sample holding one")
    # the model folder's own problems (config.json, damaged weights) first, before its tokenizer's
    resolved = resolve(source, what="tokenizer" if model_cfg.tokenizer else "model")
    folder = Path(resolved)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})",
                         where="model.tokenizer" if model_cfg.tokenizer else "model.name",
                         hint="copy the tokenizer into the model folder, or set model.tokenizer to a folder with one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer file fails in many library-specific ways
        where = "model.tokenizer" if model_cfg.tokenizer else "model.name"
        raise ModelError(f"cannot load a tokenizer from {source!r}: {type(e).__name__}: {str(e)[:300]}",
                         where=where, hint="its tokenizer files may be damaged: copy them again") from None
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padding is masked out, so any id works.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer
