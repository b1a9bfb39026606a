"""PPO's pieces against independent computations, and tiny end-to-end runs with a function reward."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiny import ppo_config
from tunesmith.objectives import ppo


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """GAE written from the paper's definition: A_t = sum_l (gamma lam)^l delta_{t+l}, V after the end = 0."""
    T = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < T else 0.0) - values[t] for t in range(T)]
    adv = [sum((gamma * lam) ** l * deltas[t + l] for l in range(T - t)) for t in range(T)]
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_matches_its_definition_and_ignores_padding():
    rewards = torch.tensor([[0.1, -0.2, 1.5], [0.3, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.4, -0.3, 99.0]])  # 99: a padded position, must not leak in
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for row, length in ((0, 3), (1, 2)):
        want_adv, want_ret = reference_gae(rewards[row, :length].tolist(), values[row, :length].tolist(), 0.9, 0.8)
        assert adv[row, :length].tolist() == pytest.approx(want_adv, abs=1e-6)
        assert ret[row, :length].tolist() == pytest.approx(want_ret, abs=1e-6)
    assert adv[1, 2] == 0 and ret[1, 2] == 0


def test_gae_with_lambda_one_gives_discounted_returns():
    rewards, values, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.7, -1.0, 4.0]]), torch.ones(1, 3)
    _, ret = ppo.gae(rewards, values, mask, gamma=0.5, lam=1.0)
    assert ret[0].tolist() == pytest.approx([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0])


def test_kl_penalty_on_every_token_and_score_at_the_last_answer_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.4, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -1.4, -1.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    rewards, kl = ppo.token_rewards(torch.tensor([2.0, 3.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.0, -0.1 + 3.0, 0.0]]))


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    loss, frac = ppo.policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: ratio 1.5, A>0 -> clipped to 1.2; token 1: ratio 0.5, A<0 -> clipped 0.8; token 2: inside the range
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 1.1) / 3)
    assert float(frac) == pytest.approx(2 / 3)


def test_clipped_value_loss_by_hand():
    old, returns = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]])
    values = torch.tensor([[0.5, 0.1]])
    loss, frac = ppo.value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: v 0.5 -> clipped 0.2: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: inside: (0.1+1)^2 = 1.21
    assert float(loss) == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert float(frac) == pytest.approx(0.5)


def test_whitened_advantages_have_zero_mean_unit_variance_on_the_answer_tokens():
    x, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 0.0]]), torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    w = ppo.whiten(x, mask)
    kept = w[mask.bool()]
    assert float(kept.mean()) == pytest.approx(0, abs=1e-6) and float(kept.var(unbiased=False)) == pytest.approx(1, 1e-4)
    assert w[1, 1] == 0


def test_adaptive_kl_controller_follows_ziegler():
    cfg = ppo.KLConfig(coef=0.1, target=4.0, horizon=100)
    c = ppo.KLController(cfg)
    c.update(kl=10.0, n=16)  # error clipped at +0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 16 / 100))
    c2 = ppo.KLController(cfg)
    c2.update(kl=3.6, n=16)  # error -0.1
    assert c2.value == pytest.approx(0.1 * (1 - 0.1 * 16 / 100))
    fixed = ppo.KLController(ppo.KLConfig(coef=0.1, adaptive=False))
    fixed.update(kl=100.0, n=16)
    assert fixed.value == 0.1


def test_forward_scores_answer_tokens_as_the_model_predicts_them(tiny_llama):
    from transformers import AutoModelForCausalLM

    from tunesmith.train.ppo import PolicyAndValue, assemble, forward, single_turn

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    r = assemble(*single_turn(prompts, answers), pad_id=0, device="cpu")
    logp, _, values = forward(PolicyAndValue(model), r)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        full = model(input_ids=torch.tensor([p + a])).logits[0].log_softmax(-1)
        want = [float(full[len(p) - 1 + j, tok].detach()) for j, tok in enumerate(a)]
        assert logp[i, :len(a)].tolist() == pytest.approx(want, abs=1e-5)
    assert r.mask.tolist() == [[1, 1, 0], [1, 1, 1]] and values.shape == (2, 3)


def test_reference_is_the_start_without_a_copy_for_lora(tiny_llama):
    from transformers import AutoModelForCausalLM

    from tunesmith.train.ppo import PolicyAndValue, assemble, forward, make_reference, single_turn
    from tunesmith.tuning import TUNINGS

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    r = assemble(*single_turn([[5, 6, 7]], [[10, 11]]), 0, "cpu")
    start = forward(PolicyAndValue(base), r, values=False)[0]
    pv = PolicyAndValue(TUNINGS["lora"].apply(base, TUNINGS["lora"].Config(), "causal-lm"))
    with torch.no_grad():
        for n, p in pv.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # the adapter now changes the policy
    reference = make_reference(pv)
    assert not torch.allclose(forward(pv, r, values=False)[0], start)
    assert torch.allclose(reference(r), start, atol=1e-6)
    assert sum(p.numel() for p in pv.parameters()) < 2 * sum(p.numel() for p in base.parameters())


def test_reward_function_that_does_not_import_names_the_key(in_tmp, tiny_llama, sentiment_dir):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.run import train

    cfg = load_config(ppo_config(in_tmp / "p.yaml", tiny_llama, sentiment_dir),
                      ['objective.reward.function="no_such_module:f"'])
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert "objective.reward.function" in str(e.value.render()) and "no_such_module" in str(e.value.render())
    assert not (in_tmp / "runs" / "ppo").exists()


