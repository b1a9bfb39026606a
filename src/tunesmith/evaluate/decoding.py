"""The decoding loop behind every generation: continuous batching over a KV cache.

`model.generate` runs a batch until its longest answer ends: rows that stopped early keep being computed
(as padding) and the batch cannot take new prompts until all of its rows are done. Here a batch is a set of
*slots*: a row leaves the batch (and its KV cache) as soon as it produces a stop token or reaches
`max_new_tokens`, and waiting prompts are prefilled and joined to the running batch in its place. Rows of
different lengths share one left-padded cache; padding columns that no row uses any more are cut off. Prompts
that start alike (a chat template's system prompt) run those tokens once and start every row's cache from them.

The tokens are those of `model.generate` on each prompt alone, with the same processors (repetition penalty
over the row's own prompt and answer, temperature, top-k as generate takes it, top-p): a
row's logits do not depend on the rows beside it, up to float rounding. Sampling draws each row from its own
generator seeded by (seed, prompt index), so a prompt's sample does not depend on the batch it ran in.

Models this loop cannot drive (PEFT prompt learning, which injects virtual tokens or its own cache; models
with sliding-window caches) go through `model.generate`, one batch at a time, by `plain_decode`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from ..models.anatomy import MASKABLE_ATTENTION, attention_implementation, unwrap
from ..models.packed_head import packed_output


def supports_fast_path(model) -> bool:
    """Whether `decode` can drive this model (else `plain_decode` runs it through model.generate)."""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and getattr(peft_cfg, "is_prompt_learning", False):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return set(layer_types) <= {"full_attention"}
    return not getattr(config, "sliding_window", None)


def processors(model, settings) -> LogitsProcessorList:
    """The logits processors model.generate applies with these settings, in its order."""
    out = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.do_sample:
        if settings.temperature != 1.0:
            out.append(TemperatureLogitsWarper(settings.temperature))
        top_k = _top_k(model)
        if top_k:
            out.append(TopKLogitsWarper(top_k))
        if settings.top_p < 1.0:
            out.append(TopPLogitsWarper(settings.top_p))
    return out


def _top_k(model) -> int | None:
    """The top-k model.generate samples with: the model's generation config's, else transformers' global default
    (50). Since transformers 5 an unset top_k is None in the config and the default is applied inside generate, so
    reading the config alone sampled from the whole vocabulary (PPO's rollouts then barely moved)."""
    top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
    if top_k is None:
        defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
        top_k = defaults().get("top_k") if defaults is not None else GenerationConfig().top_k
    return top_k


def _keeps_last_logits(model) -> bool:
    base = unwrap(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into spare room instead of concatenating.

    DynamicLayer copies a layer's whole cache at every token (torch.cat). Here keys and values are views of
    buffers with `headroom` spare positions: a token is written in place, and the buffers are copied only when
    full, or when `_Batch` has replaced the views (rows left or joined). The views are what attention reads, as
    DynamicLayer's tensors are. Measured against DynamicLayer in one process (SmolLM2-135M, 32 prompts, batch 8):
    x1.045 tokens/s, the same tokens (docs/performance.md)."""

    def __init__(self, headroom: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.headroom = max(1, headroom)
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None  # the buffers `keys`/`values` are views of
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # the views last handed out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        need = length + key_states.shape[-2]
        ours = self._views is not None and self.keys is self._views[0] and self.values is self._views[1]
        if not (ours and need <= self._room[0].shape[-2]):  # replaced by _Batch, or full: copy into new room
            self._room = tuple(new.new_empty((*new.shape[:-2], need + self.headroom, new.shape[-1]))
                               for new in (key_states, value_states))
            if length:
                self._room[0][..., :length, :] = self.keys
                self._room[1][..., :length, :] = self.values
        self._room[0][..., length:need, :] = key_states
        self._room[1][..., length:need, :] = value_states
        self.keys, self.values = self._views = (self._room[0][..., :need, :], self._room[1][..., :need, :])
        return self.keys, self.values


def _cache(headroom: int) -> DynamicCache:
    """A DynamicCache whose layers are `_GrowingLayer`s with `headroom` spare positions."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(_GrowingLayer, headroom=headroom)
    return cache


class _Batch:
    """The running rows: their prompt indices, token histories, attention mask and shared KV cache."""

    def __init__(self, rows: list[int], history: torch.Tensor, mask: torch.Tensor, cache: DynamicCache,
                 logits: torch.Tensor):
        self.rows, self.history, self.mask, self.cache, self.logits = rows, history, mask, cache, logits
        self.new: list[list[int]] = [[] for _ in rows]

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[k] for k in keep]
        self.new = [self.new[k] for k in keep]
        self.history, self.mask, self.logits = self.history[index], self.mask[index], self.logits[index]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        # Columns no remaining row attends to (padding) are cut, so attention stays as short as the rows.
        used = self.mask.bool().any(0)
        if not bool(used.all()):
            columns = used.nonzero().squeeze(1)
            self.mask = self.mask[:, columns]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., columns, :], layer.values[..., columns, :]

    def join(self, other: "_Batch") -> None:
        """Add `other`'s rows, left-padding the shorter cache (and history) to the longer one."""
        self.rows += other.rows
        self.new += other.new
        self.mask = _cat_left_padded(self.mask, other.mask, -1)
        self.history = torch.cat([_pad_history(self.history, other.history.shape[1]),
                                  _pad_history(other.history, self.history.shape[1])])
        self.logits = torch.cat([self.logits, other.logits])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = _cat_left_padded(mine.keys, theirs.keys, -2)
            mine.values = _cat_left_padded(mine.values, theirs.values, -2)


