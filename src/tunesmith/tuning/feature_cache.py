"""A frozen prefix's outputs, computed once per distinct example and looked up ever after.

When the embeddings and the first `cut` transformer blocks of a model train nothing, the hidden states
that leave block `cut - 1` depend on the example's tokens alone. `install` makes the model keep them:

- a hook on the body (`model.<base_model_prefix>`) reads each call's `input_ids` and `attention_mask`
  and keys every row by its real tokens (so examples are recognised across epochs, splits and batches
  without any index in the batch);
- the frozen blocks' `forward` is replaced, on the module instances, by one that either runs the block
  as before (some row of the batch was never seen: the last frozen block stores each row's output) or,
  when every row is known, skips the frozen blocks and hands the stored rows (padded to the batch) to the
  first trained block. Pad positions get zeros: attention masks them out, so no real token sees them.

The weights stay where they were (state dicts, checkpoints and saved runs are unchanged) and the frozen
blocks run in eval mode either way (see `stay_in_eval`), so a cached run trains to the same numbers as an
uncached one. A call the cache cannot key safely (no attention mask, left padding, extra inputs such as
`position_ids`, `past_key_values` or `inputs_embeds`, or hidden states asked for) runs the plain path and
stores nothing. A deep copy of the model (a reference model) gets an empty, switched-off cache.

On disk (`cache_features: disk`): the rows also persist between runs, in one safetensors file per frozen part,
named by a hash of the model's class and config, the cut, and every weight and buffer of the frozen part
(`frozen_key`), under `$TUNESMITH_HOME/feature-cache/`. A later run of the same frozen part (another sweep trial,
a rerun at another learning rate, more epochs) reads it at the start and computes only rows it has never seen;
the file is rewritten once, after training, when the run added rows. A file that cannot be read is ignored and
replaced. Rows are keyed by tokens, so any data set is served by the same file.
"""

from __future__ import annotations

import hashlib
import os
import types
from pathlib import Path

import torch
from torch import nn

# Inputs that leave the frozen part's output unchanged, or that the cache checks itself.
_KEYED = {"input_ids", "attention_mask"}
_HARMLESS = {"return_dict", "use_cache", "labels"}


