"""Preference learning: pair formats, the reward objective (Bradley-Terry) and dpo's loss table (sigmoid, IPO,
cDPO, ORPO, SimPO, KTO on unpaired rows).

Loss tests write each published formula out again here, on hand-made numbers, rather than calling the code
under test: Bradley-Terry (Ouyang et al. 2022), DPO (Rafailov et al. 2023), IPO (Azar et al. 2023, with trl's
per-token averaging), conservative DPO / label smoothing (Mitchell 2023; trl's DPOTrainer), ORPO (Hong et al.
2024), SimPO (Meng et al. 2024), KTO (Ethayarajh et al. 2024, with trl's KL estimate). ORPO and SimPO are also
checked against trl's own loss methods on the same log-probs, when trl is installed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tunesmith.cli import main
from tunesmith.data.formats import FormatError, scored_pairs
from tunesmith.objectives import shared_prompt
from tiny import preference_config, preference_rows, write_jsonl


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("preference")
    write_jsonl(d / "train.jsonl", preference_rows(96, 1))
    write_jsonl(d / "validation.jsonl", preference_rows(24, 2))
    write_jsonl(d / "test.jsonl", preference_rows(24, 3))
    return d


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# Formats


def test_scored_rows_pair_the_best_answer_with_every_strictly_worse_one():
    answers = [{"text": "a", "score": 2}, {"text": "b", "score": 5}, {"text": "c", "score": 5},
               {"text": "d", "score": 1.5}]
    assert scored_pairs(answers) == [("b", "a"), ("b", "d")]  # "c" ties with the best: no pair
    assert scored_pairs([{"text": "a", "score": 1}, {"text": "b", "score": 1}]) == []
    with pytest.raises(FormatError, match="response 1 needs 'text' and 'score'"):
        scored_pairs([{"text": "a", "score": 1}, {"text": "b"}])


def test_pairs_render_the_prompt_as_sft_does_and_close_answers_with_end_of_turn(tiny_llama):
    from transformers import AutoTokenizer

    from tunesmith.data.templates import ChatFormat
    from tunesmith.objectives.pairs import encode_pair

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    chat = ChatFormat.build(tok, "auto")
    prompt = [{"role": "user", "content": "the movie was fun"}]
    c_ids, c_labels, r_ids, r_labels, _, cut = encode_pair(chat, prompt, "good", "bad very dull", 64)
    prompt_ids = chat.encode_prompt(prompt)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for ids, labels, answer in ((c_ids, c_labels, "good"), (r_ids, r_labels, "bad very dull")):
        assert ids[:len(prompt_ids)] == prompt_ids  # the prompt generation would use, token for token
        assert all(l == -100 for l in labels[:len(prompt_ids)])
        targets = [t for t in labels if t != -100]
        assert targets == tok(answer, add_special_tokens=False)["input_ids"] + [end]
    assert cut is None


@pytest.mark.parametrize("objective", ["{kind: dpo}", "{kind: reward}"])
def test_rows_without_preference_columns_stop_the_run_naming_the_columns_seen(objective, tiny_llama, in_tmp, capsys):
    data = write_jsonl(in_tmp / "sft.jsonl", [{"instruction": "say hi", "output": "hi"}] * 20)
    cfg = preference_config(in_tmp / "c.yaml", tiny_llama, data, objective=objective)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "alpaca format" in err and "columns found: instruction, output" in err and "chosen" in err


# ---------------------------------------------------------------------------------------------
# reward


def test_bradley_terry_loss_matches_the_formula():
    from tunesmith.objectives.reward import bradley_terry

    chosen, rejected = [1.5, -0.2, 0.0, 3.0], [0.5, 0.7, 0.0, -1.0]
    for center in (0.0, 0.01):
        expected = [-math.log(_sigmoid(c - r)) + center * (c + r) ** 2 for c, r in zip(chosen, rejected)]
        got = bradley_terry(torch.tensor(chosen), torch.tensor(rejected), center)
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_reward_metrics_count_ties_as_half():
    from tunesmith.objectives.reward import Config, metrics

    out = metrics({"chosen": [1.0, 0.0, 2.0, 0.5], "rejected": [0.0, 0.0, 3.0, 0.5], "loss": [0.1] * 4}, Config())
    assert out["accuracy"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert out["margin"] == pytest.approx((1 + 0 - 1 + 0) / 4)


def test_reward_needs_a_sequence_classification_class():
    from transformers import ViTConfig

    from tunesmith.errors import ConfigError
    from tunesmith.objectives.reward import Config, check_model

    with pytest.raises(ConfigError, match="no sequence-classification class"):
        check_model(Config(), ViTConfig())


def test_reward_run_learns_the_preference_and_scores_through_load_trained(tiny_llama, preference_dir, in_tmp):
    from tunesmith.objectives.reward import score
    from tunesmith.trained import load_trained

    cfg = preference_config(in_tmp / "c.yaml", tiny_llama, preference_dir, "{kind: full}", "{kind: reward}",
                            train="{epochs: 3, batch_size: 8, lr: 3.0e-3, eval_every: 8, seed: 0}")
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((in_tmp / "runs" / "tiny" / "summary.json").read_text())
    assert summary["test"]["accuracy"] >= 0.9 > summary["base"]["test"]["accuracy"] + 0.2
    rm = load_trained(in_tmp / "runs" / "tiny")
    rows = preference_rows(8, 7)
    prompts = [r["prompt"] for r in rows] + [[{"role": "user", "content": r["prompt"]}] for r in rows]
    answers = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    scores = score(rm, prompts, answers, batch_size=3)
    assert len(scores) == 16
    assert sum(c > r for c, r in zip(scores[:8], scores[8:])) >= 7
    # batched scores equal one-by-one scores (padding does not move the score)
    assert score(rm, prompts[:1], answers[:1]) == pytest.approx(scores[:1], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# dpo

# hand-made summed log-probs of policy and reference for four pairs, and answer lengths in tokens
LOGP_C, LOGP_R = [-10.0, -22.5, -7.0, -30.0], [-12.0, -20.0, -7.0, -31.5]
REF_C, REF_R = [-11.0, -21.0, -6.5, -30.0], [-11.5, -21.0, -7.5, -30.0]
TOKENS_C, TOKENS_R = [5, 9, 3, 12], [6, 8, 3, 10]


def _dpo(kind: str, beta: float, eps: float = 0.0) -> list[float]:
    """Rafailov et al. (2023) eq. 7; conservative DPO mixes in the flipped label with weight eps;
    IPO (Azar et al. 2023, eq. 17) on per-token averaged log-ratios, as trl computes it."""
    out = []
    for pc, pr, rc, rr, nc, nr in zip(LOGP_C, LOGP_R, REF_C, REF_R, TOKENS_C, TOKENS_R):
        if kind == "ipo":
            h = (pc - rc) / nc - (pr - rr) / nr
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            z = beta * ((pc - rc) - (pr - rr))
            out.append(-(1 - eps) * math.log(_sigmoid(z)) - eps * math.log(_sigmoid(-z)))
    return out


@pytest.mark.parametrize("kind,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.1, 0.2),
                                           ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0)])
def test_dpo_losses_match_the_published_formulas(kind, beta, eps):
    from tunesmith.objectives.dpo import Config, pair_losses

    cfg = Config(beta=beta, loss=kind, label_smoothing=eps)
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    got = pair_losses(t(LOGP_C), t(LOGP_R), t(REF_C), t(REF_R), cfg, t(TOKENS_C), t(TOKENS_R))
    torch.testing.assert_close(got, t(_dpo(kind, beta, eps)), rtol=1e-5, atol=1e-6)


def test_dpo_metrics_are_the_implicit_rewards():
    from tunesmith.objectives.dpo import Config, implicit_rewards, metrics

    beta = 0.5
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    rewards = [implicit_rewards(t(p), t(r), t(n), Config(beta=beta)).tolist()
               for p, r, n in ((LOGP_C, REF_C, TOKENS_C), (LOGP_R, REF_R, TOKENS_R))]
    out = metrics({"chosen_logps": LOGP_C, "rejected_logps": LOGP_R, "chosen_rewards": rewards[0],
                   "rejected_rewards": rewards[1], "loss": [0.0] * 4}, Config(beta=beta))
    chosen = [beta * (p - r) for p, r in zip(LOGP_C, REF_C)]
    rejected = [beta * (p - r) for p, r in zip(LOGP_R, REF_R)]
    margins = [c - r for c, r in zip(chosen, rejected)]  # 1.5, -1.5, -0.75, 0.75
    assert out["reward_accuracy"] == pytest.approx(0.5)
    assert out["reward_margin"] == pytest.approx(sum(margins) / 4)
    assert out["chosen_reward"] == pytest.approx(sum(chosen) / 4)
    assert out["rejected_reward"] == pytest.approx(sum(rejected) / 4)
    assert out["logp_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # -7 vs -7 is a tie


def test_label_smoothing_is_refused_for_ipo():
    from pydantic import ValidationError

    from tunesmith.objectives.dpo import Config

    with pytest.raises(ValidationError, match="label_smoothing applies to loss: sigmoid or simpo only"):
        Config(loss="ipo", label_smoothing=0.1)


def test_full_tuning_without_precomputed_reference_is_refused(tiny_llama, preference_dir, in_tmp, capsys):
    cfg = preference_config(in_tmp / "c.yaml", tiny_llama, preference_dir, "{kind: full}",
                            "{kind: dpo, precompute_ref: false}")
    assert main(["train", str(cfg)]) == 2
    assert "no adapter to switch off" in capsys.readouterr().err


def test_dpo_trains_without_dropout_unless_asked(tiny_llama):
    """As trl's DPOTrainer (disable_dropout=True): the policy's log-probs are then those the reference was computed
    with at the start. `objective.dropout: true` keeps it."""
    from tunesmith.models.dropout import swap_dropout
    from tunesmith.objectives import dpo

    model, _ = _tuned_llama(tiny_llama, {"kind": "lora", "r": 4, "dropout": 0.1})
    swap_dropout(model)
    assert "dropout off in" in dpo.prepare_model(model, dpo.Config(dropout=False))
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    kept, _ = _tuned_llama(tiny_llama, {"kind": "lora", "r": 4, "dropout": 0.1})
    assert dpo.prepare_model(kept, dpo.Config(dropout=True)) is None
    assert any(m.p == 0.1 for m in kept.modules() if isinstance(m, torch.nn.Dropout))


def test_overfit_dpo_is_not_told_to_raise_a_dropout_it_does_not_use(tmp_path):
    from tunesmith.config import RunConfig
    from tunesmith.evaluate.advice import overfitting

    def keys(objective):
        cfg = RunConfig.model_validate({"name": "t", "model": "m", "data": {"train": "-"},
                                        "tuning": {"kind": "lora", "r": 16}, "objective": objective})
        return [c.key for c in overfitting(cfg)]

    assert "tuning.r" in keys({"kind": "dpo"}) and "tuning.dropout" not in keys({"kind": "dpo"})
    assert "tuning.dropout" in keys({"kind": "dpo", "dropout": True})


def _tuned_llama(path, tuning: dict):
    """The tiny llama as a run builds it, with its tuning applied and the adapter moved off its zero start."""
    from transformers import AutoTokenizer

    from tunesmith.config import RunConfig
    from tunesmith.tuning import TUNINGS
    from tunesmith.build import load_base

    cfg = RunConfig.model_validate({"name": "t", "model": str(path), "data": {"train": "-"}, "tuning": tuning,
                                    "objective": {"kind": "dpo"}})
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = TUNINGS[cfg.tuning.kind].apply(load_base(cfg, "causal-lm", {}, torch.float32, tok.pad_token_id),
                                           cfg.tuning, "causal-lm", tok)
    with torch.no_grad():  # LoRA's B and the adapters' up projection start at zero: give them a value
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model, tok


def _pair_batch(tok, n=4, seed=5):
    from types import SimpleNamespace

    from tunesmith.data.collate import collate
    from tunesmith.data.sources import Split
    from tunesmith.objectives.pairs import prepare_pairs

    part = Split(preference_rows(n, seed), "rows")
    data = SimpleNamespace(format="auto", max_length=32)
    examples = prepare_pairs({"train": part}, tok, "auto", None, data).examples["train"]
    return examples, collate(examples, tok.pad_token_id)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_rows_give_the_two_sequence_log_probs_and_gradients(attention, tiny_llama, monkeypatch):
    """An example's prompt once and both answers in one row (objectives/shared_prompt.py): the same log-probs,
    answer-token counts and LoRA gradients as the two padded sequences, in fewer positions."""
    from tunesmith.objectives import dpo

    model, tok = _tuned_llama(tiny_llama, {"kind": "lora", "r": 4, "dropout": 0.0})
    model.get_base_model().config._attn_implementation = attention
    _, batch = _pair_batch(tok, n=6)
    model.train()
    assert shared_prompt.supported(model)
    lay = shared_prompt.layout(batch, "rejected_")
    assert lay.ids.numel() < batch["input_ids"].numel() + batch["rejected_input_ids"].numel()

    def run():
        model.zero_grad()
        out = dpo.sequence_logps(model, batch, chunk=7)
        (out[0].sum() - 2 * out[1].sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared, shared_grads = run()
    monkeypatch.setattr(shared_prompt, "supported", lambda model: False)
    separate, separate_grads = run()
    for a, b in zip(shared, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert shared_grads.keys() == separate_grads.keys() and shared_grads
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, separate_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_training_batches_group_pairs_by_their_shared_row_length(tiny_llama):
    """dpo's `example_length` (what the loop groups training batches by) is the positions of the pair's one row:
    both sequences with the prompt counted once."""
    from tunesmith.objectives import dpo

    _, tok = _tuned_llama(tiny_llama, {"kind": "lora", "r": 4})
    examples, batch = _pair_batch(tok, n=5)
    lay = shared_prompt.layout(batch, "rejected_")
    rows = (lay.segments >= 0).sum(1).tolist()
    assert [dpo.example_length(e, dpo.Config()) for e in examples] == rows
    assert all(r < len(e["input_ids"]) + len(e["rejected_input_ids"]) for r, e in zip(rows, examples))


def test_shared_prompt_is_not_used_where_it_cannot_be(tiny_llama):
    """Prompt tuning prepends virtual tokens (a custom mask would not cover them); a batch where an example's two
    sequences share no prompt token has no row layout."""
    prompt_tuned, tok = _tuned_llama(tiny_llama, {"kind": "prompt", "tokens": 3})
    assert not shared_prompt.supported(prompt_tuned)
    _, batch = _pair_batch(tok)
    batch["rejected_input_ids"][0, 0] += 1
    assert shared_prompt.layout(batch, "rejected_") is None


@pytest.mark.parametrize("tuning", [{"kind": "lora", "r": 4}, {"kind": "adapter", "reduction_factor": 4},
                                    {"kind": "prefix", "tokens": 3}, {"kind": "prompt", "tokens": 3}],
                         ids=["lora", "adapter", "prefix", "prompt"])
def test_dpo_reference_is_the_policy_weights_with_the_adapter_off(tuning, tiny_llama):
    """During a training step every module that runs holds the policy's own tensors (a deepcopy or a second
    load of the base would run modules with other storage), and the reference computed that way is exactly
    the untuned base model."""
    from transformers import AutoModelForCausalLM

    from tunesmith.objectives import dpo

    model, tok = _tuned_llama(tiny_llama, tuning)
    _, batch = _pair_batch(tok)
    shared_prompt.supported(model)  # its once-per-model check runs the model on its own: not inside the step
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    ran, calls = set(), []

    def record(module, args, output):
        calls.append(type(module).__name__)
        ran.update(t.data_ptr() for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        model.train()
        out = dpo.loss(model, batch, dpo.Config(beta=0.1))
        out.total.backward()
    finally:
        hook.remove()
    assert ran and ran <= own, "a module outside the policy ran: the reference must not be a copy"
    assert calls.count("LlamaModel") == 2  # reference (adapter off) and policy
    assert out.count == 4 and torch.isfinite(out.total)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.eval()
    ref_c, ref_r = dpo.reference_logps(model, batch)
    base_c, base_r, _, _ = dpo.sequence_logps(base, batch)
    torch.testing.assert_close(ref_c, base_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_r, base_r, rtol=0, atol=1e-5)
    policy_c, _, _, _ = dpo.sequence_logps(model, batch)
    assert not torch.allclose(policy_c, base_c, atol=1e-3)  # the adapter is on again after the reference


def test_precomputed_reference_is_stored_and_training_runs_one_forward(tiny_llama):
    from tunesmith.data.collate import collate
    from tunesmith.objectives import dpo

    model, tok = _tuned_llama(tiny_llama, {"kind": "full"})
    examples, _ = _pair_batch(tok, n=6)
    assert dpo.reference_switch(model) is None and dpo.uses_precomputed(model, dpo.Config())
    base_c, base_r, _, _ = dpo.sequence_logps(model.eval(), collate(examples, tok.pad_token_id))
    dpo.attach_reference(model, {"train": examples}, dpo.Config(), 4, tok.pad_token_id)
    torch.testing.assert_close(torch.tensor([e["ref_chosen_logps"] for e in examples]), base_c.detach(),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor([e["ref_rejected_logps"] for e in examples]), base_r.detach(),
                               rtol=0, atol=1e-5)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    out = dpo.loss(model.train(), collate(examples, tok.pad_token_id), dpo.Config())
    hook.remove()
    assert len(calls) == 1 and out.total.item() == pytest.approx(6 * math.log(2), rel=1e-4)


@pytest.mark.parametrize("tuning", ["{kind: full}", "{kind: lora, r: 4}"])
def test_eval_of_a_finished_dpo_run_scores_against_its_starting_model(tuning, tiny_llama, preference_dir, in_tmp,
                                                                      capsys):
    """`tunesmith eval` repeats the run's own test scores: a full run reloads its starting model as the
    reference (it has no adapter to switch off), a LoRA run switches its adapter off."""
    cfg = preference_config(in_tmp / "c.yaml", tiny_llama, preference_dir, tuning)
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((in_tmp / "runs" / "tiny" / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(in_tmp / "runs" / "tiny"), "--data", str(preference_dir / "test.jsonl")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert summary["test"]["reward_accuracy"] > 0.5  # it learned, so a wrong reference would show
    for key in ("loss", "reward_accuracy", "reward_margin"):
        assert scores[key] == pytest.approx(summary["test"][key], abs=1e-4), key


# ---------------------------------------------------------------------------------------------
# Reference-free losses (orpo, simpo) and kto


def _log1mexp(x: float) -> float:
    return math.log(1 - math.exp(x))


def _orpo_simpo(kind: str, beta: float, gamma: float = 0.5, eps: float = 0.0) -> list[float]:
    """ORPO (Hong et al. 2024, eqs. 2-7): the chosen answer's per-token NLL minus lambda log sigmoid of the log
    odds ratio of the per-token averaged probabilities; SimPO (Meng et al. 2024, eq. 6): -log sigmoid of the
    beta-scaled difference of per-token averaged log-probs minus the margin gamma (trl's label smoothing)."""
    out = []
    for pc, pr, nc, nr in zip(LOGP_C, LOGP_R, TOKENS_C, TOKENS_R):
        ac, ar = pc / nc, pr / nr
        if kind == "orpo":
            log_odds = (ac - _log1mexp(ac)) - (ar - _log1mexp(ar))
            out.append(-ac - beta * math.log(_sigmoid(log_odds)))
        else:
            z = beta * (ac - ar) - gamma
            out.append(-(1 - eps) * math.log(_sigmoid(z)) - eps * math.log(_sigmoid(-z)))
    return out


@pytest.mark.parametrize("kind,beta,gamma,eps", [("orpo", 0.1, None, 0.0), ("orpo", 1.0, None, 0.0),
                                                 ("simpo", 2.0, None, 0.0), ("simpo", 2.5, 1.2, 0.0),
                                                 ("simpo", 2.0, 0.3, 0.1)])
def test_orpo_and_simpo_losses_match_the_papers_without_a_reference(kind, beta, gamma, eps):
    from tunesmith.objectives.dpo import Config, pair_losses

    cfg = Config(beta=beta, loss=kind, gamma=gamma, label_smoothing=eps)
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    got = pair_losses(t(LOGP_C), t(LOGP_R), None, None, cfg, t(TOKENS_C), t(TOKENS_R))
    want = _orpo_simpo(kind, beta, 0.5 if gamma is None else gamma, eps)
    torch.testing.assert_close(got, t(want), rtol=1e-5, atol=1e-6)


def test_orpo_and_simpo_losses_equal_trls_on_the_same_log_probs():
    """trl's ORPOTrainer.odds_ratio_loss and CPOTrainer.cpo_loss (loss_type simpo) called on the same averaged
    log-probs (trl averages them itself for these losses); ORPO's total is trl's `nll - losses.mean()`."""
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from tunesmith.objectives.dpo import Config, pair_losses

    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    c, r, nc, nr = t(LOGP_C), t(LOGP_R), t(TOKENS_C), t(TOKENS_R)
    device = SimpleNamespace(device=torch.device("cpu"))
    for beta in (0.1, 0.5):
        odds, *_ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=beta, accelerator=device), c / nc, r / nr)
        ours = pair_losses(c, r, None, None, Config(loss="orpo", beta=beta), nc, nr)
        torch.testing.assert_close(ours, -c / nc - odds, rtol=1e-5, atol=1e-6)
    for beta, gamma, eps in ((2.0, 0.5, 0.0), (2.5, 1.0, 0.2)):
        trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps,
                                  accelerator=device)
        theirs, *_ = CPOTrainer.cpo_loss(trainer, c / nc, r / nr)
        ours = pair_losses(c, r, None, None, Config(loss="simpo", beta=beta, gamma=gamma, label_smoothing=eps), nc, nr)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_kto_loss_matches_the_paper_with_trls_kl_estimate():
    """KTO (Ethayarajh et al. 2024, eq. 7 as trl computes it): z0 = max(0, mean over the batch of the
    mismatched answers' log-ratios), detached; desirable w_d (1 - sigmoid(beta (r - z0))), undesirable
    w_u (1 - sigmoid(beta (z0 - r)))."""
    from tunesmith.objectives.dpo import Config, kto_kl, kto_losses

    logps, ref = [-10.0, -22.5, -7.0, -30.0, -4.0], [-11.0, -21.0, -6.5, -30.0, -6.0]
    kl, ref_kl = [-14.0, -20.0, -9.0, -31.0, -5.0], [-15.0, -20.5, -10.0, -30.0, -5.5]
    desirable = [1, 0, 1, 0, 1]
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    for beta, wd, wu in ((0.1, 1.0, 1.0), (0.5, 1.0, 1.33)):
        z0 = max(0.0, sum(k - rk for k, rk in zip(kl, ref_kl)) / 5)  # (1 + .5 + 1 - 1 + .5) / 5 = 0.4
        want = [wd * (1 - _sigmoid(beta * ((p - q) - z0))) if d else wu * (1 - _sigmoid(beta * (z0 - (p - q))))
                for p, q, d in zip(logps, ref, desirable)]
        cfg = Config(loss="kto", beta=beta, desirable_weight=wd, undesirable_weight=wu)
        z = kto_kl(t(kl), t(ref_kl))
        assert z.item() == pytest.approx(z0)
        torch.testing.assert_close(kto_losses(t(logps), t(ref), torch.tensor(desirable), z, cfg), t(want))
    assert kto_kl(t(kl), t(kl) + 1).item() == 0  # a negative estimate is clamped at zero
    policy = t(kl).requires_grad_()
    assert not kto_kl(policy, t(ref_kl)).requires_grad  # no gradient through the reference point