def test_reward_needs_exactly_one_source(in_tmp, tiny_llama, sentiment_dir):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly one of run"):
        load_config(ppo_config(in_tmp / "p.yaml", tiny_llama, sentiment_dir), ["objective.reward.run=runs/x"])


@pytest.mark.parametrize("tuning", ["{kind: full}", "{kind: lora, r: 8, alpha: 64, dropout: 0.0}"])
def test_tiny_ppo_raises_a_function_reward_while_kl_stays_bounded(in_tmp, tiny_llama, sentiment_dir, tuning):
    from tunesmith.config import load_config
    from tunesmith.run import train

    lr = [] if "full" in tuning else ["train.lr=2.0e-2"]
    summary = train(load_config(ppo_config(in_tmp / "p.yaml", tiny_llama, sentiment_dir, tuning), lr))
    before, after = summary["base"]["test"], summary["test"]
    assert before["kl"] == pytest.approx(0, abs=1e-4)  # the start is the reference
    # a full policy learns the word in its embeddings; a LoRA policy of this tiny random model moves less (its
    # frozen tied embeddings keep the logits near uniform), but clearly
    assert after["reward"] > before["reward"] + (1.0 if "full" in tuning else 0.25), (before, after)
    assert 0 < after["kl"] < summary["kl_bound"]
    log = [json.loads(l) for l in (in_tmp / "runs" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in log] == list(range(5, 41, 5))
    for key in ("score", "kl", "kl_coef", "entropy", "clip_frac", "value_loss", "policy_loss", "approx_kl",
                "answer_tokens"):
        assert all(math.isfinite(l[key]) for l in log), key
    assert log[-1]["score"] > log[0]["score"]


def test_ppo_killed_after_a_checkpoint_resumes_to_the_same_end(in_tmp, tiny_llama, sentiment_dir):
    import signal

    from safetensors.torch import load_file
    from test_stages import KILLER, cli

    cfg = ppo_config(in_tmp / "p.yaml", tiny_llama, sentiment_dir, extra="")
    cfg.write_text(cfg.read_text().replace("max_steps: 40", "max_steps: 12").replace("log_every: 5", "log_every: 2, "
                                                                                     "save_every: 4"))
    whole = cli(["train", str(cfg), "name=whole"], in_tmp)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = cli(["train", str(cfg), "name=killed"], in_tmp, {"KILL_IN": "killed", "KILL_AT_STEP": "8"}, KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = cli(["train", str(cfg), "name=killed", "--resume"], in_tmp)
    assert resumed.returncode == 0 and "resuming from step 8" in resumed.stdout, resumed.stderr[-3000:]

    a, b = in_tmp / "runs" / "whole", in_tmp / "runs" / "killed"
    wa, wb = (load_file(r / "model" / "model.safetensors") for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final policy weights differ"
    va, vb = (load_file(r / "value_head.safetensors") for r in (a, b))
    assert all(torch.equal(va[k], vb[k]) for k in va)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["test"] == sb["test"] and sa["base"] == sb["base"] and sa["train"]["kl_coef"] == sb["train"]["kl_coef"]

    def log(run):
        return [{k: v for k, v in json.loads(l).items() if k != "answers_per_s"}
                for l in (run / "metrics.jsonl").read_text().splitlines()]

    assert log(a) == log(b)


def test_a_classifier_run_rewards_with_the_probability_of_its_label(in_tmp, tiny_bert, sentiment_dir):
    from tiny import classify_config
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith import scorers as rewards
    from tunesmith.objectives.ppo import RewardConfig
    from tunesmith.run import train
    from tunesmith.trained import load_trained

    train(load_config(classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir), ["train.max_steps=6"]))
    run = str(in_tmp / "runs" / "tiny")
    prompts = [[{"role": "user", "content": "the movie was"}]] * 2
    answers = ["good and fun", "dull and weak"]
    score = rewards.load(RewardConfig(run=run, label="pos"), "cpu")
    logit = rewards.load(RewardConfig(run=run, label="pos", use="logit", text="answer"), "cpu")
    trained = load_trained(run)
    probs = trained.objective.predict(trained.model, trained.tokenizer, [f"the movie was {a}" for a in answers],
                                      trained.data_cfg)
    assert score(prompts, answers) == pytest.approx([p["scores"]["pos"] for p in probs], abs=1e-4)
    enc = trained.tokenizer(answers, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = trained.model(**enc).logits[:, trained.obj_cfg.labels.index("pos")]
    assert logit(prompts, answers) == pytest.approx(logits.tolist(), abs=1e-4)
    with pytest.raises(ConfigError, match="'positive' is not one of them") as e:
        rewards.load(RewardConfig(run=run, label="positive"), "cpu")
    assert e.value.where == "objective.reward.label"


def test_ppo_refuses_gradient_accumulation(in_tmp, tiny_llama, sentiment_dir):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.grad_accum\)?: ppo"):
        load_config(ppo_config(in_tmp / "p.yaml", tiny_llama, sentiment_dir), ["train.grad_accum=2"])


@pytest.mark.parametrize("override", ["train.eval_every=4", "train.early_stopping.patience=2", "train.precision=bf16",
                                      "regime.kind=continual"])
def test_ppo_refuses_settings_its_loop_does_not_take(override, in_tmp, tiny_llama, sentiment_dir):
    """Refused at the config check, not silently ignored."""
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    key = override.split("=")[0].rsplit(".", 1)[0] if "early_stopping" in override else override.split("=")[0]
    overrides = [override] + (["regime.penalty.kind=l2sp"] if "regime" in override else [])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ppo_config(in_tmp / "p.yaml", tiny_llama, sentiment_dir), overrides)