class FeatureCache:
    """Hidden states at the cut, one [tokens, hidden] tensor per distinct example (its real tokens as the key)."""

    def __init__(self, enabled: bool = True, path: Path | None = None):
        self.enabled = enabled
        self.path = path
        """The file the rows persist in between runs (`cache_features: disk`), or None (memory only)."""
        self.loaded = 0
        """Rows read from `path` when the cache was installed."""
        self.rows: dict[tuple, torch.Tensor] = {}
        self.batch: tuple[list[tuple], torch.Tensor, tuple[int, int]] | None = None
        """The current call's (keys, lengths, (rows, width)), or None when this call runs the plain path."""
        self.lookup = False
        """True while every row of the current call is stored: the frozen blocks are skipped."""
        self.computed = 0
        """Rows the frozen blocks computed and stored (once per distinct example)."""
        self.looked_up = 0
        """Rows served from the cache."""
        self.ran = 0
        """Rows the frozen blocks ran on (the computed ones, and known rows in a batch with an unknown one)."""
        self.tuple_output = False
        """The blocks return (hidden, ...) rather than a tensor (seen when the first rows were stored)."""

    def __deepcopy__(self, memo):
        return FeatureCache(enabled=False)  # a copy may be changed; it runs the plain path

    def __len__(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())

    # between runs -------------------------------------------------------------------------------

    def load(self) -> int:
        """Read the rows of `path` (none when it is missing or unreadable: it is then rewritten); their count."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if self.path is None or not self.path.exists():
            return 0
        try:
            tensors = load_file(self.path)
            tokens, lengths, hidden = tensors["tokens"], tensors["lengths"], tensors["hidden"]
            self.tuple_output = bool(tensors["tuple_output"].item())
        except (SafetensorError, KeyError, OSError, RuntimeError):
            return 0
        for ids, states in zip(tokens.split(lengths.tolist()), hidden.split(lengths.tolist())):
            self.rows[tuple(ids.tolist())] = states
        self.loaded = len(self.rows)
        return self.loaded

    def save(self) -> bool:
        """Write every row to `path` when this run added some (written whole, then renamed into place)."""
        from safetensors.torch import save_file

        if self.path is None or len(self.rows) == self.loaded or not self.rows:
            return False
        keys = list(self.rows)
        tensors = {"tokens": torch.tensor([t for key in keys for t in key], dtype=torch.int64),
                   "lengths": torch.tensor([len(key) for key in keys], dtype=torch.int64),
                   "hidden": torch.cat([self.rows[key].cpu() for key in keys]).contiguous(),
                   "tuple_output": torch.tensor(int(self.tuple_output))}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        save_file(tensors, tmp)
        tmp.replace(self.path)
        self.loaded = len(keys)
        return True

    # hooks on the body --------------------------------------------------------------------------

    def begin(self, module, args, kwargs):
        self.batch, self.lookup = None, False
        if not self.enabled:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        others = [k for k, v in kwargs.items()
                  if k not in _KEYED | _HARMLESS and v is not None and v is not False]
        if ids is None or mask is None or others or any(a is not None for a in args[1:]) or ids.shape != mask.shape:
            return
        lengths = mask.sum(1)
        if not torch.equal(mask.bool(), torch.arange(mask.size(1), device=mask.device) < lengths[:, None]):
            return  # not right-padded: positions would differ from the stored rows'
        rows = ids.tolist()
        keys = [tuple(row[:n]) for row, n in zip(rows, lengths.tolist())]
        self.batch = (keys, lengths, tuple(ids.shape))
        self.lookup = all(k in self.rows for k in keys)

    def end(self, module, args, kwargs, output):
        self.batch, self.lookup = None, False

    # inside the frozen blocks -------------------------------------------------------------------

    def stored(self, hidden: torch.Tensor) -> torch.Tensor:
        """The stored rows of the current call, padded with zeros to `hidden`'s shape."""
        keys = self.batch[0]
        out = hidden.new_zeros(hidden.shape)
        for r, key in enumerate(keys):
            row = self.rows[key]
            out[r, :row.size(0)] = row.to(device=hidden.device, dtype=hidden.dtype)
        self.looked_up += len(keys)
        return out

    def store(self, hidden: torch.Tensor) -> None:
        keys, lengths, _ = self.batch
        self.ran += len(keys)
        for r, (key, n) in enumerate(zip(keys, lengths.tolist())):
            if key not in self.rows:
                self.rows[key] = hidden[r, :n].detach().clone()
                self.computed += 1


def _frozen_forward(self, hidden_states, *args, **kwargs):
    """A frozen block: skipped when the cache holds every row, else run as written (the last one storing)."""
    cache: FeatureCache = self._feature_cache
    usable = cache.batch is not None and tuple(hidden_states.shape[:2]) == cache.batch[2]
    if usable and cache.lookup:
        hidden = cache.stored(hidden_states) if self._feature_cache_last else hidden_states
        return (hidden,) if cache.tuple_output else hidden  # the structure the blocks returned when computed
    output = type(self).forward(self, hidden_states, *args, **kwargs)
    if usable and self._feature_cache_last:
        cache.tuple_output = not torch.is_tensor(output)
        cache.store(output if torch.is_tensor(output) else output[0])
    return output


def frozen_key(model: nn.Module, frozen: list[nn.Module]) -> str:
    """What the frozen part's outputs depend on, hashed: the model's class and config, how many modules are frozen,
    and every weight and buffer in them (so a changed checkpoint or dtype never reads another's rows)."""
    h = hashlib.sha256(f"{type(model).__name__}\n{model.config.to_json_string()}\n{len(frozen)}".encode())
    for module in frozen:
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def install(body: nn.Module, frozen: list[nn.Module], path: Path | None = None) -> FeatureCache:
    """Cache the output of the last of `frozen` (the body's first blocks, in order) keyed by each example's
    tokens; with `path`, the rows stored there by earlier runs are read first."""
    cache = FeatureCache(path=path)
    cache.load()
    body.register_forward_pre_hook(cache.begin, with_kwargs=True)
    body.register_forward_hook(cache.end, with_kwargs=True, always_call=True)
    for i, block in enumerate(frozen):
        block._feature_cache = cache
        block._feature_cache_last = i == len(frozen) - 1
        block.forward = types.MethodType(_frozen_forward, block)
    return cache


def stay_in_eval(module: nn.Module, args) -> None:
    """A forward pre-hook: the module runs in eval mode (no dropout) whatever mode the model is in."""
    if module.training:
        module.train(False)
