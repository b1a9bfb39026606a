"""GRPO's pieces against hand-computed values, the reference never asked at beta 0, and tiny end-to-end runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiny import grpo_config
from tunesmith.objectives import grpo


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    s1 = math.sqrt(4 * 0.5 ** 2 / 3) + 1e-4  # first group: mean 0.5, sample std over 4 answers
    s3 = math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 3) + 1e-4  # third group: mean 0.75
    want = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1] + [0.0] * 4 + [2.25 / s3] + [-0.75 / s3] * 3
    assert grpo.group_advantages(scores, 4, "group").tolist() == pytest.approx(want, abs=1e-5)
    # Dr. GRPO: no division by the std
    assert grpo.group_advantages(scores, 4, "none").tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 2.25, -0.75, -0.75, -0.75], abs=1e-6)


def hand_losses(ratios, advantages, clip_lo, clip_hi, kl_terms=None, beta=0.0):
    """Per-token losses from the paper's formula, one list per answer."""
    out = []
    for i, (row, a) in enumerate(zip(ratios, advantages)):
        losses = []
        for t, rho in enumerate(row):
            clipped = min(max(rho, 1 - clip_lo), 1 + clip_hi)
            loss = -min(rho * a, clipped * a)
            if kl_terms is not None:
                q = kl_terms[i][t]
                loss += beta * (math.exp(q) - q - 1)
            losses.append(loss)
        out.append(losses)
    return out


# two answers: 2 tokens (A > 0) and 3 tokens (A < 0); the padded third slot of the first must not count
RATIOS = [[1.5, 0.9], [0.5, 1.1, 1.0]]
ADV = [2.0, -1.0]
Q = [[0.3, -0.2], [0.1, 0.0, -0.4]]  # log pi_ref - log pi per token


