"""Prompt tuning (Lester et al., 2021) through peft: trained embeddings of virtual tokens put before the input.

Only the virtual tokens' embeddings train (tokens x hidden values). They start as the embeddings of words:
sampled from the vocabulary, or of a text describing the task (`init: text`), which Lester et al. found to
train faster and better than random vectors. Not mergeable: the prompt is extra input, not a weight update.

A causal or masked LM returns logits for the virtual tokens too; this module drops them, so a tuned
model's logits line up with its input_ids like any other model's. Decoder-only classifiers cannot be
prompt-tuned: peft passes embeddings instead of token ids, and transformers then cannot find the last
real token to classify from and reads whatever sits at the end of the padded row.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..axes import Change
from ..errors import ConfigError
from ..models.load import is_decoder_only
from ..schema import Section
from .common import check_head, head_to_train, is_meta, wrap

MERGEABLE = False
TRAINS_BASE = False
HEADS = frozenset({"sequence-classification", "causal-lm"})  # not masked-lm: a random MLM head would stay frozen
LR_RANGE = (1e-3, 3e-1)  # Lester et al. train the soft prompt at 0.3


class Config(Section):
    kind: Literal["prompt"] = "prompt"
    """Trained virtual-token embeddings before the input (soft prompt); the base stays frozen."""
    tokens: int = Field(20, ge=1)
    """Number of virtual tokens."""
    init: Literal["vocab", "text", "random"] = "vocab"
    """Starting embeddings: of tokens sampled from the vocabulary, of `init_text` (repeated or cut to length),
    or random vectors."""
    init_text: Optional[str] = None
    """A text describing the task, e.g. "Classify the sentiment of this review:" (with init: text)."""
    train_head: bool = True
    """Train the new classification head in full (it starts random); a pretrained LM head stays frozen."""

    @model_validator(mode="after")
    def _text_with_text(self):
        if (self.init == "text") != bool(self.init_text):
            raise ValueError("tuning.init_text is needed with tuning.init: text, and only then")
        return self


def check_model(cfg: Config, model_config, head: str) -> None:
    check_head(head, cfg.train_head)
    if head == "sequence-classification" and is_decoder_only(model_config):
        raise ConfigError(f"prompt tuning cannot train a {model_config.model_type} classifier: the classifier reads "
                          "the last real token, which transformers finds from token ids, and peft passes only "
                          "embeddings, so padded rows would be read at a padding position", where="tuning.kind",
                          hint="use prefix tuning, lora or ia3 to classify with a decoder model, or prompt tuning "
                               "with an encoder (BERT-style) model")


def advice(cfg: Config, symptom: str, head: str) -> list[Change]:
    """Fewer virtual tokens for overfitting or forgetting, more for underfitting."""
    if symptom != "underfit":
        return [Change("tuning.tokens", cfg.tokens, cfg.tokens // 2)] if cfg.tokens > 1 else []
    more = [Change("tuning.tokens", cfg.tokens, cfg.tokens * 2)]
    return more


def apply(model, cfg: Config, head: str, tokenizer=None):
    from peft import PromptTuningConfig

    init = {"vocab": "SAMPLE_VOCAB", "text": "RANDOM", "random": "RANDOM"}[cfg.init]
    peft_cfg = PromptTuningConfig(num_virtual_tokens=cfg.tokens, prompt_tuning_init=init,
                                  modules_to_save=head_to_train(model, head, cfg.train_head))
    model = wrap(model, peft_cfg, head)
    if cfg.init == "text" and not is_meta(model):
        _init_from_text(model, cfg, tokenizer)
    return _aligned(model)


def _init_from_text(model, cfg: Config, tokenizer) -> None:
    import torch

    if tokenizer is None:
        raise ConfigError("init: text needs the tokenizer", where="tuning.init")
    ids = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("init_text has no tokens", where="tuning.init_text")
    ids = (ids * -(-cfg.tokens // len(ids)))[:cfg.tokens]
    embedding = model.prompt_encoder[model.active_adapter].embedding
    with torch.no_grad():
        words = model.word_embeddings(torch.tensor(ids, device=embedding.weight.device))
        embedding.weight.copy_(words.to(embedding.weight.dtype))


def _drop_virtual_logits(module, args, kwargs, output):
    n = module.active_peft_config.num_virtual_tokens
    ids = kwargs.get("input_ids", args[0] if args else None)
    logits = getattr(output, "logits", None)
    if ids is not None and logits is not None and logits.dim() == 3 and logits.shape[1] == ids.shape[1] + n:
        output.logits = logits[:, n:]
    return output


def _aligned(model):
    model.register_forward_hook(_drop_virtual_logits, with_kwargs=True)
    return model


def added_positions(cfg: Config) -> int:
    return cfg.tokens


def load(cfg: Config, weights, head: str, base):
    """The saved virtual tokens on `base` (loaded by the caller), logits lined up again."""
    from peft import PeftModel

    return _aligned(PeftModel.from_pretrained(base, weights))
