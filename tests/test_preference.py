"""Preference learning: pair formats, the reward objective (Bradley-Terry) and dpo (sigmoid, IPO, cDPO).

Loss tests write each published formula out again here, on hand-made numbers, rather than calling the code
under test: Bradley-Terry (Ouyang et al. 2022), DPO (Rafailov et al. 2023), IPO (Azar et al. 2023, with trl's
per-token averaging), conservative DPO / label smoothing (Mitchell 2023; trl's DPOTrainer).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tunesmith.cli import main
from tunesmith.data.formats import FormatError, scored_pairs
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
    from tunesmith.objectives.dpo import Config, metrics

    beta = 0.5
    out = metrics({"chosen_logps": LOGP_C, "rejected_logps": LOGP_R, "ref_chosen_logps": REF_C,
                   "ref_rejected_logps": REF_R, "loss": [0.0] * 4}, Config(beta=beta))
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

    with pytest.raises(ValidationError, match="label_smoothing applies to loss: sigmoid only"):
        Config(loss="ipo", label_smoothing=0.1)


def test_full_tuning_without_precomputed_reference_is_refused(tiny_llama, preference_dir, in_tmp, capsys):
    cfg = preference_config(in_tmp / "c.yaml", tiny_llama, preference_dir, "{kind: full}",
                            "{kind: dpo, precompute_ref: false}")
    assert main(["train", str(cfg)]) == 2
    assert "no adapter to switch off" in capsys.readouterr().err


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
