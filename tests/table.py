"""The one test table: every tuning and every objective under test, on tiny models. A new tuning is one
TUNINGS_UNDER_TEST row; a new objective is one OBJECTIVES_UNDER_TEST row, and that row feeds both the
contract tests (tests/test_contracts.py: counts, training, save/load, merge, refusals, for every tuning x
objective) and, through its `runs`, the training invariants (tests/test_invariants.py: accumulation, seeds,
the NaN stop). tests/test_new_method.py adds a row of each from inside a test.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

import torch

from tiny import (NO_PROBE, classify_config, clm_config, instruction_rows, patterned_rows, preference_config,
                  preference_rows, sentiment_rows, with_eval, write_config)


@dataclasses.dataclass(frozen=True)
class Dims:
    """What a formula needs to know about the tiny model (from its config, not from the tuned model)."""

    h: int
    layers: int
    inter: int
    kv: int
    """Width of the keys and values (num_key_value_heads x head_dim)."""
    vocab: int
    total: int
    """All parameters of the base with its head."""
    head: int
    """Parameters of the task head outside the tied embeddings: a new classifier, a masked-LM head's transform
    and bias; 0 for a causal LM (its head is the embeddings)."""
    block: int
    """Parameters of one transformer block."""
    linears: tuple
    """(in, out) of each linear layer of one block, and of other body linears (BERT's pooler) in `extra`."""
    extra: tuple = ()
    labels: int = 0
    """Classes of a classification head (0 for language models)."""
    lm_head: bool = True
    """A language-model head tied to the input embeddings (False for a classifier or a bare encoder)."""


@dataclasses.dataclass(frozen=True)
class Tuning:
    config: dict
    count: Callable[[Dims], int]
    rejects: dict = dataclasses.field(default_factory=dict)
    """objective-table name -> text of the check's message."""
    merges: bool = True
    adapter: bool = True
    """False for full/freeze: nothing to merge or to compare with."""


def _lora(d: Dims, r: int, dora: bool = False) -> int:
    per = sum(r * (i + o) + (o if dora else 0) for i, o in d.linears)
    extra = sum(r * (i + o) + (o if dora else 0) for i, o in d.extra)
    return d.layers * per + extra + d.head


def _ia3(d: Dims) -> int:
    # peft's defaults: keys and values scale their outputs; feed-forward outputs scale their inputs.
    # BERT: key, value, attention.output.dense (matched by "output.dense": input scaled, h) and output.dense
    # (input: intermediate). Llama: k_proj, v_proj (kv wide) and down_proj (input: intermediate).
    per = d.kv + d.kv + (d.h + d.inter if d.kv == d.h else d.inter)
    return d.layers * per + d.head


def _adapter(d: Dims, per_block: int, reduction: int) -> int:
    b = d.h // reduction
    return d.layers * per_block * (2 * d.h * b + b + d.h) + d.head


TUNINGS_UNDER_TEST = {
    "full": Tuning({"kind": "full"}, lambda d: d.total, adapter=False),
    "freeze": Tuning({"kind": "freeze", "train_last": 1},
                     lambda d: d.block + d.head + (d.vocab * d.h if d.lm_head and not d.labels else 0),
                     adapter=False),  # LM: tied embeddings
    "lora": Tuning({"kind": "lora", "r": 4, "alpha": 8, "targets": "all-linear"}, lambda d: _lora(d, 4)),
    "dora": Tuning({"kind": "dora", "r": 4, "alpha": 8, "targets": "all-linear"}, lambda d: _lora(d, 4, dora=True)),
    "qlora": Tuning({"kind": "qlora", "r": 4, "alpha": 8, "targets": "all-linear", "gradient_checkpointing": False},
                    lambda d: _lora(d, 4)),
    "ia3": Tuning({"kind": "ia3"}, _ia3),
    "prefix": Tuning({"kind": "prefix", "tokens": 4}, lambda d: 4 * d.layers * 2 * d.kv + d.head, merges=False,
                     rejects={"embed": "objective embed trains with tuning"}),
    "prompt": Tuning({"kind": "prompt", "tokens": 4, "init": "text", "init_text": "good or bad"},
                     lambda d: 4 * d.h + d.head, merges=False,
                     rejects={"classify-llama": "prompt tuning cannot train a llama classifier",
                              "reward": "prompt tuning cannot train a llama classifier",
                              "embed": "objective embed trains with tuning"}),
    "adapter-houlsby": Tuning({"kind": "adapter", "placement": "houlsby", "reduction_factor": 4},
                              lambda d: _adapter(d, 2, 4), merges=False),
    "adapter-pfeiffer": Tuning({"kind": "adapter", "placement": "pfeiffer", "reduction_factor": 4},
                               lambda d: _adapter(d, 1, 4), merges=False),
}
# mlm trains full or freeze only: an adapter over an encoder's (often missing, so random) masked-LM head
for _name, _tuning in TUNINGS_UNDER_TEST.items():
    if _tuning.adapter:
        _tuning.rejects["mlm"] = "objective mlm trains with tuning full or freeze"


@dataclasses.dataclass(frozen=True)
class Runs:
    """What the training invariants (tests/test_invariants.py) need of an objective."""

    examples: Callable[[random.Random], list[dict]]
    """Twelve tokenized examples of uneven length, as the objective's `prepare` makes them."""
    rows: Callable[[int, int], list[dict]]
    """Raw rows (n, seed) for a run on disk."""
    config: Callable
    """(path, model, data, tuning, extra) -> a run config."""
    units: Callable[[list[dict]], int] = len
    """The loss units of the examples: examples or pairs (len), or target tokens."""


@dataclasses.dataclass(frozen=True)
class Objective:
    kind: str
    model: str
    """The fixture building the tiny model folder."""
    kwargs: dict
    """Model arguments the objective's `prepare` would produce."""
    batch: Callable[[torch.Generator], dict]
    runs: Runs | None = None
    """For the invariants (accumulation, seeds, NaN stop): one row per objective carries them."""


def _ids(g, n=4, length=9, vocab=60):
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # one padded row: padding must be handled
    mask[3, 4:] = 0
    return ids, mask


def _classify_batch(g):
    # Unbalanced labels: random ids give a tiny random encoder few input-dependent features at the position
    # its classifier reads (for prompt tuning, a virtual token), so with balanced labels ln 2 can be the floor.
    ids, mask = _ids(g)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 1])}


