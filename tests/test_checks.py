"""Data checks on rows: what counts as the same text, leakage between splits, duplicates, empty rows,
and the truncation and label-balance warnings read from the data card."""

from __future__ import annotations

import pytest

from tunesmith.config import ChecksConfig
from tunesmith.data.checks import DataCheckError, check_card, check_rows, comparable_texts, raise_for_errors
from tunesmith.data.sources import Split

LONG = ("the film moves slowly through a small town where every neighbour keeps a secret and the "
        "detective never quite believes a single word of it")
OTHER = ("a loud cartoon about talking cars that race across the desert for a trophy nobody remembers "
         "and the jokes land only for the youngest viewers")


def splits(train, validation=(), test=()):
    out = {"train": Split([{"text": t, "label": "x"} for t in train], "train.jsonl", list(range(1, len(train) + 1)))}
    for name, rows in (("validation", validation), ("test", test)):
        if rows:
            out[name] = Split([{"text": t, "label": "x"} for t in rows], f"{name}.jsonl", list(range(1, len(rows) + 1)))
    return out


def checks(**leakage) -> ChecksConfig:
    return ChecksConfig(leakage=leakage)


def fillers(n: int, tag: str = "a") -> list[str]:
    """Distinct long texts that share no words with each other, with LONG and OTHER, or with another tag's."""
    return [" ".join(f"{tag}{i}x{j}" for j in range(12)) for i in range(n)]


@pytest.mark.parametrize("row,expect", [
    ({"text": "Plain text."}, {"text": "Plain text."}),
    ({"text": "premise", "text_pair": "hypothesis"}, {"text": "premise\nhypothesis"}),
    ({"instruction": "Name a colour", "input": "warm ones", "output": "red"},
     {"text": "Name a colour\nwarm ones\nred", "prompt": "Name a colour\nwarm ones"}),
    ({"prompt": "2+2?", "completion": "4"}, {"text": "2+2?\n4", "prompt": "2+2?"}),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
     {"text": "hi\nhello", "prompt": "hi"}),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
      "rejected": {"from": "gpt", "value": "bad"}}, {"text": "q\ngood\nbad", "prompt": "q"}),
    ({"review": "no known column"}, {}),
])
def test_comparable_texts_of_each_format(row, expect):
    assert comparable_texts(row) == expect


def test_exact_copies_after_normalising_are_errors_by_default():
    data = splits(train=fillers(20) + ["  The FILM, moves slowly!  "], test=["the film moves slowly", *fillers(3, "t")])
    out, report = check_rows(data, ChecksConfig())
    [leak] = [f for f in report.findings if f.check == "leakage"]
    assert (leak.kind, leak.splits, leak.count, leak.policy, leak.rows) == ("exact", "train~test", 1, "error", [0])
    assert leak.examples[0]["where"] == "test.jsonl:1" and leak.examples[0]["other_where"] == "train.jsonl:21"
    with pytest.raises(DataCheckError) as e:
        raise_for_errors(report)
    assert e.value.where == "data.checks.leakage.exact" and "drop" in e.value.hint
    assert out["train"].rows == data["train"].rows  # error: nothing removed


def test_near_copies_are_found_with_their_similarity_and_warned():
    edited = LONG.replace("slowly", "gently").replace("secret", "grudge")
    data = splits(train=[edited, OTHER, *fillers(30)], test=[LONG, *fillers(2, "t")])
    _, report = check_rows(data, ChecksConfig())
    [leak] = [f for f in report.findings if f.check == "leakage"]
    assert (leak.kind, leak.policy, leak.rows) == ("near", "warn", [0])
    k = ChecksConfig().leakage.shingle
    grams = [{tuple(t.split()[i:i + k]) for i in range(len(t.split()) - k + 1)} for t in (LONG, edited)]
    assert leak.examples[0]["similarity"] == pytest.approx(len(grams[0] & grams[1]) / len(grams[0] | grams[1]), abs=1e-3)
    raise_for_errors(report)  # warn does not stop


def test_short_texts_are_compared_exactly_only():
    """"one of the worst films" vs "one of the best films": short texts sharing a stock phrase are not copies."""
    data = splits(train=["One of the best movies of the year.", *fillers(10)],
                  test=["One of the worst movies of the year.", *fillers(2, "t")])
    _, report = check_rows(data, ChecksConfig())
    assert not report.findings


def test_drop_removes_copies_from_train_and_records_how_many():
    data = splits(train=[LONG, LONG.upper(), OTHER, *fillers(10)], validation=[OTHER, "x " + LONG],
                  test=[LONG, *fillers(2, "t")])
    out, report = check_rows(data, ChecksConfig(leakage={"exact": "drop", "near": "drop"}, duplicates="warn"))
    kept = [r["text"] for r in out["train"].rows]
    assert LONG not in kept and LONG.upper() not in kept and OTHER not in kept
    # validation~test overlap is dropped from validation ("x " + LONG is a near copy of the test row)
    assert report.dropped == {"train": 3, "validation": 1}
    assert out["test"].rows == data["test"].rows  # the test split never changes
    assert [r["text"] for r in out["validation"].rows] == [OTHER]