def _cat_left_padded(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate along the batch (dim 0), left-padding `dim` (the sequence) of the shorter one with zeros."""
    dim = dim % a.dim()
    width = max(a.shape[dim], b.shape[dim])

    def pad(t: torch.Tensor) -> torch.Tensor:
        extra = width - t.shape[dim]
        if not extra:
            return t
        spec = [0, 0] * (t.dim() - 1 - dim) + [extra, 0]
        return F.pad(t, spec)

    return torch.cat([pad(a), pad(b)])


def _pad_history(history: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad token histories with each row's own first token: the repetition penalty sees only the row's
    tokens (a token repeated counts once), as model.generate sees an unpadded prompt."""
    extra = width - history.shape[1]
    return history if extra <= 0 else torch.cat([history[:, :1].expand(-1, extra), history], 1)


def _forward(model, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, last_only: bool) -> torch.Tensor:
    """One forward over `ids` (the new tokens of each row) given the mask over cache + ids; last logits, fp32."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    extra = {"logits_to_keep": 1} if last_only else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                **extra)
    return out.logits[:, -1, :].float()


_MIN_PREFIX = 8
"""Fewer shared first tokens than this are not worth a forward of their own."""


def _shared_prefix(model, prompts: list[list[int]], device, last_only: bool) -> tuple[int, list]:
    """The first tokens every prompt shares (a chat template's system prompt and role header), run once:
    (their count, [(keys, values) of each layer, batch 1]); (0, []) when fewer than `_MIN_PREFIX` are shared.

    Each prompt keeps at least its last token to run itself (its logits start the answer). A causal model's keys
    and values at these positions depend on these tokens alone, so every row can start from the same ones."""
    if len(prompts) < 2 or attention_implementation(model) not in MASKABLE_ATTENTION:  # the layout leaves holes
        return 0, []
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((k for k in range(n) if p[k] != first[k]), n)
    if n < _MIN_PREFIX:
        return 0, []
    cache = DynamicCache()
    ids = torch.tensor([first[:n]], device=device)
    _forward(model, ids, torch.ones_like(ids), cache, last_only)
    return n, [(layer.keys, layer.values) for layer in cache.layers]


def _prefill(model, prompts: list[list[int]], rows: list[int], pad: int, device, last_only: bool,
             headroom: int, prefix: tuple[int, list] = (0, [])) -> _Batch:
    """Run the entering rows' prompts into a new cache. With a shared prefix of n tokens, the cache starts from
    its keys and values and only the rest of each prompt runs, left-padded after the prefix:
    [prefix | padding | rest], the padding masked out and left out of the positions (they count mask ones)."""
    n, states = prefix
    width = max(len(prompts[i]) for i in rows) - n
    ids = torch.tensor([[pad] * (width + n - len(prompts[i])) + prompts[i][n:] for i in rows], device=device)
    mask = torch.tensor([[1] * n + [0] * (width + n - len(prompts[i])) + [1] * (len(prompts[i]) - n) for i in rows],
                        device=device)
    history = torch.tensor([[prompts[i][0]] * (width + n - len(prompts[i])) + prompts[i] for i in rows],
                           device=device)
    cache = _cache(headroom + width)
    for layer, (keys, values) in enumerate(states):
        cache.update(keys.expand(len(rows), -1, -1, -1), values.expand(len(rows), -1, -1, -1), layer)
    logits = _forward(model, ids, mask, cache, last_only)
    return _Batch(list(rows), history, mask, cache, logits)


@torch.no_grad()
def decode(model, prompts: list[list[int]], settings, stop_ids: list[int], pad: int, seed: int = 0,
           order: list[int] | None = None, streamer=None, stopping=None,
           on_done: Callable[[int], None] | None = None) -> list[list[int]]:
    """Each prompt's new token ids (the stop token included when one ended it), in prompt order.

    Prompts enter the batch in `order` (default: as given), `settings.batch_size` at a time at most.
    `streamer` (one prompt only) receives the prompt and then each token as it is generated.
    `stopping` (transformers stopping criteria) is asked after each token, as model.generate asks it, with
    each row's own prompt and answer so far (no padding): True ends that row there.
    `on_done(i)` is called as each prompt finishes (progress).
    On a CPU the output projection multiplies through a packed copy of its weight (models/packed_head.py)."""
    with packed_output(model, settings.batch_size):
        return _decode(model, prompts, settings, stop_ids, pad, seed, order, streamer, stopping, on_done)


def _decode(model, prompts, settings, stop_ids, pad, seed, order, streamer, stopping, on_done):
    device = next(model.parameters()).device
    order = list(range(len(prompts))) if order is None else list(order)
    process = processors(model, settings)
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    generators = {i: torch.Generator(device=device).manual_seed(seed * 1_000_003 + i) for i in order} \
        if settings.do_sample else {}
    last_only = _keeps_last_logits(model)
    # Refilling one free slot at a time would prefill many tiny batches; wait for a quarter of the batch.
    refill_at = max(1, settings.batch_size // 4)
    out: list[list[int] | None] = [None] * len(prompts)
    waiting = order[::-1]
    prefix = _shared_prefix(model, [prompts[i] for i in order], device, last_only)
    batch: _Batch | None = None
    if streamer is not None:
        streamer.put(torch.tensor([prompts[order[0]]]))
    while waiting or batch is not None:
        free = settings.batch_size - (len(batch.rows) if batch is not None else 0)
        if waiting and (batch is None or free >= min(refill_at, len(waiting))):
            entering = [waiting.pop() for _ in range(min(free, len(waiting)))]
            joined = _prefill(model, prompts, entering, pad, device, last_only, settings.max_new_tokens, prefix)
            if batch is None:
                batch = joined
            else:
                batch.join(joined)
        scores = process(batch.history, batch.logits)
        if settings.do_sample:
            probs = scores.softmax(-1)
            tokens = torch.cat([torch.multinomial(probs[k], 1, generator=generators[i])
                                for k, i in enumerate(batch.rows)])
        else:
            tokens = scores.argmax(-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        stopped = torch.isin(tokens, stops).tolist()
        keep = []
        for k, (token, stop) in enumerate(zip(tokens.tolist(), stopped)):
            batch.new[k].append(token)
            if stopping is not None and not stop:
                row = prompts[batch.rows[k]] + batch.new[k]
                stop = bool(stopping(torch.tensor([row], device=device), scores[k:k + 1]).any())
            if stop or len(batch.new[k]) >= settings.max_new_tokens:
                out[batch.rows[k]] = batch.new[k]
                if on_done is not None:
                    on_done(batch.rows[k])
            else:
                keep.append(k)
        if len(keep) < len(batch.rows):
            if not keep:
                batch = None
                continue
            tokens = tokens[keep]
            batch.select(keep)
        batch.history = torch.cat([batch.history, tokens[:, None]], 1)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], 1)
        batch.logits = _forward(model, tokens[:, None], batch.mask, batch.cache, last_only)
    if streamer is not None:
        streamer.end()
    return out


@torch.no_grad()
def plain_decode(model, prompts: list[list[int]], settings, stop_ids: list[int], pad: int, seed: int = 0,
                 order: list[int] | None = None, streamer=None, stopping=None,
                 on_done: Callable[[int], None] | None = None) -> list[list[int]]:
    """The same contract as `decode`, through model.generate on left-padded batches taken in `order`."""
    device = next(model.parameters()).device
    order = list(range(len(prompts))) if order is None else list(order)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} \
        if settings.do_sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if settings.do_sample:
        torch.manual_seed(seed)
    stops = set(stop_ids)
    out: list[list[int] | None] = [None] * len(prompts)
    for s in range(0, len(order), settings.batch_size):
        idx = order[s:s + settings.batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        result = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                repetition_penalty=settings.repetition_penalty, eos_token_id=list(stop_ids),
                                pad_token_id=pad, streamer=streamer, stopping_criteria=stopping, **sampling)
        for i, row in zip(idx, result[:, width:].tolist()):
            end = next((k for k, t in enumerate(row) if t in stops), None)
            out[i] = row if end is None else row[:end + 1]
            if on_done is not None:
                on_done(i)
    return out
