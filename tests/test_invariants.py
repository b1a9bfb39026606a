"""Training invariants, for every objective, from the one test table (tests/table.py): a new objective is
one OBJECTIVES_UNDER_TEST row there, whose `runs` feed the cases here.

  accumulation  k micro-batches of uneven length give the same update as one batch k times larger
                (examples weigh equally for classify, target tokens for sequence objectives, pairs for
                reward and dpo), and a
                penalty towards the starting weights is added once per step, not once per micro-batch
  seed          the same seed repeats a CPU run exactly: weights and every logged metric
  divergence    a NaN loss stops the run with a clear message and keeps the last good checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from table import OBJECTIVES_UNDER_TEST
from tiny import write_jsonl
from tunesmith.cli import main
from tunesmith.objectives import OBJECTIVES


@dataclass
class Case:
    objective: str
    model: str
    """Name of the tiny-model fixture."""
    head_class: str
    num_labels: int
    """Outputs of a classifier head (0: a language model's head)."""
    examples: Callable[[random.Random], list[dict]]
    """Twelve tokenized examples of uneven length, as the objective's `prepare` makes them."""
    rows: Callable[[int, int], list[dict]]
    """Raw rows (n, seed) for a run on disk."""
    config: Callable
    """(path, model, data, tuning, extra) -> a run config."""
    units: Callable[[list[dict]], int] = len
    """The loss units of the examples: examples or pairs (len), or target tokens."""


HEAD_CLASSES = {"sequence-classification": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}
# One row per objective in tests/table.py; the rows that carry `runs` are the cases here.
CASES = [Case(row.kind, row.model, HEAD_CLASSES[OBJECTIVES[row.kind].HEAD],
              row.kwargs.get("num_labels", 0), *dataclasses.astuple(row.runs))
         for row in OBJECTIVES_UNDER_TEST.values() if row.runs is not None]
IDS = [c.objective for c in CASES]


def _model(case, request):
    import transformers

    path = request.getfixturevalue(case.model)  # first: building the fixture draws random numbers
    torch.manual_seed(0)
    kwargs = {"num_labels": case.num_labels} if case.num_labels else {}
    model = getattr(transformers, case.head_class).from_pretrained(path, **kwargs)
    model.eval()  # no dropout: the two ways must compute the same function
    return model


def _grads(case, request, examples, batch_size, accum, perturb=False, penalty_weight=None):
    """Gradients after one accumulation window; `perturb` first moves the weights off their start
    (where a penalty is anchored), so a pull towards the start is not zero."""
    from accelerate import Accelerator

    from tunesmith.objectives import OBJECTIVES
    from tunesmith.regimes.continual import Anchor
    from tunesmith.train.loop import _step

    model = _model(case, request)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    penalty = Anchor(named, penalty_weight) if penalty_weight is not None else None
    moved = {}
    if perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in named:
                moved[n] = torch.randn(p.shape, generator=gen) * 0.01
                p.add_(moved[n])
    objective = OBJECTIVES[case.objective]
    window = [list(range(s, s + batch_size)) for s in range(0, len(examples), batch_size)][:accum]
    loss, count = _step(model, objective, objective.Config(), examples, window, 0, Accelerator(cpu=True),
                        [p for _, p in named], penalty)
    return loss / count, count, {n: p.grad.clone() for n, p in named if p.grad is not None}, moved


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_accumulation_equals_the_large_batch(case, request):
    """4 micro-batches of 3 uneven examples give the update of one batch of 12 (per unit: example or token)."""
    examples = case.examples(random.Random(0))
    loss_big, units, big, _ = _grads(case, request, examples, 12, 1)
    loss_acc, units_acc, acc, _ = _grads(case, request, examples, 3, 4)
    assert units == units_acc == case.units(examples)  # examples, pairs or target tokens
    assert loss_big == pytest.approx(loss_acc, rel=1e-5)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_penalty_is_added_once_per_step(case, request):
    """With a pull towards the starting weights, accumulation still equals the large batch, and the
    gradient is the task gradient plus weight * (w - w0): once, not once per micro-batch."""
    examples = case.examples(random.Random(0))
    _, _, big, moved = _grads(case, request, examples, 12, 1, perturb=True, penalty_weight=0.5)
    _, _, acc, _ = _grads(case, request, examples, 3, 4, perturb=True, penalty_weight=0.5)
    _, _, task, _ = _grads(case, request, examples, 12, 1, perturb=True)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(big[name], task[name] + 0.5 * moved[name], rtol=1e-4, atol=1e-6)


def _data(case, root):
    d = root / f"data-{case.objective}"
    write_jsonl(d / "train.jsonl", case.rows(96, 1))
    write_jsonl(d / "validation.jsonl", case.rows(24, 2))
    write_jsonl(d / "test.jsonl", case.rows(24, 3))
    return d


def _log(run):
    """Every logged line but the throughput (wall-clock)."""
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in l.items() if k != "examples_per_s"} for l in lines]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_seed_repeats_exactly(case, request, in_tmp):
    from safetensors.torch import load_file

    model = request.getfixturevalue(case.model)
    cfg = case.config(in_tmp / "c.yaml", model, _data(case, in_tmp), "{kind: lora, r: 4}", "eval: {compare_base: false}\n")
    for name in ("a", "b"):
        assert main(["train", str(cfg), "train.max_steps=8", "train.eval_every=4", f"name={name}"]) == 0
    a, b = in_tmp / "runs" / "a", in_tmp / "runs" / "b"
    wa, wb = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _log(a) == _log(b) and any(l.get("split") == "validation" for l in _log(a))
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["test"] == sb["test"] and sa["diagnosis"]["gap"] == sb["diagnosis"]["gap"]