def test_kto_metrics_compare_pairs_when_rows_came_from_pairs_else_label_signs():
    from tunesmith.objectives.dpo import Config, metrics

    paired = {"logps": [-5.0, -6.0, -8.0, -7.0, -3.0], "rewards": [0.2, -0.1, -0.3, 0.1, 0.4],
              "desirable": [1, 0, 1, 0, 1], "pair": [0, 0, 1, 1, -1], "kl": [0.5] * 5, "loss": [0.4] * 5}
    out = metrics(paired, Config(loss="kto"))
    assert out["reward_accuracy"] == 0.5  # pair 0: 0.2 > -0.1; pair 1: -0.3 < 0.1 (row 4 has no pair)
    assert out["logp_accuracy"] == 0.5 and out["reward_margin"] == pytest.approx((0.3 - 0.4) / 2)
    assert out["chosen_reward"] == pytest.approx(0.1) and out["rejected_reward"] == pytest.approx(0.0)
    assert out["kl"] == 0.5
    alone = dict(paired, pair=[-1] * 5)
    out = metrics(alone, Config(loss="kto"))
    assert out["reward_accuracy"] == pytest.approx(3 / 5)  # the reward has the label's sign in rows 0, 1 and 4
    assert "logp_accuracy" not in out


def _count_forwards(model):
    calls = []
    return calls, model.register_forward_hook(lambda *a: calls.append(1))


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_reference_free_losses_run_no_reference_forward(loss, tiny_llama):
    """With an adapter that could be switched off, orpo and simpo still run the policy once per step and
    nothing before training (dpo, the control, runs twice)."""
    from tunesmith.objectives import dpo

    model, tok = _tuned_llama(tiny_llama, {"kind": "lora", "r": 4})
    examples, batch = _pair_batch(tok)
    inner = model.get_base_model()
    shared_prompt.supported(model)  # its once-per-model check runs the model: not counted as a step's forward
    calls, hook = _count_forwards(inner)
    try:
        dpo.attach_reference(model, {"train": examples}, dpo.Config(loss=loss), 4, tok.pad_token_id)
        assert calls == [] and not any(k.startswith("ref_") for k in examples[0])
        out = dpo.loss(model.train(), batch, dpo.Config(loss=loss))
        assert len(calls) == 1 and torch.isfinite(out.total) and out.count == 4
        dpo.eval_step(model.eval(), batch, dpo.Config(loss=loss))
        assert len(calls) == 2
        dpo.loss(model.train(), batch, dpo.Config(loss="sigmoid"))
        assert len(calls) == 4  # the control: reference (adapter off) and policy
    finally:
        hook.remove()