def test_validation_test_overlap_drops_from_validation():
    data = splits(train=fillers(10), validation=[LONG, OTHER], test=[LONG, *fillers(2, "t")])
    out, report = check_rows(data, checks(exact="drop"))
    assert [r["text"] for r in out["validation"].rows] == [OTHER] and report.dropped == {"validation": 1}


def test_prompt_side_leaks_even_when_answers_differ():
    prompt = "Write a short poem about the sea at night and the lighthouse keeper who waits for the boats"
    train = [{"instruction": prompt, "input": "", "output": OTHER}] + \
        [{"instruction": t, "input": "", "output": "ok"} for t in fillers(10)]
    test = [{"instruction": prompt, "input": "", "output": " ".join(fillers(3, "t"))}]
    data = {"train": Split(train, "train.jsonl"), "test": Split(test, "test.jsonl")}
    _, report = check_rows(data, ChecksConfig())
    leaks = [(f.kind, f.view) for f in report.findings if f.check == "leakage"]
    assert ("exact", "prompt") in leaks and ("exact", "text") not in leaks
    assert "prompt" in [f.message for f in report.findings if f.view == "prompt"][0]


def test_duplicates_within_a_split_and_drop_keeps_the_first_in_train_only():
    near = LONG.replace("detective", "inspector")
    data = splits(train=[LONG, OTHER, LONG.lower(), near, *fillers(5)], test=[OTHER.upper(), OTHER, *fillers(2, "t")])
    out, report = check_rows(data, ChecksConfig(duplicates="drop", leakage={"exact": "warn"}))
    dups = {(f.splits, f.kind): f for f in report.findings if f.check == "duplicates"}
    assert dups["train", "exact"].rows == [2] and dups["train", "near"].rows == [3]
    assert dups["test", "exact"].policy == "warn"  # held-out copies are reported, never dropped
    assert [r["text"] for r in out["train"].rows][:2] == [LONG, OTHER] and len(out["train"].rows) == 7
    assert len(out["test"].rows) == 4


def test_empty_rows_are_dropped_by_default():
    data = splits(train=["  ", "...", *fillers(5)], test=fillers(2, "t"))
    out, report = check_rows(data, ChecksConfig())
    [empty] = [f for f in report.findings if f.check == "empty"]
    assert empty.count == 2 and report.dropped == {"train": 2} and len(out["train"].rows) == 5


def test_a_check_set_to_off_does_not_run():
    data = splits(train=[LONG, LONG, *fillers(3)], test=[LONG])
    _, report = check_rows(data, ChecksConfig(duplicates="off", leakage={"exact": "off", "near": "off"}))
    assert not report.findings


def test_card_warnings_for_truncation_and_label_balance():
    card = {"train": {"rows": 100, "truncated": 30, "tokens": {"p50": 40, "p95": 300, "max": 512},
                      "label_balance": {"a": 95, "b": 5}},
            "test": {"rows": 10, "truncated": 0, "tokens": {"p50": 40, "p95": 60, "max": 64}, "label_balance": {"a": 10}}}
    found = check_card(card, ChecksConfig(), max_length=256)
    messages = [f.message for f in found]
    assert any("30 of 100 train examples (30%) are cut at data.max_length=256" in m for m in messages)
    assert any("'a' has 95 rows, 'b' 5 (19x)" in m for m in messages)
    assert any("test has no rows of label(s) 'b'" in m for m in messages)
    assert all(f.policy == "warn" for f in found)


@pytest.mark.parametrize("shape", ["preference", "scored"])
def test_preference_rows_leak_on_their_prompt_side(shape):
    prompt = "Write a short poem about the sea at night and the lighthouse keeper who waits for the boats"

    def row(p, a, b):
        if shape == "scored":
            return {"prompt": p, "responses": [{"text": a, "score": 2}, {"text": b, "score": 1}]}
        return {"prompt": p, "chosen": a, "rejected": b}

    train = [row(prompt, OTHER, "no")] + [row(t, "ok", "no") for t in fillers(10)]
    test = [row(prompt, " ".join(fillers(3, "t")), "maybe")]
    assert comparable_texts(test[0])["prompt"] == prompt and OTHER in comparable_texts(train[0])["text"]
    _, report = check_rows({"train": Split(train, "train.jsonl"), "test": Split(test, "test.jsonl")}, ChecksConfig())
    leaks = [(f.kind, f.view) for f in report.findings if f.check == "leakage"]
    assert ("exact", "prompt") in leaks and ("exact", "text") not in leaks
