"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), our own implementation (peft has none).

An adapter is a small two-layer network on a sublayer's output y: y + W_up f(W_down y), where W_down maps
the hidden size h down to b = h / reduction_factor and W_up maps back, starting at zero so the model is
unchanged at step 0. Trainable per adapter: 2·h·b + b + h. Where they go in each block:

  houlsby   after the attention output projection and after the feed-forward output projection (2 per block)
  pfeiffer  after the feed-forward output projection only (1 per block: about as good, half the size)

Both sit on the sublayer's output before the residual addition (and before the layer norm of post-LN
models like BERT), where Houlsby et al. put them. The adapter is a child module of the projection it
follows, run by a forward hook, so the base model's own parameter names do not change.

Not mergeable: the non-linearity between W_down and W_up cannot be folded into a weight matrix, so the
run keeps the adapters apart from the base. They are saved as safetensors (adapter and head weights only,
`adapter/adapters.safetensors`) with a JSON description, and loaded back onto the same base model.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from ..axes import Change
from ..errors import ConfigError
from ..models.anatomy import blocks, head_parameters
from ..schema import Section
from . import targets as targeting
from .common import check_head

MERGEABLE = False
TRAINS_BASE = False
HEADS = frozenset({"sequence-classification", "causal-lm", "encoder"})  # not masked-lm: a random MLM head would stay frozen
LR_RANGE = (1e-4, 1e-3)  # the bottleneck starts at zero, like LoRA
WEIGHTS, DESCRIPTION = "adapters.safetensors", "adapters.json"

# model_type -> (attention output projection, feed-forward output projection), relative to a block
SUBLAYERS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite"),
                    ("self_attn.o_proj", "mlp.down_proj")),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), ("attention.output.dense", "output.dense")),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "opt": ("self_attn.out_proj", "fc2"),
}

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Config(Section):
    kind: Literal["adapter"] = "adapter"
    """Bottleneck adapters after the sublayers of each block; the base stays frozen."""
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    """houlsby: after attention and after the feed-forward layer; pfeiffer: after the feed-forward layer only."""
    reduction_factor: int = Field(16, ge=1)
    """Hidden size / bottleneck size (16 on a 768-wide model: a 48-wide bottleneck)."""
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """Non-linearity inside the bottleneck."""
    layers: targeting.Layers = None
    """Only put adapters in these transformer blocks (block indices or a slice `start:stop`); null: all."""
    attention_output: Optional[str] = None
    """The attention output projection, relative to a block (e.g. `self_attn.o_proj`); null: known for
    llama, mistral, qwen2/3, gemma, bert, roberta, electra, distilbert, gpt2 and opt models."""
    ffn_output: Optional[str] = None
    """The feed-forward output projection, relative to a block (e.g. `mlp.down_proj`); null: as above."""
    train_head: bool = True
    """Train the new classification head in full (it starts random); a pretrained LM head stays frozen."""


