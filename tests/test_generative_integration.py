"""The real packaged samples for generative work: SmolLM2's chat template, the alpaca and grimm data."""

from __future__ import annotations

import pytest

from tunesmith.data.collate import IGNORE_INDEX

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from tunesmith.models.load import resolve

    path = resolve("sample:smollm2-135m-instruct")
    return path, AutoTokenizer.from_pretrained(path)


def test_smollm2_prompts_match_its_own_chat_template_and_answers_end_with_im_end(smollm2):
    """Our rendering of alpaca rows is the tokenizer's apply_chat_template, token for token; targets are
    exactly the answer and <|im_end|> (which is also SmolLM2's pad token)."""
    from tunesmith.config import DataConfig
    from tunesmith.data.sources import read
    from tunesmith.objectives import sft

    _, tok = smollm2
    part = read("sample:alpaca-demo")["test"].subset(list(range(30)))
    prepared = sft.prepare({"test": part}, tok, sft.Config(), DataConfig(train="x", max_length=1024))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == im_end and prepared.chat.stop_ids() == [im_end]
    for ex, item in zip(prepared.examples["test"], prepared.prompts["test"]):
        hf_prompt = tok.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        assert prepared.chat.encode_prompt(item["messages"]) == hf_prompt
        n = len(hf_prompt)
        assert ex["input_ids"][:n] == hf_prompt and all(l == IGNORE_INDEX for l in ex["labels"][:n])
        targets = [l for l in ex["labels"] if l != IGNORE_INDEX]
        assert targets[-1] == im_end and ex["labels"][n:n + len(targets)] == targets
        assert tok.decode(targets[:-1]) == item["reference"]


def test_smollm2_keeps_packed_examples_apart(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.objectives.lm import check_packing

    model = AutoModelForCausalLM.from_pretrained(smollm2[0], dtype=torch.float32)
    check_packing(model)


def test_grimm_summaries_sample():
    from tunesmith.data.sources import read

    splits = read("sample:grimm-summaries")
    assert {k: len(v.rows) for k, v in splits.items()} == {"train": 43, "validation": 5, "test": 6}
    titles = {k: {r["title"] for r in v.rows} for k, v in splits.items()}
    assert not titles["train"] & titles["test"] and not titles["train"] & titles["validation"]
    row = splits["test"].rows[0]
    assert set(row) == {"title", "text", "summary"} and len(row["summary"]) < len(row["text"]) / 10
