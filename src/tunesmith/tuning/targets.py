"""Which layers an adapter goes on: by names, a regular expression, `all-linear`, and a layer range.

Selection happens here, once, for every method that adapts named layers (lora, dora, qlora, ia3) and for
the bottleneck adapters' layer range. The result is the list of full module names, handed to peft as
is, so what trains is exactly what this module chose, and a name that matches nothing is an error
instead of a silently smaller adapter.
"""

from __future__ import annotations

import difflib
import re
from typing import Optional, Union

from torch import nn

from ..errors import ConfigError
from ..models.anatomy import block_index, blocks, head_modules

Targets = Union[list[str], str]
Layers = Optional[Union[list[int], str]]


def layer_indices(layers: Layers, n_layers: int, where: str = "tuning.layers") -> Optional[list[int]]:
    """The sorted block indices `layers` names, checked against the model's `n_layers` blocks."""
    if layers is None:
        return None
    if isinstance(layers, str):
        m = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", layers)
        if not m:
            raise ConfigError(f"layer range {layers!r} is not a slice like '0:4' or '-4:'", where=where,
                              hint="write a list of block indices, e.g. [0, 1, 2], or a slice start:stop")
        start, stop = (int(g) if g is not None else None for g in m.groups())
        chosen = list(range(n_layers))[slice(start, stop)]
    else:
        bad = [i for i in layers if not -n_layers <= i < n_layers]
        if bad:
            raise ConfigError(f"block index {bad[0]} is out of range: the model has {n_layers} blocks", where=where,
                              hint=f"use indices from 0 to {n_layers - 1} (or -{n_layers} to -1)")
        chosen = sorted({i % n_layers for i in layers})
    if not chosen:
        raise ConfigError(f"layer range {layers!r} selects no block of the {n_layers}", where=where)
    return chosen


def is_linear(module: nn.Module) -> bool:
    # GPT-2 style models use transformers' Conv1D, a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def body_linears(model: nn.Module) -> list[str]:
    """Full names of the linear layers of the body: the task head and LM head are left out."""
    heads = head_modules(model)
    return [name for name, m in model.named_modules()
            if is_linear(m) and not any(name == h or name.startswith(h + ".") for h in heads)]


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def select(model: nn.Module, targets: Targets, layers: Layers = None, where: str = "tuning.targets") -> list[str]:
    """Full names of the modules to adapt. Every name in a list must match something."""
    names = [n for n, _ in model.named_modules() if n]
    linears = body_linears(model)
    if targets == "all-linear":
        chosen = linears
    elif isinstance(targets, str) and targets.startswith("re:"):
        try:
            pattern = re.compile(targets[3:])
        except re.error as e:
            raise ConfigError(f"{targets!r} is not a valid regular expression: {e}", where=where) from None
        chosen = [n for n in names if pattern.fullmatch(n)]
        if not chosen:
            raise ConfigError(f"the pattern {targets[3:]!r} matches no module (it must match a whole module name, "
                              f"e.g. {linears[0] if linears else names[-1]!r})", where=where,
                              hint="add .* around a fragment, e.g. 're:.*attn.*'")
    else:
        wanted = [targets] if isinstance(targets, str) else list(targets)
        if not wanted:
            raise ConfigError("no target layers given", where=where, hint="e.g. [q_proj, v_proj] or all-linear")
        for key in wanted:
            if not any(_matches(n, key) for n in names):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
                close = difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=1)
                raise ConfigError(f"target {key!r} matches no module of this model; its linear layers are "
                                  f"{', '.join(leaves)}", where=where,
                                  hint=f"did you mean {close[0]!r}?" if close else "or use targets: all-linear")
        chosen = [n for n in names if any(_matches(n, key) for key in wanted)]
    if layers is not None:
        prefix, stack = blocks(model)
        keep = set(layer_indices(layers, len(stack)))
        chosen = [n for n in chosen if block_index(n, prefix) in keep]
        if not chosen:
            raise ConfigError(f"no target layer lies inside blocks {sorted(keep)}", where=where)
    return chosen
