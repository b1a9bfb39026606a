"""A new method is one module and one registry line: proved by adding two from inside this file, with no edit
anywhere else (docs/contributing.md walks through the same).

  bitfit   a tuning that trains only the biases (Ben Zaken et al., 2022), plus a new classifier head
  regress  an objective that predicts a number from a text (mean squared error): its main metric is an error,
           lower is better, so early stopping must keep, and restore, the checkpoint with the *lowest* error

Both go through the shared contract table (tests/test_contracts.py) and a tiny end-to-end run.
"""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Literal

import pytest
import torch
import torch.nn.functional as F

import table
import test_contracts as contracts
import test_invariants as invariants
from tiny import NO_PROBE, classify_config, sentiment_rows, write_jsonl
from tunesmith import config
from tunesmith.cli import main
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.common import Loss, Prepared
from tunesmith.schema import Section
from tunesmith.tuning import TUNINGS

# ------------------------------------------------------------------------------------------------ bitfit


class BitfitConfig(Section):
    kind: Literal["bitfit"] = "bitfit"
    """Train the biases only (and a new classifier head)."""


def _bitfit_apply(model, cfg, head, tokenizer=None):
    from tunesmith.models.anatomy import head_parameters

    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias"))
    if head == "sequence-classification":
        for p in head_parameters(model):
            p.requires_grad_(True)
    return model


bitfit = types.ModuleType("bitfit")
bitfit.__dict__.update(Config=BitfitConfig, MERGEABLE=True, TRAINS_BASE=True,
                       HEADS=frozenset({"sequence-classification", "causal-lm", "masked-lm"}), apply=_bitfit_apply)

# ------------------------------------------------------------------------------------------------ regress


class RegressConfig(Section):
    kind: Literal["regress"] = "regress"
    """Predict the number in each row's `label` column from its `text`."""


def _regress_prepare(splits, tokenizer, cfg, data):
    from tunesmith.data.tokenize import tokenize_texts

    examples = {}
    for name, part in splits.items():
        ids, _ = tokenize_texts(tokenizer, [r["text"] for r in part.rows], data.max_length)
        examples[name] = [{"input_ids": x, "labels": float(r["label"])} for x, r in zip(ids, part.rows)]
    return Prepared(examples, {"num_labels": 1}, {})


def _predicted(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().squeeze(-1)


def _regress_loss(model, batch, cfg):
    return Loss(F.mse_loss(_predicted(model, batch), batch["labels"].float(), reduction="sum"), len(batch["labels"]))


def _regress_eval_step(model, batch, cfg):
    return {"se": (_predicted(model, batch) - batch["labels"].float()).pow(2).tolist()}


def _regress_metrics(outputs, cfg):
    mse = sum(outputs["se"]) / max(1, len(outputs["se"]))
    return {"mse": mse, "loss": mse}


regress = types.ModuleType("regress")
regress.__dict__.update(Config=RegressConfig, HEAD="sequence-classification", METRICS={"mse": "min", "loss": "min"},
                        MAIN_METRIC="mse", prepare=_regress_prepare, loss=_regress_loss,
                        eval_step=_regress_eval_step, metrics=_regress_metrics)


@pytest.fixture
def registered(monkeypatch):
    """bitfit and regress in the registries, and the config's tuning/objective unions rebuilt to know them."""
    monkeypatch.setitem(TUNINGS, "bitfit", bitfit)
    monkeypatch.setitem(OBJECTIVES, "regress", regress)
    for field, registry in (("tuning", TUNINGS), ("objective", OBJECTIVES)):
        monkeypatch.setattr(config.RunConfig.model_fields[field], "annotation", config._union(registry))
    config.RunConfig.model_rebuild(force=True)
    yield
    monkeypatch.undo()
    config.RunConfig.model_rebuild(force=True)


def test_the_throwaway_methods_provide_their_axis_interface(registered):
    import test_axes

    for axis, kind in (("tuning", "bitfit"), ("objective", "regress")):
        test_axes.test_every_registry_entry_provides_its_axis_interface(axis, kind)
        test_axes.test_capabilities_are_well_formed(axis, kind)


# ------------------------------------------------------------------------------------------------ the table

def _bitfit_count(d: table.Dims) -> int:
    """The tiny BERT's biases: every linear's and both LayerNorms' in each block, the embeddings' LayerNorm."""
    body = d.layers * (sum(o for _, o in d.linears) + 2 * d.h) + d.h
    if d.labels:  # a new head trains in full; the pooler that feeds it has a bias too
        return body + sum(o for _, o in d.extra) + d.head
    return body + 2 * d.h + d.vocab  # masked-LM head: its transform's and LayerNorm's biases, the decoder's


def _regress_batch(g):
    ids, mask = table._ids(g)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0.5, -1.0, 2.0, 0.0])}