def test_reference_free_losses_train_the_base_weights_without_precomputing(tiny_llama, preference_dir, in_tmp):
    """Full tuning has no adapter to switch off, but orpo needs no reference: the run trains, and its base
    scores are the starting model's own preference (not 0.5 by construction)."""
    from pydantic import ValidationError

    from tunesmith.objectives.dpo import Config

    cfg = preference_config(in_tmp / "c.yaml", tiny_llama, preference_dir, "{kind: full}",
                            "{kind: dpo, loss: orpo, precompute_ref: false}")
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((in_tmp / "runs" / "tiny" / "summary.json").read_text())
    assert summary["test"]["reward_accuracy"] > summary["base"]["test"]["reward_accuracy"]
    with pytest.raises(ValidationError, match="loss orpo has no reference model"):
        Config(loss="orpo", precompute_ref=True)
    with pytest.raises(ValidationError, match="gamma is simpo's margin"):
        Config(loss="orpo", gamma=0.5)
    with pytest.raises(ValidationError, match="are kto's"):
        Config(loss="simpo", desirable_weight=2.0)


def test_kto_reads_unpaired_rows_and_unpairs_preference_rows(tiny_llama):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from tunesmith.data.sources import Split
    from tunesmith.objectives.unpaired import prepare_unpaired

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    data = SimpleNamespace(format="auto", max_length=32)
    rows = [{"prompt": "the movie", "completion": "good fun", "label": True},
            {"prompt": "the plot", "completion": "bad dull", "label": "false"},
            {"prompt": "the plot", "completion": "fine", "label": 1}]
    prepared = prepare_unpaired({"train": Split(rows, "rows")}, tok, "auto", None, data)
    ex = prepared.examples["train"]
    assert [e["desirable"] for e in ex] == [1, 0, 1] and [e["pair"] for e in ex] == [-1, -1, -1]
    answer = lambda e, key: tok.decode([t for t in e[key] if t != -100])  # noqa: E731
    assert "good fun" in answer(ex[0], "labels")
    # the KL answer: the next row's answer under a different prompt (row 1 -> row 0, skipping row 2's "the plot")
    assert "bad dull" in answer(ex[0], "kl_labels") and "good fun" in answer(ex[1], "kl_labels")
    assert tok.decode(ex[1]["kl_input_ids"]).startswith(tok.decode(ex[1]["input_ids"][:4]))  # its own prompt
    pairs = prepare_unpaired({"test": Split(preference_rows(3, 1), "rows")}, tok, "auto", None, data)
    ex = pairs.examples["test"]
    assert [e["desirable"] for e in ex] == [1, 0, 1, 0, 1, 0] and [e["pair"] for e in ex] == [0, 0, 1, 1, 2, 2]
    assert pairs.card["test"]["desirable"] == 3 and pairs.card["test"]["format"] == "preference"


