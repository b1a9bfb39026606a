"""Language-model losses without the full logits (objectives/lm.py): every LM objective's loss, log-probs and
evaluation scores are the same, in values and gradients, whether the output layer runs over the whole batch or
over chunks of target tokens; and on the chunked path no [tokens x vocab] logits are kept for the backward pass."""

from __future__ import annotations

import pytest
import torch

from tiny import make_model_dir
from tunesmith.data.collate import IGNORE_INDEX, collate
from tunesmith.data.pack import pack
from tunesmith.objectives import OBJECTIVES, dpo
from tunesmith.objectives.lm import causal_lm_forward, lm_losses

CHUNK = 3  # target tokens per chunk: several chunks per tiny batch, the last one short


def _tuned(path, tuning: dict, seed: int = 0):
    """The tiny llama as a run builds it, its tuning applied and every trainable tensor moved off its start
    (LoRA's B and the adapters' up projections start at zero)."""
    from transformers import AutoTokenizer

    from tunesmith.build import load_base
    from tunesmith.config import RunConfig
    from tunesmith.tuning import TUNINGS

    cfg = RunConfig.model_validate({"name": "t", "model": str(path), "data": {"train": "-"}, "tuning": tuning,
                                    "objective": {"kind": "sft"}})
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = TUNINGS[cfg.tuning.kind].apply(load_base(cfg, "causal-lm", {}, torch.float32, tok.pad_token_id),
                                           cfg.tuning, "causal-lm", tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model, tok


def _batch(packed: bool) -> dict:
    """Three examples with a masked prompt (and one shorter), padded or packed into one row."""
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, prompt in ((9, 4), (8, 3), (6, 2)):
        ids = torch.randint(6, 40, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return collate(pack(examples, 32) if packed else examples, 0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _both(model, run):
    """`run(chunk)` -> a tensor or a tuple of them, for chunk 0 and CHUNK: (values, gradients) of each."""
    out = {}
    for chunk in (0, CHUNK):
        model.zero_grad()
        values = run(chunk)
        values = values if isinstance(values, tuple) else (values,)
        # rows weighted apart, so a gradient sent to the wrong sequence shows
        sum((v.float() * torch.arange(1, v.numel() + 1).view_as(v)).sum() for v in values).backward()
        out[chunk] = [v.detach() for v in values], _grads(model)
    return out[0], out[CHUNK]


def _assert_same(full, chunked):
    for a, b in zip(full[0], chunked[0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert full[1] and full[1].keys() == chunked[1].keys()
    for name in full[1]:
        torch.testing.assert_close(chunked[1][name], full[1][name], rtol=1e-4, atol=1e-6, msg=name)


TUNINGS = {
    "full": {"kind": "full"},  # tied input and output embeddings: both uses of the weight get their gradient
    "lora": {"kind": "lora", "r": 4},
    "lora-on-head": {"kind": "lora", "r": 4, "targets": ["q_proj", "lm_head"]},
    "prompt": {"kind": "prompt", "tokens": 3},  # virtual tokens before the input
    "prefix": {"kind": "prefix", "tokens": 3},
    "adapter": {"kind": "adapter", "reduction_factor": 4},
}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("tuning", list(TUNINGS))
def test_causal_losses_and_gradients_equal_the_full_logits(tiny_llama, tuning, packed):
    model, _ = _tuned(tiny_llama, TUNINGS[tuning])
    model.eval()  # no dropout: both ways see the same network (gradients still flow)
    batch = _batch(packed)
    full, chunked = _both(model, lambda chunk: causal_lm_forward(model, batch, chunk)[0])
    _assert_same(full, chunked)
    assert causal_lm_forward(model, batch, CHUNK)[1].tolist() == causal_lm_forward(model, batch, 0)[1].tolist()


@pytest.mark.parametrize("kind", ["clm", "sft"])
def test_objective_loss_and_eval_step_follow_loss_chunk(tiny_llama, kind):
    objective = OBJECTIVES[kind]
    model, _ = _tuned(tiny_llama, TUNINGS["lora"])
    model.eval()
    batch = _batch(False)
    cfg = lambda chunk: objective.Config(loss_chunk=chunk)  # noqa: E731
    full, chunked = _both(model, lambda chunk: objective.loss(model, batch, cfg(chunk)).total)
    _assert_same(full, chunked)
    with torch.no_grad():
        a, b = objective.eval_step(model, batch, cfg(0)), objective.eval_step(model, batch, cfg(CHUNK))
    assert b["tokens"] == a["tokens"]
    assert b["loss_sum"] == pytest.approx(a["loss_sum"], rel=1e-5)


def test_masked_lm_losses_and_gradients_equal_the_full_logits(tiny_bert):
    """BERT's output layer is the decoder after its prediction transform: the transform runs for every
    token, the decoder only at the masked ones."""
    from transformers import AutoModelForMaskedLM

    from tunesmith.objectives import mlm

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert).eval()
    ids = torch.randint(5, 40, (3, 10))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, [1, 4]], labels[1, [2, 3, 7, 8]], labels[2, 5] = ids[0, [1, 4]], ids[1, [2, 3, 7, 8]], ids[2, 5]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    full, chunked = _both(model, lambda chunk: lm_losses(model, batch, "masked-lm", chunk)[0])
    _assert_same(full, chunked)
    with torch.no_grad():  # and through the objective's own evaluation
        a = mlm.eval_step(model, batch, mlm.Config(loss_chunk=0))
        b = mlm.eval_step(model, batch, mlm.Config(loss_chunk=CHUNK))
    assert b["tokens"] == a["tokens"] == [2, 4, 1]
    assert b["loss_sum"] == pytest.approx(a["loss_sum"], rel=1e-5)


def _pairs(tok):
    from types import SimpleNamespace

    from tunesmith.data.sources import Split
    from tunesmith.objectives.pairs import prepare_pairs
    from tiny import preference_rows

    data = SimpleNamespace(format="auto", max_length=32)
    examples = prepare_pairs({"train": Split(preference_rows(4, 5), "rows")}, tok, "auto", None, data).examples
    return collate(examples["train"], tok.pad_token_id)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_log_probs_loss_and_gradients_equal_the_full_logits(tiny_llama, loss):
    """The policy's and the reference's (adapter off) log-probs, the loss, its gradients and the evaluation."""
    model, tok = _tuned(tiny_llama, TUNINGS["lora"])
    model.eval()
    batch = _pairs(tok)
    cfg = lambda chunk: dpo.Config(loss=loss, loss_chunk=chunk)  # noqa: E731
    full, chunked = _both(model, lambda chunk: (dpo.loss(model, batch, cfg(chunk)).total,
                                                *dpo.sequence_logps(model, batch, chunk)[:2],
                                                *dpo.reference_logps(model, batch, chunk)))
    _assert_same(full, chunked)
    with torch.no_grad():
        a, b = dpo.eval_step(model, batch, cfg(0)), dpo.eval_step(model, batch, cfg(CHUNK))
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("hidden_weight", [0.0, 0.5])
def test_distilled_loss_gradients_and_agreement_equal_the_full_logits(tmp_path, hidden_weight):
    """Token-level distillation: the task loss and the KL from the student's chunked logits, the cosine term on
    its hidden states; and `teacher_agreement` in evaluation."""
    from transformers import AutoModelForCausalLM

    from tunesmith.objectives.distill import DistillConfig, Distilled, Teacher

    teacher = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "t", "llama", seed=1))
    student = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "s", "llama", seed=2)).eval()
    sft = OBJECTIVES["sft"]
    wrapped = Distilled(sft, Teacher(teacher, "causal-lm"),
                        DistillConfig(teacher="x", temperature=2.0, alpha=0.25, hidden_weight=hidden_weight,
                                      chunk_tokens=4))
    batch = _batch(False)
    cfg = lambda chunk: sft.Config(loss_chunk=chunk)  # noqa: E731
    full, chunked = _both(student, lambda chunk: wrapped.loss(student, batch, cfg(chunk)).total)
    _assert_same(full, chunked)
    a, b = wrapped.eval_step(student, batch, cfg(0)), wrapped.eval_step(student, batch, cfg(CHUNK))
    assert b["agree"] == a["agree"] and sum(a["agree"]) > 0
    assert b["loss_sum"] == pytest.approx(a["loss_sum"], rel=1e-5)