@pytest.mark.parametrize("case", [c for c in CASES if c.objective in ("clm", "sft", "dpo")],
                         ids=["clm", "sft", "dpo"])
def test_gradient_checkpointing_recomputes_blocks_and_changes_nothing_else(case, request, in_tmp, monkeypatch):
    """train.gradient_checkpointing: blocks run again during backward (so activations were not kept), and
    the trained weights equal those of the same run without it (LoRA dropout on: its randomness is replayed)."""
    from safetensors.torch import load_file
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    # count a module inside the block: the block's own forward is wrapped by transformers for checkpointing
    real = modeling_llama.LlamaMLP.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted)
    model = request.getfixturevalue(case.model)
    cfg = case.config(in_tmp / "c.yaml", model, _data(case, in_tmp), "{kind: lora, r: 4, dropout: 0.1}",
                      "eval: {compare_base: false}\n")
    counts = {}
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        calls["n"] = 0
        assert main(["train", str(cfg), "train.max_steps=6", "train.eval_every=6", f"name={name}",
                     f"train.gradient_checkpointing={flag}"]) == 0
        counts[name] = calls["n"]
    assert counts["ckpt"] > counts["plain"]  # the recomputation during backward
    wa, wb = (load_file(in_tmp / "runs" / r / "adapter" / "adapter_model.safetensors") for r in ("plain", "ckpt"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(case, request, in_tmp, capsys, monkeypatch):
    from tunesmith.objectives import OBJECTIVES

    objective = OBJECTIVES[case.objective]
    real, calls = objective.loss, {"n": 0}

    def poisoned(model, batch, cfg):
        out = real(model, batch, cfg)
        calls["n"] += 1
        if calls["n"] > 6:
            out.total = out.total * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(objective, "loss", poisoned)
    model = request.getfixturevalue(case.model)
    cfg = case.config(in_tmp / "c.yaml", model, _data(case, in_tmp))
    assert main(["train", str(cfg), "train.eval_every=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "training loss became nan at step 7" in err and "--resume" in err
    run = in_tmp / "runs" / "tiny"
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert json.loads((run / "checkpoints" / "last" / "state.json").read_text())["step"] == 6
    assert not (run / "summary.json").exists()
