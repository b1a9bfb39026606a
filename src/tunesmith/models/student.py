"""A smaller student built from a teacher's own layers, as DistilBERT was initialised (Sanh et al., 2019).

The student is a copy of the teacher with only some of its transformer blocks: the embeddings, every module
outside the block stack (final norm, pooler) and the task head are the teacher's, unchanged; block j of the
student is the teacher's block `keep[j]`. Blocks are found by structure (models/anatomy.py), so any
architecture whose blocks form one ModuleList works; works on the meta device too (for `plan`).
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import ConfigError
from .anatomy import blocks


def layer_count(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if not n:
        raise ConfigError(f"{type(config).__name__} does not say how many blocks it has (num_hidden_layers)",
                          where="objective.distill.keep_layers", hint="name a student model instead (model:)")
    return n


def keep_blocks(teacher: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of `teacher` holding only its blocks `keep`, in that order; the teacher is left as it was."""
    student = copy.deepcopy(teacher)
    prefix, layers = blocks(student)
    kept = nn.ModuleList([layers[i] for i in keep])
    parent, _, attr = prefix.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, attr, kept)
    for j, block in enumerate(kept):
        for module in block.modules():  # attention layers index their KV cache by their position in the stack
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j
    config = student.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == len(layers):
        config.layer_types = [config.layer_types[i] for i in keep]
    return student