class Bottleneck(nn.Module):
    """y -> y + up(f(down(y))); `up` starts at zero."""

    NOT_MERGEABLE = ("bottleneck adapters have a non-linearity between their two layers, so they cannot be folded "
                     "into a weight matrix")
    """Why `export --format merged` refuses a model holding this module (read by export/merge.py)."""

    def __init__(self, hidden: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True
        """False inside `disabled(model)`: the sublayer's output passes unchanged."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        # the adapter keeps its own dtype (fp32) under a bf16 base
        z = self.up(self.act(self.down(y.to(self.down.weight.dtype))))
        return y + z.to(y.dtype)


def _run_adapter(module, args, output):
    return module.adapter(output) if module.adapter.enabled else output


@contextmanager
def disabled(model):
    """Run the model as its base inside this block: every adapter passes its input through (what a DPO
    reference needs, with no second copy of the weights; like peft's `disable_adapter`)."""
    adapters = [m for m in model.modules() if isinstance(m, Bottleneck)]
    for m in adapters:
        m.enabled = False
    try:
        yield model
    finally:
        for m in adapters:
            m.enabled = True


def sublayers(cfg: Config, model_type: str) -> list[str]:
    """The block-relative names adapters follow, for this placement and architecture."""
    known = SUBLAYERS.get(model_type, (None, None))
    attention, ffn = cfg.attention_output or known[0], cfg.ffn_output or known[1]
    wanted = [attention, ffn] if cfg.placement == "houlsby" else [ffn]
    if None in wanted:
        missing = "ffn_output" if ffn is None else "attention_output"
        raise ConfigError(f"where the sublayers of a {model_type!r} block end is not known", where=f"tuning.{missing}",
                          hint="name the output projections relative to a block, e.g. attention_output: "
                               "self_attn.o_proj and ffn_output: mlp.down_proj")
    return wanted


def _hidden(config) -> int:
    return getattr(config, "hidden_size", None) or getattr(config, "dim", None) or getattr(config, "n_embd")


def check_model(cfg: Config, model_config, head: str) -> None:
    check_head(head, cfg.train_head)
    sublayers(cfg, model_config.model_type)
    if cfg.reduction_factor > _hidden(model_config):
        raise ConfigError(f"reduction_factor {cfg.reduction_factor} is larger than the hidden size "
                          f"{_hidden(model_config)}", where="tuning.reduction_factor")
    n = getattr(model_config, "num_hidden_layers", None)
    if cfg.layers is not None and n:
        targeting.layer_indices(cfg.layers, n)


def advice(cfg: Config, symptom: str, head: str) -> list[Change]:
    """A narrower bottleneck (a larger reduction factor) for overfitting or forgetting, a wider one for
    underfitting."""
    if symptom != "underfit":
        return [Change("tuning.reduction_factor", cfg.reduction_factor, cfg.reduction_factor * 2)]
    if cfg.reduction_factor == 1:
        return []
    return [Change("tuning.reduction_factor", cfg.reduction_factor, max(1, cfg.reduction_factor // 2))]


def apply(model, cfg: Config, head: str, tokenizer=None):
    for p in model.parameters():
        p.requires_grad_(False)
    _, stack = blocks(model)
    chosen = targeting.layer_indices(cfg.layers, len(stack)) or range(len(stack))
    hidden = _hidden(model.config)
    for i in chosen:
        for name in sublayers(cfg, model.config.model_type):
            try:
                module = stack[i].get_submodule(name)
            except AttributeError:
                raise ConfigError(f"block {i} of {type(model).__name__} has no module {name!r}",
                                  where="tuning.ffn_output" if name == cfg.ffn_output else "tuning.attention_output",
                                  hint="name a module of the block, e.g. mlp.down_proj") from None
            module.add_module("adapter", Bottleneck(hidden, max(1, hidden // cfg.reduction_factor), cfg.activation))
            module.register_forward_hook(_run_adapter)
    if cfg.train_head and head == "sequence-classification":
        for p in head_parameters(model):
            p.requires_grad_(True)
    # the same switch as a peft model's, so a DPO or PPO reference uses it without knowing this tuning
    model.disable_adapter = partial(disabled, model)
    return model


def save(run_dir: Path, model, tokenizer) -> str:
    """The trained tensors (adapters and head) as safetensors, and what they are, as JSON."""
    from safetensors.torch import save_file

    out = run_dir / "adapter"
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    adapters = {n: {"hidden": m.down.in_features, "bottleneck": m.down.out_features,
                    "activation": type(m.act).__name__} for n, m in model.named_modules() if isinstance(m, Bottleneck)}
    description = {"method": "bottleneck adapters (tunesmith)", "mergeable": False, "adapters": adapters,
                   "other_trained": sorted(n for n in tensors if ".adapter." not in n)}
    (out / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(out)
    return out.name


def load(cfg: Config, weights: Path, head: str, base):
    """The same adapters on `base` (loaded by the caller), and the saved tensors in them."""
    from safetensors.torch import load_file

    model = apply(base, cfg, head)
    saved = load_file(weights / WEIGHTS)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        odd = sorted(set(saved) ^ expected)[0]
        raise ConfigError(f"{weights / WEIGHTS} does not fit the adapters this config builds (first difference: "
                          f"{odd!r})", where="tuning", hint="the run's config.yaml must match the saved adapters")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    return model
