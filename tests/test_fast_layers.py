"""The CPU dropout (models/dropout.py) and the fused LoRA forward (tuning/fused_lora.py): the same layer as torch's
and peft's, in distribution and in value."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tunesmith.models.dropout import Dropout, dropout, swap_dropout
from tunesmith.tuning.fused_lora import fuse


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.6])
def test_dropout_drops_each_element_with_probability_p_and_keeps_the_mean(p):
    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    out = dropout(x, p)
    dropped = (out == 0).float()
    n = x.numel()
    assert abs(dropped.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial share
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))
    assert abs(out.mean().item() - 1) < 0.01
    # independent positions: the drop rate of each row and column spreads like a binomial's, no clumping
    rows = dropped.mean(1)
    assert rows.std().item() == pytest.approx(math.sqrt(p * (1 - p) / 1000), rel=0.25)


def test_dropout_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    out = dropout(x, 0.2)
    out.backward(torch.ones_like(out))
    kept = out != 0
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.8))
    assert torch.allclose(out[kept], x[kept] / 0.8)


def test_dropout_repeats_with_the_seed_and_leaves_its_input_alone():
    x = torch.randn(10, 50)
    before = x.clone()
    torch.manual_seed(3)
    a = dropout(x, 0.1)
    torch.manual_seed(3)
    b = dropout(x, 0.1)
    assert torch.equal(a, b) and torch.equal(x, before)


def test_dropout_layer_is_identity_in_eval_and_at_p_zero():
    layer = Dropout(0.5)
    x = torch.randn(4, 8)
    assert layer.eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    assert (layer.train()(torch.ones(1000)) == 0).any()


def test_swap_replaces_plain_dropout_layers_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.ModuleDict({"a": nn.Dropout(0.2)}), nn.Dropout2d(0.3))
    assert swap_dropout(model) == 2
    assert type(model[1]) is Dropout and model[1].p == 0.1
    assert type(model[2]["a"]) is Dropout and model[2]["a"].p == 0.2
    assert type(model[3]) is nn.Dropout2d
    assert isinstance(model[1], nn.Dropout)  # still found by code that looks for dropout layers by type


def test_checkpointing_replays_the_same_dropout():
    """Non-reentrant checkpointing restores the random state before recomputing: the same positions drop, so the
    gradients equal those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 32), Dropout(0.3), nn.Linear(32, 16))
    x = torch.randn(8, 16)
    torch.manual_seed(5)
    block(x).square().sum().backward()
    plain = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    torch.manual_seed(5)
    checkpoint(block, x, use_reentrant=False).square().sum().backward()
    for a, p in zip(plain, block.parameters()):
        assert torch.allclose(a, p.grad)


def _lora_pair(tiny_llama, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", **lora))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter something to add
            param.data.normal_(0, 0.2)
    fused = copy.deepcopy(model)
    assert fuse(fused) > 0
    return model.eval(), fused.eval()


def test_fused_lora_gives_peft_values_and_gradients(tiny_llama):
    peft_model, fused = _lora_pair(tiny_llama)
    ids = torch.randint(5, 60, (3, 9))
    a, b = peft_model(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    for n, p in fused.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_fused_lora_falls_back_to_peft_off_its_path(tiny_llama):
    """The adapter switched off (dpo's reference), merged, or a DoRA variant: peft's own forward runs."""
    peft_model, fused = _lora_pair(tiny_llama)
    ids = torch.randint(5, 60, (2, 7))
    with torch.no_grad():
        with peft_model.disable_adapter(), fused.disable_adapter():
            base_only = fused(input_ids=ids).logits
            assert torch.equal(peft_model(input_ids=ids).logits, base_only)
        tuned = peft_model(input_ids=ids).logits
        assert not torch.allclose(base_only, tuned, atol=1e-3)  # the adapter adds something
        fused.merge_adapter()
        assert torch.allclose(fused(input_ids=ids).logits, tuned, atol=1e-5)
        fused.unmerge_adapter()
        assert torch.allclose(fused(input_ids=ids).logits, tuned, atol=1e-5)
    dora, dora_fused = _lora_pair(tiny_llama, use_dora=True)
    with torch.no_grad():
        assert torch.allclose(dora(input_ids=ids).logits, dora_fused(input_ids=ids).logits, atol=1e-6)


def test_fused_lora_takes_its_own_path_when_it_can(tiny_llama, monkeypatch):
    from peft.tuners.lora.layer import Linear

    _, fused = _lora_pair(tiny_llama)
    calls = []
    original = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    ids = torch.randint(5, 60, (2, 7))
    with torch.no_grad():
        fused(input_ids=ids)
        assert calls == []
        with fused.disable_adapter():
            fused(input_ids=ids)
    assert calls