def _lm_batch(g):
    ids, mask = _ids(g)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _sft_batch(g):
    batch = _lm_batch(g)
    batch["labels"][:, :3] = -100  # the prompt: no loss on it
    return batch


def _mlm_batch(g):
    ids, mask = _ids(g)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & (mask == 1)
    chosen[:, 1] = True  # at least one masked token per row
    return {"input_ids": ids.masked_fill(chosen, 4), "attention_mask": mask, "labels": ids.masked_fill(~chosen, -100)}


def _embed_batch(g):
    """Anchors and positives of uneven length (padded rows in both)."""
    ids, mask = _ids(g)
    positive, positive_mask = _ids(g, length=7)
    return {"input_ids": ids, "attention_mask": mask, "positive_input_ids": positive,
            "positive_attention_mask": positive_mask}


def _pair_batch(g, labels: bool):
    """Preference pairs: the chosen side as `input_ids` (what the output comparisons read), the rejected side
    next to it; dpo's reference log-probs precomputed (full and freeze have no adapter to switch off)."""
    batch = _lm_batch(g) if labels else dict(zip(("input_ids", "attention_mask"), _ids(g)))
    rejected, mask = _ids(g, length=7)
    batch.update(rejected_input_ids=rejected, rejected_attention_mask=mask)
    if labels:
        batch.update(rejected_labels=rejected.masked_fill(mask == 0, -100),
                     ref_chosen_logps=torch.full((4,), -30.0), ref_rejected_logps=torch.full((4,), -25.0))
    return batch


# -- for the invariants: tokenized examples as `prepare` makes them, and run configs

def _token_ids(rng, lo=2, hi=14):
    return [rng.randrange(6, 60) for _ in range(rng.randint(lo, hi))]


def _targets(examples) -> int:
    """Target tokens: labels that are not IGNORE_INDEX, past the first position (nothing predicts it)."""
    return sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)


def _masked(rng, ids):
    """sft-style labels: a prompt of 1-4 tokens masked, the rest targets."""
    k = min(len(ids) - 1, rng.randint(1, 4))
    return [-100] * k + ids[k:]


