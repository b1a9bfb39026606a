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


def test_dpo_on_rows_without_preference_columns_names_the_columns_seen(tiny_llama, in_tmp, capsys):
    data = write_jsonl(in_tmp / "sft.jsonl", [{"instruction": "say hi", "output": "hi"}] * 20)
    cfg = preference_config(in_tmp / "c.yaml", tiny_llama, data, objective="{kind: reward}")
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
    from tunesmith.objectives.reward import Config, check

    with pytest.raises(ConfigError, match="no sequence-classification class"):
        check(Config(), ViTConfig())


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