def test_held_out_scores_equal_the_full_logits(tiny_llama):
    """evaluate/score.py over a split, and the forgetting probe's language-model loss (default chunking)."""
    from tunesmith.evaluate.score import evaluate

    model, _ = _tuned(tiny_llama, TUNINGS["lora"])
    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (5, 9, 12, 7, 11):
        ids = torch.randint(6, 40, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    clm = OBJECTIVES["clm"]
    full = evaluate(model, clm, clm.Config(loss_chunk=0), examples, 2, 0)
    chunked = evaluate(model, clm, clm.Config(loss_chunk=CHUNK), examples, 2, 0)
    assert chunked == pytest.approx(full, rel=1e-5)
    batch = collate(examples, 0)
    model.eval()  # as the probe measures
    with torch.no_grad():
        torch.testing.assert_close(lm_losses(model, batch, "causal-lm")[0], lm_losses(model, batch, "causal-lm", 0)[0])


def _logit_sized_saved(model, vocab: int, run) -> int:
    """Elements of the tensors of vocabulary width (last dimension) that autograd still holds for backward when
    the forward pass is over, weights (and views of them) left out."""
    import weakref

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack_hook(t):
        storage = t.untyped_storage()
        if t.dim() >= 2 and t.shape[-1] == vocab and storage.data_ptr() not in weights:
            saved.append((weakref.ref(t), storage.data_ptr(), storage.nbytes() // t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        loss = run()
    alive = {ptr: n for ref, ptr, n in saved if ref() is not None}
    loss.backward()
    return sum(alive.values())


@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "lm_head"]], ids=["frozen-head", "lora-on-head"])
def test_chunked_loss_keeps_no_logits_for_backward(tiny_llama, targets):
    """Training mode, LoRA (with dropout, on the output layer too in one case): the chunked path is taken (the
    check of the first batch draws the same dropout mask as the model's call), and what backward keeps of
    vocabulary width is at most one position per row, where the full path keeps every position's logits."""
    model, _ = _tuned(tiny_llama, {"kind": "lora", "r": 4, "dropout": 0.5, "targets": targets})
    model.train()
    vocab = model.get_output_embeddings().out_features
    batch = _batch(False)
    rows, width = batch["input_ids"].shape
    full = _logit_sized_saved(model, vocab, lambda: causal_lm_forward(model, batch, 0)[0].sum())
    for _ in range(2):  # the first batch (checked) and a later one
        chunked = _logit_sized_saved(model, vocab, lambda: causal_lm_forward(model, batch, CHUNK)[0].sum())
        assert chunked <= rows * vocab
    assert full >= rows * width * vocab


def test_a_model_whose_logits_are_not_its_output_layer_uses_the_full_logits(tiny_llama):
    """Logits scaled after the output layer (as Gemma 2's soft-capping or a logit scale do): the first batch
    finds it, and the loss is the model's own, from its full logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()

    def scale(module, args, output):
        output.logits = output.logits * 3.0
        return output

    model.register_forward_hook(scale)
    batch = _batch(False)
    full, chunked = _both(model, lambda chunk: causal_lm_forward(model, batch, chunk)[0])
    _assert_same(full, chunked)
    assert _logit_sized_saved(model, model.config.vocab_size,
                              lambda: causal_lm_forward(model, batch, CHUNK)[0].sum()) > 0