def test_kto_bad_label_stops_the_run_naming_file_and_line(tiny_llama, in_tmp, capsys):
    rows = [{"prompt": "p one", "completion": "good", "label": True},
            {"prompt": "p two", "completion": "bad", "label": False},
            {"prompt": "p three", "completion": "fine", "label": "maybe"}] * 8
    data = write_jsonl(in_tmp / "kto.jsonl", rows)
    cfg = preference_config(in_tmp / "c.yaml", tiny_llama, data, objective="{kind: dpo, loss: kto}")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "kto.jsonl:3" in err and "label must be true" in err and "'maybe'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("objective", ["{kind: dpo, loss: kto, beta: 0.5}", "{kind: dpo, loss: simpo, beta: 2.0}",
                                       "{kind: dpo, loss: orpo, beta: 0.5}"], ids=["kto", "simpo", "orpo"])
def test_preference_losses_learn_the_preference_on_held_out_pairs(objective, tiny_llama, preference_dir, in_tmp):
    """A short run of each on preference rows (kto: unpaired from them) raises held-out reward accuracy over
    the base's, and the summary holds the usual preference metrics for base and tuned."""
    cfg = preference_config(in_tmp / "c.yaml", tiny_llama, preference_dir, objective=objective)
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((in_tmp / "runs" / "tiny" / "summary.json").read_text())
    tuned, base = summary["test"], summary["base"]["test"]
    # kto learns this tiny task more slowly: 0.58-0.71 held-out over seeds 0-3 (simpo and orpo pass 0.7)
    floor = 0.55 if "kto" in objective else 0.7  # (the base: 0.5 for kto, every margin 0)
    assert tuned["reward_accuracy"] >= max(floor, base["reward_accuracy"])
    assert tuned["reward_margin"] > base["reward_margin"]
    assert tuned["logp_accuracy"] > base["logp_accuracy"]