def _regress_examples(rng):
    return [{"input_ids": [2, *table._token_ids(rng), 3], "labels": rng.uniform(-1, 1)} for _ in range(12)]


REGRESS_ROW = table.Objective("regress", "tiny_bert", {"num_labels": 1}, _regress_batch,
                              table.Runs(_regress_examples, sentiment_rows, classify_config))


@pytest.fixture
def rows(registered, monkeypatch):
    """One row in each table, as a contributor adds them to tests/table.py."""
    monkeypatch.setitem(table.TUNINGS_UNDER_TEST, "bitfit", table.Tuning({"kind": "bitfit"}, _bitfit_count,
                                                                          adapter=False))
    monkeypatch.setitem(table.OBJECTIVES_UNDER_TEST, "regress", REGRESS_ROW)


def _contracts(tuning, objective, request, tmp_path):
    t = contracts._train(tuning, objective, request.getfixturevalue(table.OBJECTIVES_UNDER_TEST[objective].model))
    get = lambda *_: t  # noqa: E731  (the table's `trained` fixture, for this one case)
    contracts.test_trainable_count_matches_formula(tuning, objective, get)
    contracts.test_trains_only_what_it_should(tuning, objective, get)
    contracts.test_save_then_load_gives_identical_outputs(tuning, objective, get, tmp_path)


@pytest.mark.parametrize("objective", ["classify-bert", "mlm", "regress"])  # the tiny Llama has no biases
def test_bitfit_row_passes_the_contract_table(objective, rows, request, tmp_path):
    _contracts("bitfit", objective, request, tmp_path)


@pytest.mark.parametrize("tuning", ["full", "lora", "ia3", "adapter-pfeiffer", "bitfit"])
def test_regress_row_passes_the_contract_table(tuning, rows, request, tmp_path):
    _contracts(tuning, "regress", request, tmp_path)


def test_regress_row_passes_the_invariants(rows, request):
    """Its `runs` make an invariants case: accumulation over uneven micro-batches equals the large batch."""
    case = invariants.Case("regress", "tiny_bert", "AutoModelForSequenceClassification", 1,
                           *dataclasses.astuple(REGRESS_ROW.runs))
    invariants.test_gradient_accumulation_equals_the_large_batch(case, request)


# ------------------------------------------------------------------------------------------------ end to end

# The validation MSE at each evaluation, scripted so the best checkpoint is known: 0.2 at the second one.
SCRIPT = [0.5, 0.2, 0.4, 0.6, 0.7]


def test_early_stopping_keeps_and_restores_the_lowest_error(registered, tiny_bert, in_tmp, monkeypatch):
    """patience 2 over 0.5, 0.2, 0.4, 0.6: stop at the fourth evaluation, keep the second (lowest) and end with
    exactly its weights. Reading `mse` as higher-is-better would keep the first (and stop at the third)."""
    seen, snapshots = [], []

    def eval_step(model, batch, cfg):
        if len(snapshots) == len(seen):  # the first batch of an evaluation: the weights it scores
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return _regress_eval_step(model, batch, cfg)

    def metrics(outputs, cfg):
        mse = SCRIPT[len(seen)] if len(seen) < len(SCRIPT) else 1.0
        seen.append(mse)
        return {"mse": mse, "loss": _regress_metrics(outputs, cfg)["loss"]}

    monkeypatch.setattr(regress, "eval_step", eval_step)
    monkeypatch.setattr(regress, "metrics", metrics)
    data = in_tmp / "data"
    for split, n, seed in (("train", 96, 1), ("validation", 16, 2)):
        write_jsonl(data / f"{split}.jsonl", [{"text": r["text"], "label": 1.0 if r["label"] == "pos" else -1.0}
                                             for r in sentiment_rows(n, seed)])
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, data, "{kind: bitfit}",
                          f"eval: {{compare_base: false, {NO_PROBE}}}\n")
    cfg.write_text(cfg.read_text().replace("{kind: classify}", "{kind: regress}").replace(
        "seed: 0}", "seed: 0, eval_every: 2, early_stopping: {patience: 2}}").replace("eval_every: 12, ", ""))
    assert main(["train", str(cfg)]) == 0

    run = in_tmp / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["stopped_early"] and summary["train"]["steps"] == 8
    assert summary["train"]["best_step"] == 4 and summary["train"]["best_metric"] == {"mse": 0.2}
    assert summary["train"]["restored_best"]
    from safetensors.torch import load_file

    saved = load_file(run / "model" / "model.safetensors")
    best = snapshots[1]
    assert any(not torch.equal(best[n], snapshots[3][n]) for n in best)  # training moved on after the best
    for name, value in best.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)
