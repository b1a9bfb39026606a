"""Data formats: detection, conversion to conversations, and rows that fit no format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.data.formats import FormatError, detect, scored_pairs, to_conversation, to_preference
from tiny import sft_config, write_jsonl

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def test_every_example_in_the_formats_doc_is_detected_as_documented():
    """docs/formats.md is the one place formats are described: its examples must stay true."""
    text = DOC.read_text()
    examples = re.findall(r"### `(\w+)`.*?```json\n(.*?)\n```", text, flags=re.S)
    assert {name for name, _ in examples} == {"text", "prompt_completion", "alpaca", "sharegpt", "messages",
                                              "preference", "sharegpt_preference", "scored", "prompt", "unpaired"}
    for name, body in examples:
        row = json.loads(body)
        assert detect(row) == name, name
        if name == "scored":
            assert scored_pairs(row["responses"]) == [("7", "9"), ("7", "Seven, a prime.")]
        elif name in ("preference", "sharegpt_preference"):
            prompt, chosen, rejected = to_preference(row, name)
            assert prompt[-1]["role"] == "user" and chosen and rejected
        elif name == "unpaired":  # kto's thumbs-up/down answers
            from types import SimpleNamespace

            from tunesmith.data.formats import unpaired_rows

            (_, prompt, answer, label, pair), = unpaired_rows(SimpleNamespace(rows=[row]), name)
            assert prompt[-1]["role"] == "user" and answer and label is True and pair == -1
        elif name == "prompt":  # ppo's prompts: it writes the answers
            from tunesmith.objectives.ppo import _prompt_of

            assert _prompt_of(row, name) == [{"role": "user", "content": row["prompt"]}]
        else:
            conv = to_conversation(row, name)
            assert isinstance(conv, str) if name == "text" else conv[-1]["role"] == "assistant"


def test_sharegpt_preference_rows_as_in_the_dpo_sample():
    row = {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                             {"from": "human", "value": "Q2"}],
           "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    prompt, chosen, rejected = to_preference(row, detect(row))
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"] and (chosen, rejected) == ("good", "bad")


@pytest.mark.parametrize("row,why", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "from 'alien'"),
    ({"instruction": "x", "output": 3}, "output must be a string"),
])
def test_malformed_rows_say_why(row, why):
    with pytest.raises(FormatError, match=why):
        to_conversation(row, detect(row))


def test_a_row_that_fits_no_format_is_reported_with_index_and_keys(in_tmp, tiny_llama, instruction_dir, capsys):
    rows = [json.loads(l) for l in (instruction_dir / "train.jsonl").read_text().splitlines()]
    rows[6] = {"question": "the movie", "answer": "good"}
    d = in_tmp / "d"
    write_jsonl(d / "train.jsonl", rows)
    for split in ("validation", "test"):
        (d / f"{split}.jsonl").write_text((instruction_dir / f"{split}.jsonl").read_text())
    assert main(["train", str(sft_config(in_tmp / "c.yaml", tiny_llama, d))]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'train.jsonl'}:7" in err and "row 6 fits no format" in err
    assert "its keys: question, answer" in err and "data.columns" in err
    assert not (in_tmp / "runs").exists()


def test_format_can_be_forced_and_columns_mapped(in_tmp, tiny_llama, instruction_dir):
    from tunesmith.config import load_config
    from tunesmith.models.load import load_tokenizer
    from tunesmith.run import prepare_data

    rows = [{"question": r["instruction"], "answer": r["output"]} for r in
            map(json.loads, (instruction_dir / "train.jsonl").read_text().splitlines())]
    write_jsonl(in_tmp / "qa.jsonl", rows)
    cfg = load_config(sft_config(in_tmp / "c.yaml", tiny_llama, in_tmp / "qa.jsonl"),
                      ["data.columns={prompt: question, completion: answer}", "data.format=prompt_completion"])
    prepared, _ = prepare_data(cfg, load_tokenizer(cfg.model))
    assert prepared.card["train"]["format"] == "prompt_completion"
    assert prepared.prompts["test"][0]["messages"][0]["role"] == "user"


def test_preference_rows_are_not_silently_trained_by_sft(in_tmp, tiny_llama, capsys):
    rows = [{"prompt": "the movie", "chosen": "good", "rejected": "bad"}] * 20
    write_jsonl(in_tmp / "p.jsonl", rows)
    assert main(["train", str(sft_config(in_tmp / "c.yaml", tiny_llama, in_tmp / "p.jsonl"))]) == 2
    err = capsys.readouterr().err
    assert "preference format" in err and "{completion: chosen}" in err
