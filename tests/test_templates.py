"""Templates and response-only masking, token by token, for every data format.

The tiny Llama tokenizer is word-level with a ChatML template (`<|im_start|>role ... <|im_end|>`),
so every expected token can be written out. Prompt tokens must carry the ignore label; the
response tokens and the end-of-turn token that closes them must not.
"""

from __future__ import annotations

import pytest

from tunesmith.config import DataConfig
from tunesmith.data.collate import IGNORE_INDEX, collate
from tunesmith.data.sources import Split
from tunesmith.data.templates import ChatFormat, TemplateError
from tunesmith.objectives import sft
from tiny import make_tokenizer

USER = ["<|im_start|>", "user", "the", "movie", "<|im_end|>"]
ANSWER = ["<|im_start|>", "assistant", "good", "fun", "<|im_end|>"]
SYSTEM = ["<|im_start|>", "system", "one", "two", "<|im_end|>"]

# The same one-turn conversation in every format that can hold it.
ONE_TURN = {
    "prompt_completion": {"prompt": "the movie", "completion": "good fun"},
    "prompt_completion (conversational)": {"prompt": [{"role": "user", "content": "the movie"}],
                                           "completion": [{"role": "assistant", "content": "good fun"}]},
    "alpaca": {"instruction": "the movie", "input": "", "output": "good fun"},
    "sharegpt": {"conversations": [{"from": "human", "value": "the movie"}, {"from": "gpt", "value": "good fun"}]},
    "messages": {"messages": [{"role": "user", "content": "the movie"}, {"role": "assistant", "content": "good fun"}]},
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("llama")


def encode(tok, row: dict, fmt: str = "auto", **objective) -> tuple[list[str], list]:
    """Tokens and labels (as tokens, None where ignored) of one row, through sft.prepare."""
    prepared = sft.prepare({"train": Split([row], "x")}, tok, sft.Config(**objective),
                           DataConfig(train="x", max_length=64, format=fmt))
    ex = prepared.examples["train"][0]
    tokens = tok.convert_ids_to_tokens(ex["input_ids"])
    labels = [None if l == IGNORE_INDEX else tok.convert_ids_to_tokens(l) for l in ex["labels"]]
    return tokens, labels


@pytest.mark.parametrize("name", list(ONE_TURN))
def test_only_the_response_and_its_end_of_turn_are_targets(tok, name):
    tokens, labels = encode(tok, ONE_TURN[name])
    assert tokens == USER + ANSWER
    assert labels == [None] * 7 + ["good", "fun", "<|im_end|>"]


def test_system_turns_are_prompt(tok):
    row = {"messages": [{"role": "system", "content": "one two"}, *ONE_TURN["messages"]["messages"]]}
    tokens, labels = encode(tok, row)
    assert tokens == SYSTEM + USER + ANSWER
    assert labels == [None] * 12 + ["good", "fun", "<|im_end|>"]
    # alpaca and sharegpt take a system column; the config's system applies to rows without one
    assert encode(tok, {**ONE_TURN["alpaca"], "system": "one two"})[0] == SYSTEM + USER + ANSWER
    assert encode(tok, {**ONE_TURN["sharegpt"], "system": "one two"})[0] == SYSTEM + USER + ANSWER
    assert encode(tok, ONE_TURN["alpaca"], system="one two")[0] == SYSTEM + USER + ANSWER


def test_alpaca_input_joins_the_instruction_and_placeholder_inputs_are_dropped(tok):
    tokens, labels = encode(tok, {"instruction": "the movie", "input": "was dull", "output": "bad"})
    assert tokens[:7] == ["<|im_start|>", "user", "the", "movie", "was", "dull", "<|im_end|>"]
    assert [l for l in labels if l] == ["bad", "<|im_end|>"]
    assert encode(tok, {**ONE_TURN["alpaca"], "input": "No Input"})[0] == USER + ANSWER


def test_multi_turn_trains_the_last_turn_or_all_turns(tok):
    row = {"conversations": [{"from": "human", "value": "the movie"}, {"from": "gpt", "value": "good fun"},
                             {"from": "human", "value": "a plot"}, {"from": "gpt", "value": "dull"}]}
    second = ["<|im_start|>", "user", "a", "plot", "<|im_end|>", "<|im_start|>", "assistant", "dull", "<|im_end|>"]
    tokens, last = encode(tok, row)
    assert tokens == USER + ANSWER + second
    assert [l for l in last if l] == ["dull", "<|im_end|>"]
    _, every = encode(tok, row, turns="all")
    assert every == [None] * 7 + ["good", "fun", "<|im_end|>"] + [None] * 7 + ["dull", "<|im_end|>"]


def test_text_rows_train_on_every_token_and_end_with_eos(tok):
    tokens, labels = encode(tok, {"text": "the movie was good"})
    assert tokens == ["the", "movie", "was", "good", "<|im_end|>"] and labels == tokens


@pytest.mark.parametrize("template,prompt,answer", [
    ("plain", ["User", ":", "the", "movie", "Assistant", ":"], ["good", "fun", "</s>"]),
    ("alpaca", ["#", "#", "#", "Instruction", ":", "the", "movie", "#", "#", "#", "Response", ":"],
     ["good", "fun", "</s>"]),
    ("raw", ["the", "movie"], ["good", "fun", "</s>"]),
])
def test_fallback_templates_end_targets_with_eos_even_when_pad_is_eos(template, prompt, answer):
    tok = make_tokenizer("llama")
    tok.chat_template = None
    tok.eos_token = tok.pad_token = "</s>"  # as in SmolLM2: padding must not hide the real EOS
    tokens, labels = encode(tok, ONE_TURN["alpaca"], template=template)
    bos = ["<s>"] if template != "raw" else []
    assert tokens == bos + prompt + answer
    assert labels == [None] * (len(bos) + len(prompt)) + answer
    ids = tok.convert_tokens_to_ids(tokens)
    batch = collate([{"input_ids": ids, "labels": ids}, {"input_ids": ids[:2], "labels": ids[:2]}], tok.pad_token_id)
    assert batch["labels"][0, -1] == tok.eos_token_id  # padding is masked by position, not by id


def test_auto_uses_the_tokenizers_template_else_plain(tok):
    assert ChatFormat.build(tok, "auto").name == "tokenizer"
    bare = make_tokenizer("llama")
    bare.chat_template = None
    assert ChatFormat.build(bare, "auto").name == "plain"
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="no chat template"):
        ChatFormat.build(bare, "tokenizer")