def tensors():
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -3.0]])
    ratios = torch.tensor([RATIOS[0] + [1.0], RATIOS[1]])
    logp = old + ratios.log()
    ref = logp + torch.tensor([Q[0] + [0.0], Q[1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logp, old, ref, mask


@pytest.mark.parametrize("agg", ["sequence", "token"])
@pytest.mark.parametrize("beta,clip_high", [(0.0, None), (0.1, None), (0.1, 0.28)])
def test_loss_matches_the_formula_for_each_aggregation(agg, beta, clip_high):
    logp, old, ref, mask = tensors()
    per_token, clipped, kl = grpo.per_token_loss(logp, old, torch.tensor(ADV), 0.2, clip_high,
                                                 ref if beta else None, beta)
    want = hand_losses(RATIOS, ADV, 0.2, clip_high or 0.2, Q if beta else None, beta)
    total, units = grpo.aggregate(per_token, mask, agg)
    if agg == "sequence":  # each answer's token mean, then the mean over answers
        expected = sum(sum(row) / len(row) for row in want) / 2
    else:  # the mean over all 5 answer tokens (DAPO)
        expected = sum(sum(row) for row in want) / 5
    assert float(total / units) == pytest.approx(expected, abs=1e-5)
    # clip active: token 0 of answer 0 (1.5 > 1.2 or 1.28 with A > 0); token 0 of answer 1 (0.5 < 0.8 with A < 0)
    assert clipped[mask.bool()].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert (kl is None) == (beta == 0)


def test_sequence_and_token_aggregation_weigh_long_answers_differently():
    per_token = torch.tensor([[1.0, 0.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    seq, n = grpo.aggregate(per_token, mask, "sequence")
    tok, m = grpo.aggregate(per_token, mask, "token")
    assert float(seq / n) == pytest.approx((1 + 4) / 2) and float(tok / m) == pytest.approx((1 + 16) / 5)


class FixedAnswers:
    """A source whose answers were sampled beforehand: the step's forward passes are then only its own."""

    def __init__(self, batch):
        self.batch = batch

    def sample(self, policy, split, rows, settings, seed, copies=1):
        from dataclasses import replace
        return replace(self.batch, rollout=self.batch.rollout.rows(torch.arange(len(self.batch.rollout))))


def _lora_policy(tiny_llama):
    from transformers import AutoModelForCausalLM

    from tunesmith.train.grpo import wrap
    from tunesmith.tuning import TUNINGS

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    return wrap(TUNINGS["lora"].apply(base, TUNINGS["lora"].Config(), "causal-lm"))


@pytest.mark.parametrize("beta,epochs", [(0.0, 1), (0.1, 1), (0.0, 2)])
def test_forward_passes_counted_beta_zero_asks_no_reference(tiny_llama, beta, epochs):
    from tunesmith.objectives.grpo import Config
    from tunesmith.train import grpo as loop
    from tunesmith.train.rollout import Batch, assemble, make_reference, single_turn

    trainee = _lora_policy(tiny_llama)
    prompts = [[5, 6, 7], [8, 9]] * 4  # 2 prompts x G 4, consecutive per group below
    answers = [[10, 11], [12], [13, 14, 15], [10], [11, 12], [13], [14, 15], [16]]
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    batch = Batch(assemble(*single_turn([prompts[i] for i in order], answers), 0, "cpu"),
                  torch.tensor([1.0, 0.0, 0.0, 2.0, 1.0, 1.0, 0.0, 0.0]), [])
    calls = {"forward": 0, "reference": 0}
    trainee.policy.get_base_model().register_forward_pre_hook(lambda *_: calls.__setitem__("forward",
                                                                                            calls["forward"] + 1))
    real = trainee.policy.disable_adapter

    def counted():
        calls["reference"] += 1
        return real()

    trainee.policy.disable_adapter = counted
    reference = make_reference(trainee.policy)
    obj = Config(reward={"function": "tiny:count_good"}, group_size=4, beta=beta, epochs=epochs, micro_batch=4)
    optimizer = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loop.grpo_step(trainee, reference if beta > 0 else None, FixedAnswers(batch), [0, 1], obj, 0, optimizer,
                   scheduler, 1.0)
    chunks = 2  # 8 answers, micro_batch 4
    updates = epochs * chunks
    old_logp = chunks if epochs > 1 else 0  # one update: the sampled answers' log-probs are the current ones
    assert calls["reference"] == (chunks if beta > 0 else 0)
    assert calls["forward"] == updates + old_logp + calls["reference"]


def test_tiny_grpo_raises_a_function_reward(in_tmp, tiny_llama, sentiment_dir):
    from tunesmith.config import load_config
    from tunesmith.run import train

    summary = train(load_config(grpo_config(in_tmp / "g.yaml", tiny_llama, sentiment_dir)))
    before, after = summary["base"]["test"], summary["test"]
    assert before["kl"] == pytest.approx(0, abs=1e-4)  # the start is the reference
    assert after["reward"] > before["reward"] + 0.5, (before, after)  # measured: 0.0 -> 0.94
    assert 0 < after["kl"] < summary["kl_bound"]
    log = [json.loads(l) for l in (in_tmp / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log] == list(range(5, 31, 5))
    for key in ("reward", "reward_std", "flat_groups", "kl_per_token", "loss", "clip_frac", "entropy", "answer_tokens"):
        assert all(math.isfinite(l[key]) for l in log), key
    assert log[-1]["reward"] > log[0]["reward"]
    assert not (in_tmp / "runs" / "grpo" / "value_head.safetensors").exists()


def test_grpo_at_beta_zero_trains_without_a_reference_and_still_reports_kl(in_tmp, tiny_llama, sentiment_dir,
                                                                          monkeypatch):
    from tunesmith.config import load_config
    from tunesmith.run import train
    from tunesmith.train import grpo as loop

    seen = []
    real = loop.grpo_step
    monkeypatch.setattr(loop, "grpo_step", lambda trainee, reference, *a, **k: seen.append(reference) or
                        real(trainee, reference, *a, **k))
    cfg = grpo_config(in_tmp / "g.yaml", tiny_llama, sentiment_dir, "{kind: lora, r: 8, alpha: 64, dropout: 0.0}",
                      "scale_rewards: none, loss_agg: token")
    summary = train(load_config(cfg, ["objective.beta=0", "train.max_steps=4", "train.lr=2.0e-2"]))
    assert seen == [None] * 4  # the loop was given no reference at all
    assert summary["test"]["kl"] > 0 and summary["base"]["test"]["kl"] == pytest.approx(0, abs=1e-4)


def test_grpo_refuses_what_its_loop_does_not_take(in_tmp, tiny_llama, sentiment_dir):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.grad_accum\)?: grpo"):
        load_config(grpo_config(in_tmp / "g.yaml", tiny_llama, sentiment_dir), ["train.grad_accum=2"])
    with pytest.raises(ConfigError, match="group_size"):
        load_config(grpo_config(in_tmp / "g.yaml", tiny_llama, sentiment_dir), ["objective.group_size=1"])
    with pytest.raises(ConfigError, match="exactly one of objective.reward"):
        load_config(grpo_config(in_tmp / "g.yaml", tiny_llama, sentiment_dir), ["objective.env.kind=arithmetic"])
