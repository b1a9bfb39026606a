"""Contract tests: every tuning x every objective, on tiny models, through the same code a run uses.

Two tables. TUNINGS_UNDER_TEST: each tuning's config and the formula its trainable-parameter count must
match. OBJECTIVES_UNDER_TEST: each objective's tiny model and a batch. Every pair must

  1. count: have exactly the trainable parameters the formula says;
  2. train: after a few optimizer steps on the objective's own loss, every trainable tensor has changed,
     every frozen one (4-bit bytes included) is bit-identical, and the loss went down;
  3. save/load: written the way a run writes it and read back the way `eval`/`predict` read it, give the
     same outputs;
  4. merge: where the method merges, the merged plain model gives the unmerged logits within 1e-4 (fp32);
     where it does not, merging is refused with the reason.

A pair the method cannot serve is listed in its `rejects` and must fail the tuning's check, before any
weights are read, with the message given. A new tuning is one TUNINGS_UNDER_TEST entry; a new objective
(sft, mlm, reward, dpo) is one OBJECTIVES_UNDER_TEST entry.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

from tunesmith import artifacts
from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.export.merge import merge
from tunesmith.models.params import count_parameters
from tunesmith.objectives import OBJECTIVES
from tunesmith.trained import load_weights
from tunesmith.tuning import TUNINGS
from tunesmith.tuning.common import check_before_loading, load_base


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
                     lambda d: d.block + d.head + (0 if d.labels else d.vocab * d.h), adapter=False),  # LM: tied embeddings
    "lora": Tuning({"kind": "lora", "r": 4, "alpha": 8, "targets": "all-linear"}, lambda d: _lora(d, 4)),
    "dora": Tuning({"kind": "dora", "r": 4, "alpha": 8, "targets": "all-linear"}, lambda d: _lora(d, 4, dora=True)),
    "qlora": Tuning({"kind": "qlora", "r": 4, "alpha": 8, "targets": "all-linear", "gradient_checkpointing": False},
                    lambda d: _lora(d, 4)),
    "ia3": Tuning({"kind": "ia3"}, _ia3),
    "prefix": Tuning({"kind": "prefix", "tokens": 4}, lambda d: 4 * d.layers * 2 * d.kv + d.head, merges=False),
    "prompt": Tuning({"kind": "prompt", "tokens": 4, "init": "text", "init_text": "good or bad"},
                     lambda d: 4 * d.h + d.head, merges=False,
                     rejects={"classify-llama": "prompt tuning cannot train a llama classifier",
                              "reward": "prompt tuning cannot train a llama classifier"}),
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
class Objective:
    kind: str
    model: str
    """The fixture building the tiny model folder."""
    kwargs: dict
    """Model arguments the objective's `prepare` would produce."""
    batch: Callable[[torch.Generator], dict]


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