def test_prompt_at_inference_is_the_training_prompt(tok):
    """The tokens generate/chat send are exactly those that preceded the response in training."""
    chat = ChatFormat.build(tok, "auto", system="one two")
    conv = [{"role": "user", "content": "the movie"}, {"role": "assistant", "content": "good fun"},
            {"role": "user", "content": "a plot"}, {"role": "assistant", "content": "dull"}]
    for turns in ("last", "all"):
        ids, labels = chat.encode(conv, turns)
        prompt = chat.encode_prompt(conv[:-1])
        assert ids[:len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX
        if turns == "last":
            assert all(l == IGNORE_INDEX for l in labels[:len(prompt)])
    assert chat.stop_ids() == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_template_without_an_end_of_turn_token_gets_eos():
    tok = make_tokenizer("llama")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
                         "{% if add_generation_prompt %}assistant :{% endif %}")
    chat = ChatFormat.build(tok, "auto")
    assert chat.end_of_turn is None
    ids, labels = chat.encode([{"role": "user", "content": "the movie"}, {"role": "assistant", "content": "good"}])
    assert [tok.convert_ids_to_tokens(l) for l in labels if l != IGNORE_INDEX] == ["good", "<|im_end|>"]
    assert chat.stop_ids() == [tok.eos_token_id]


def test_a_template_that_rewrites_history_is_refused():
    tok = make_tokenizer("llama")
    # drops earlier assistant turns from the rendering (as templates that strip reasoning do)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|im_start|>"
                         "{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    chat = ChatFormat.build(tok, "auto")
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "good"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "bad"}]
    with pytest.raises(TemplateError, match="assistant turn 1"):
        chat.encode(conv, "all")


def test_long_examples_are_shortened_inside_the_prompt_keeping_template_and_answer():
    tok = make_tokenizer("llama")
    rows = [{"instruction": "one two " + " ".join(["the movie"] * 20), "output": "good fun"},
            {"instruction": "the movie", "output": " ".join(["good"] * 20)}]
    prepared = sft.prepare({"test": Split(rows, "x")}, tok, sft.Config(), DataConfig(train="x", max_length=12))
    long_prompt, long_answer = prepared.examples["test"]
    tokens = tok.convert_ids_to_tokens(long_prompt["input_ids"])
    # the end of the user message went; its start, the markup and the whole answer stayed
    assert tokens[:4] == ["<|im_start|>", "user", "one", "two"] and len(tokens) <= 12
    assert tokens[-6:] == ["<|im_end|>", "<|im_start|>", "assistant", "good", "fun", "<|im_end|>"]
    assert [l for l in long_prompt["labels"] if l != IGNORE_INDEX] == tok.convert_tokens_to_ids(["good", "fun",
                                                                                                 "<|im_end|>"])
    # generation is prompted with the conversation as trained
    assert prepared.prompts["test"][0]["messages"][0]["content"].startswith("one two")
    assert prepared.prompts["test"][0]["reference"] == "good fun"
    # an answer longer than max_length on its own is cut at the right
    assert len(long_answer["input_ids"]) == 12
    assert prepared.card["test"]["truncated"] == 2 and prepared.card["test"]["responses_cut"] == 1
