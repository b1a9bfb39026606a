"""Contract tests: every tuning x every objective, on tiny models, through the same code a run uses.

Two tables (tests/table.py). TUNINGS_UNDER_TEST: each tuning's config and the formula its trainable-parameter count must
match. OBJECTIVES_UNDER_TEST: each objective's tiny model and a batch. Every pair must

  1. count: have exactly the trainable parameters the formula says;
  2. train: after a few optimizer steps on the objective's own loss, every trainable tensor has changed,
     every frozen one (4-bit bytes included) is bit-identical, and the loss went down;
  3. save/load: written the way a run writes it and read back the way `eval`/`predict` read it, give the
     same outputs;
  4. merge: where the method merges, the merged plain model gives the unmerged logits within 1e-4 (fp32);
     where it does not, merging is refused with the reason.

A pair the method cannot serve is listed in its `rejects` and must fail the tuning's check, before any
weights are read, with the message given. The tables are in tests/table.py: a new tuning is one
TUNINGS_UNDER_TEST row, a new objective one OBJECTIVES_UNDER_TEST row (which feeds test_invariants.py too).
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
from table import (CASES, OBJECTIVES_UNDER_TEST, REJECTED, TUNINGS_UNDER_TEST, Dims, Objective, Tuning,  # noqa: F401
                   _ids, dims)
from tunesmith.build import check_before_loading, load_base


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
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()  # encoder


def _case_id(case):
    return "-".join(case)


@pytest.mark.parametrize("tuning,objective", CASES, ids=map(_case_id, CASES))
def test_trainable_count_matches_formula(tuning, objective, trained):
    t = trained(tuning, objective)
    head = OBJECTIVES[t.cfg.objective.kind].HEAD
    from tunesmith.models.load import bare, head_class

    with torch.device("meta"):
        base = bare(head_class(head).from_config(t.model.config if not hasattr(t.model, "get_base_model")
                                                 else t.model.get_base_model().config), head)
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