def _pairs(rng, labels: bool, ref: bool):
    out = []
    for _ in range(12):
        c, r = _token_ids(rng), _token_ids(rng)
        e = {"input_ids": c, "rejected_input_ids": r}
        if labels:
            e.update(labels=_masked(rng, c), rejected_labels=_masked(rng, r))
        if ref:  # precomputed reference log-probs: the bare model has no adapter to switch off
            e.update(ref_chosen_logps=-rng.uniform(5, 40), ref_rejected_logps=-rng.uniform(5, 40))
        out.append(e)
    return out


def _sft_config(path, model, data, tuning="{kind: full}", extra=""):
    text = f"""\
name: tiny
model: {model}
data: {{train: {data}, max_length: 32}}
tuning: {tuning}
objective: {{kind: sft}}
train: {{epochs: 3, batch_size: 8, lr: 3.0e-3, eval_every: 8, log_every: 4, seed: 0}}
{with_eval(extra, NO_PROBE + ", generate: {max_new_tokens: 4, prompts: 8}")}"""
    return write_config(path, text)


def _preference_config(objective):
    return lambda path, model, data, tuning="{kind: full}", extra="": preference_config(
        path, model, data, tuning, objective, extra,
        train="{epochs: 3, batch_size: 8, lr: 3.0e-3, eval_every: 8, log_every: 4, seed: 0}")


LABELS = {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
OBJECTIVES_UNDER_TEST = {
    "classify-bert": Objective("classify", "tiny_bert", LABELS, _classify_batch, Runs(
        lambda rng: [{"input_ids": [2, *_token_ids(rng), 3], "labels": rng.randrange(2)} for _ in range(12)],
        sentiment_rows, classify_config)),
    "classify-llama": Objective("classify", "tiny_llama", LABELS, _classify_batch),
    "clm": Objective("clm", "tiny_llama", {}, _lm_batch, Runs(
        lambda rng: [{"input_ids": x, "labels": list(x)} for x in (_token_ids(rng) for _ in range(12))],
        patterned_rows, clm_config, _targets)),
    "sft": Objective("sft", "tiny_llama", {}, _sft_batch, Runs(
        lambda rng: [{"input_ids": x, "labels": _masked(rng, x)} for x in (_token_ids(rng) for _ in range(12))],
        instruction_rows, _sft_config, _targets)),
    "mlm": Objective("mlm", "tiny_bert", {}, _mlm_batch),
    "reward": Objective("reward", "tiny_llama", {"num_labels": 1}, lambda g: _pair_batch(g, labels=False), Runs(
        lambda rng: _pairs(rng, labels=False, ref=False), preference_rows, _preference_config("{kind: reward}"))),
    # no `runs`: an in-batch-negative loss depends on which rows share a batch, so accumulation cannot equal it
    "embed": Objective("embed", "tiny_bert", {}, _embed_batch),
    "dpo": Objective("dpo", "tiny_llama", {}, lambda g: _pair_batch(g, labels=True), Runs(
        lambda rng: _pairs(rng, labels=True, ref=True), preference_rows, _preference_config("{kind: dpo, beta: 0.5}"))),
}


def dims(config, head: str, total: int) -> Dims:
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    labels = config.num_labels if head == "sequence-classification" else 0
    if config.model_type == "bert":
        block = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h
        # masked-LM head: a dense transform, its LayerNorm and the decoder's bias (its weight is the embeddings')
        mlm_head = h * h + h + 2 * h + config.vocab_size if head == "masked-lm" else 0
        return Dims(h, layers, inter, h, config.vocab_size, total, head=labels * h + labels if labels else mlm_head,
                    block=block, linears=((h, h),) * 4 + ((h, inter), (inter, h)),
                    extra=() if head == "encoder" else ((h, h),), labels=labels,  # the pooler (an encoder has none)
                    lm_head=head != "encoder")
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    block = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    return Dims(h, layers, inter, kv, config.vocab_size, total, head=labels * h, block=block,
                linears=((h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)), labels=labels)


CASES = [(t, o) for t in TUNINGS_UNDER_TEST for o in OBJECTIVES_UNDER_TEST if o not in TUNINGS_UNDER_TEST[t].rejects]
REJECTED = [(t, o) for t in TUNINGS_UNDER_TEST for o in TUNINGS_UNDER_TEST[t].rejects]