LABELS = {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
OBJECTIVES_UNDER_TEST = {
    "classify-bert": Objective("classify", "tiny_bert", LABELS, _classify_batch),
    "classify-llama": Objective("classify", "tiny_llama", LABELS, _classify_batch),
    "clm": Objective("clm", "tiny_llama", {}, _lm_batch),
    "sft": Objective("sft", "tiny_llama", {}, _sft_batch),
    "mlm": Objective("mlm", "tiny_bert", {}, _mlm_batch),
    "reward": Objective("reward", "tiny_llama", {"num_labels": 1}, lambda g: _pair_batch(g, labels=False)),
    "dpo": Objective("dpo", "tiny_llama", {}, lambda g: _pair_batch(g, labels=True)),
}


def dims(config, head: str, total: int) -> Dims:
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    labels = config.num_labels if head == "sequence-classification" else 0
    if config.model_type == "bert":
        block = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h
        # masked-LM head: a dense transform, its LayerNorm and the decoder's bias (its weight is the embeddings')
        mlm_head = h * h + h + 2 * h + config.vocab_size if head == "masked-lm" else 0
        return Dims(h, layers, inter, h, config.vocab_size, total, head=labels * h + labels if labels else mlm_head,
                    block=block, linears=((h, h),) * 4 + ((h, inter), (inter, h)), extra=((h, h),), labels=labels)
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    block = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    return Dims(h, layers, inter, kv, config.vocab_size, total, head=labels * h, block=block,
                linears=((h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)), labels=labels)


CASES = [(t, o) for t in TUNINGS_UNDER_TEST for o in OBJECTIVES_UNDER_TEST if o not in TUNINGS_UNDER_TEST[t].rejects]
REJECTED = [(t, o) for t in TUNINGS_UNDER_TEST for o in TUNINGS_UNDER_TEST[t].rejects]


def run_config(tuning: str, objective: str, model_dir) -> RunConfig:
    obj = OBJECTIVES_UNDER_TEST[objective]
    return RunConfig.model_validate({"name": f"{tuning}-{objective}", "model": str(model_dir),
                                     "data": {"train": "-", "max_length": 64},
                                     "tuning": TUNINGS_UNDER_TEST[tuning].config, "objective": {"kind": obj.kind}})


@dataclasses.dataclass
class Trained:
    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: object
    before: dict
    losses: tuple
    """Loss on the batch before and after training, in eval mode (no dropout noise)."""
    batch: dict


_TRAINED: dict = {}


@pytest.fixture
def trained(request) -> Callable[[str, str], Trained]:
    """Build, tune and train one case (once per session; the contracts below share it)."""

    def get(tuning: str, objective: str) -> Trained:
        if (tuning, objective) not in _TRAINED:
            _TRAINED[tuning, objective] = _train(tuning, objective, request.getfixturevalue(
                OBJECTIVES_UNDER_TEST[objective].model))
        return _TRAINED[tuning, objective]

    return get


def _train(tuning: str, objective: str, model_dir) -> Trained:
    from transformers import AutoTokenizer, set_seed

    obj = OBJECTIVES_UNDER_TEST[objective]
    cfg = run_config(tuning, objective, model_dir)
    module, head = OBJECTIVES[obj.kind], OBJECTIVES[obj.kind].HEAD
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_before_loading(cfg, obj.kwargs)
    set_seed(0)
    model = TUNINGS[cfg.tuning.kind].apply(load_base(cfg, head, obj.kwargs, torch.float32, tokenizer.pad_token_id),
                                          cfg.tuning, head, tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = obj.batch(torch.Generator().manual_seed(1))

    def loss(train: bool) -> torch.Tensor:
        model.train(train)
        out = module.loss(model, batch, cfg.objective)
        return out.total / out.count

    with torch.no_grad():
        start = float(loss(False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(6):
        loss(True).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        end = float(loss(False))
    return Trained(cfg, model.eval(), tokenizer, before, (start, end), batch)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _case_id(case):
    return "-".join(case)


@pytest.mark.parametrize("tuning,objective", CASES, ids=map(_case_id, CASES))
def test_trainable_count_matches_formula(tuning, objective, trained):
    t = trained(tuning, objective)
    head = OBJECTIVES[t.cfg.objective.kind].HEAD
    from tunesmith.models.load import head_class

    with torch.device("meta"):
        base = head_class(head).from_config(t.model.config if not hasattr(t.model, "get_base_model")
                                            else t.model.get_base_model().config)
    d = dims(base.config, head, sum(p.numel() for p in base.parameters()))
    trainable, total = count_parameters(t.model)
    assert trainable == TUNINGS_UNDER_TEST[tuning].count(d)
    assert total >= d.total  # nothing of the base goes missing from the count (4-bit layers included)


@pytest.mark.parametrize("tuning,objective", CASES, ids=map(_case_id, CASES))
def test_trains_only_what_it_should(tuning, objective, trained):
    t = trained(tuning, objective)
    params = dict(t.model.named_parameters())
    unchanged = [n for n, p in params.items() if p.requires_grad and torch.equal(p, t.before[n])]
    moved = [n for n, p in params.items() if not p.requires_grad and not torch.equal(p, t.before[n])]
    assert any(p.requires_grad for p in params.values())
    assert not unchanged, f"trainable tensors that did not change: {unchanged[:3]}"
    assert not moved, f"frozen tensors that changed: {moved[:3]}"
    assert t.losses[1] < t.losses[0], t.losses


@pytest.mark.parametrize("tuning,objective", CASES, ids=map(_case_id, CASES))
def test_save_then_load_gives_identical_outputs(tuning, objective, trained, tmp_path):
    t = trained(tuning, objective)
    obj = OBJECTIVES_UNDER_TEST[objective]
    module = TUNINGS[t.cfg.tuning.kind]
    save = getattr(module, "save", None) or artifacts.save_weights
    folder = tmp_path / save(tmp_path, t.model, t.tokenizer)
    reloaded = load_weights(t.cfg, folder, obj.kwargs, t.tokenizer.pad_token_id).eval()
    torch.testing.assert_close(_logits(reloaded, t.batch), _logits(t.model, t.batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tuning,objective", [c for c in CASES if TUNINGS_UNDER_TEST[c[0]].adapter],
                         ids=map(_case_id, [c for c in CASES if TUNINGS_UNDER_TEST[c[0]].adapter]))
def test_merge_matches_unmerged_or_is_refused(tuning, objective, trained, tmp_path):
    t = trained(tuning, objective)
    assert TUNINGS[t.cfg.tuning.kind].MERGEABLE == TUNINGS_UNDER_TEST[tuning].merges
    obj = OBJECTIVES_UNDER_TEST[objective]
    # merge a reloaded copy: merging consumes the model the other contracts share
    save = getattr(TUNINGS[t.cfg.tuning.kind], "save", None) or artifacts.save_weights
    copy = load_weights(t.cfg, tmp_path / save(tmp_path, t.model, t.tokenizer), obj.kwargs,
                        t.tokenizer.pad_token_id).eval()
    if not TUNINGS_UNDER_TEST[tuning].merges:
        with pytest.raises(TunesmithError, match="cannot be folded|no weight of the base can hold"):
            merge(copy)
        return
    expected = _logits(copy, t.batch)
    merged = merge(copy)
    assert not any("lora" in n or "ia3" in n or ".base_layer." in n for n, _ in merged.named_parameters())
    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in merged.parameters())
    torch.testing.assert_close(_logits(merged, t.batch), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tuning,objective", REJECTED, ids=map(_case_id, REJECTED))
def test_impossible_combination_fails_at_the_check(tuning, objective, request):
    obj = OBJECTIVES_UNDER_TEST[objective]
    cfg = run_config(tuning, objective, request.getfixturevalue(obj.model))
    with pytest.raises(ConfigError, match=TUNINGS_UNDER_TEST[tuning].rejects[objective]):
        check_before_loading(cfg, obj.kwargs)
