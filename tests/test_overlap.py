"""No scoring on trained rows: `eval` and `compare` leave out the rows of --data that the run trained on (exact
copies through the run folder's train_rows.json, near copies through the training checks' leakage check), say
how many, and keep them only with --allow-train-overlap (a warning in the output and the JSON)."""

from __future__ import annotations

import json

import pytest

from tunesmith.cli import main
from tiny import FILLER, classify_config, instruction_rows, sentiment_rows, sft_config, write_jsonl


def long_rows(n: int, seed: int) -> list[dict]:
    """Rows of 14 words (long enough for the near-copy check, which skips texts under 10 words)."""
    import random

    rng = random.Random(seed)
    return [{"text": " ".join(rng.sample(FILLER, 13) + [label]), "label": label}
            for label in (["good"] * (n // 2) + ["bad"] * (n - n // 2))]


@pytest.fixture()
def classify_run(in_tmp, tiny_bert):
    """A tiny classifier trained on train.jsonl (2 steps: the model's quality does not matter here)."""
    data = in_tmp / "data"
    train = sentiment_rows(24, 11) + long_rows(4, 12)
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "validation.jsonl", sentiment_rows(8, 13))
    write_jsonl(data / "test.jsonl", sentiment_rows(8, 14))
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, data)
    assert main(["train", str(cfg), "train.max_steps=2", "eval.compare_base=false"]) == 0
    return in_tmp / "runs" / "tiny", train


def _eval(run, data, capsys, *flags):
    capsys.readouterr()
    code = main(["eval", str(run), "--data", str(data), *flags])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_eval_on_the_training_file_leaves_the_trained_rows_out_and_says_how_many(classify_run, in_tmp, capsys):
    run, train = classify_run
    assert (run / "train_rows.json").exists()
    fresh = [r for r in sentiment_rows(12, 99) if r not in train]
    near = dict(train[-1], text=train[-1]["text"].replace(train[-1]["text"].split()[0], "different"))  # 1 word changed
    mixed = write_jsonl(in_tmp / "mixed.jsonl", train + [near] + fresh)
    n_trained = len(train) + 1

    code, scores, err = _eval(run, mixed, capsys)
    assert code == 0
    assert f"excluded {n_trained} of {len(mixed.read_text().splitlines())} rows that" in err
    assert "--allow-train-overlap keeps them" in err
    assert scores["rows"] == len(fresh)
    assert scores["train_overlap"] == {"rows": n_trained, "of": n_trained + len(fresh), "excluded": True,
                                       "checked": "exact and near copies"}

    # kept on request, with the warning in the JSON and on stderr
    code, scores, err = _eval(run, mixed, capsys, "--allow-train-overlap")
    assert code == 0 and scores["rows"] == n_trained + len(fresh)
    assert scores["train_overlap"]["excluded"] is False and scores["train_overlap"]["rows"] == n_trained
    assert "flatter the model" in scores["train_overlap"]["warning"] and "warning:" in err

    # the training file alone: nothing left to score is an error, not an empty score
    code, _, err = _eval(run, in_tmp / "data" / "train.jsonl", capsys)
    assert code == 2 and "every row of" in err and "--allow-train-overlap" in err

    # held-out data: nothing excluded, nothing said
    code, scores, err = _eval(run, in_tmp / "data" / "test.jsonl", capsys)
    assert code == 0 and scores["rows"] == 8 and scores["train_overlap"]["rows"] == 0 and "excluded" not in err


def test_near_copies_are_found_only_while_the_training_data_can_be_read(classify_run, in_tmp, capsys):
    run, train = classify_run
    near = dict(train[-1], text=train[-1]["text"].replace(train[-1]["text"].split()[0], "different"))
    data = write_jsonl(in_tmp / "near.jsonl", [near, *train[:2], *sentiment_rows(4, 98)])
    (in_tmp / "data" / "train.jsonl").rename(in_tmp / "data" / "moved.jsonl")
    code, scores, _ = _eval(run, data, capsys)
    assert code == 0 and scores["train_overlap"]["checked"] == "exact copies"
    assert scores["train_overlap"]["rows"] == 2 and scores["rows"] == 5  # the near copy is not caught from digests


def test_a_run_without_a_record_of_its_rows_is_said_to_be_unchecked(classify_run, in_tmp, capsys):
    run, _ = classify_run
    (run / "train_rows.json").unlink()  # as a run from before the record was kept
    code, scores, err = _eval(run, in_tmp / "data" / "train.jsonl", capsys)
    assert code == 0 and scores["train_overlap"] == {"checked": False} and scores["rows"] == 28
    assert err.count("keeps no record of its training rows") == 1


def test_compare_leaves_trained_rows_out_before_taking_its_prompts(in_tmp, tiny_llama, capsys):
    data = in_tmp / "instructions"
    train = instruction_rows(24, 1)
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "validation.jsonl", instruction_rows(4, 2))
    write_jsonl(data / "test.jsonl", instruction_rows(4, 3))
    cfg = sft_config(in_tmp / "s.yaml", tiny_llama, data, extra="")
    assert main(["train", str(cfg), "train.max_steps=2", "eval.compare_base=false", "eval.generate.prompts=0"]) == 0
    run = in_tmp / "runs" / "sft"
    fresh = [r for r in instruction_rows(6, 97) if r not in train]
    held = write_jsonl(in_tmp / "held.jsonl", train[:5] + fresh)
    capsys.readouterr()
    assert main(["compare", str(tiny_llama), str(run), "--data", str(held), "--prompts", "2",
                 "--max-new-tokens", "2", "--out", str(in_tmp / "report")]) == 0
    assert "excluded 5 of" in capsys.readouterr().err
    report = json.loads((in_tmp / "report" / "compare.json").read_text())
    assert [r["messages"][-1]["content"] for r in report["rows"]] == [r["instruction"] for r in fresh[:2]]
    assert report["train_overlap"]["rows"] == 5 and report["train_overlap"]["excluded"] is True
