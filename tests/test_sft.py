"""Instruction tuning end to end on a tiny Llama: every tuning learns the task and learns to stop; the
saved run generates, chats and compares through the same template it trained with."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from tunesmith.cli import main
from tiny import sft_config, write_jsonl


def train(tmp, model, data, tuning="{kind: full}", objective="", extra="", *overrides) -> "Path":  # noqa: F821
    assert main(["train", str(sft_config(tmp / "c.yaml", model, data, tuning, objective, extra)), *overrides]) == 0
    return tmp / "runs" / "sft"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_llama, instruction_dir):
    tmp = tmp_path_factory.mktemp("sft")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        return train(tmp, tiny_llama, instruction_dir)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("tuning", ["{kind: full}", "{kind: freeze, train_last: 1}",
                                    "{kind: lora, r: 8, alpha: 16, targets: all-linear}"])
def test_every_tuning_lowers_held_out_loss_and_learns_to_stop(in_tmp, tiny_llama, instruction_dir, tuning):
    lora = "lora" in tuning
    run = train(in_tmp, tiny_llama, instruction_dir, tuning, "", "", *(["train.lr=1e-2"] if lora else []))
    s = json.loads((run / "summary.json").read_text())
    # the random base never produces its end-of-turn token; the tuned model ends every answer with it
    assert s["base"]["test"]["stop_rate"] == 0.0 and s["test"]["stop_rate"] == 1.0
    if lora:
        # a random model's frozen tied head (weights ~0.02) caps how sharp adapters can make its logits
        assert s["test"]["loss"] < s["base"]["test"]["loss"] - 0.4
    else:
        assert s["test"]["loss"] < s["base"]["test"]["loss"] / 2
        assert s["test"]["exact_match"] > s["base"]["test"]["exact_match"]
    assert s["generation"]["prompts"] == 16 and s["chat"]["end_of_turn"] == "<|im_end|>"
    assert (run / ("adapter" if "lora" in tuning else "model") / "tokenizer_config.json").exists()


def test_generate_prompts_the_saved_model_as_training_did(full_run, capsys):
    """`generate` on the saved run reproduces the answers the run measured for its test prompts."""
    report = json.loads((full_run / "compare.json").read_text())
    rows = [r for r in report["rows"] if len(r["messages"]) == 1][:4]
    capsys.readouterr()
    assert main(["generate", str(full_run), "--json", *[r["messages"][0]["content"] for r in rows]]) == 0
    out = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [o["answer"] for o in out] == [r["tuned"] for r in rows]
    assert all(o["stopped"] for o in out)
    assert main(["predict", str(full_run), "the movie"]) == 2
    assert "not a classifier" in capsys.readouterr().err
    # the saved tokenizer carries the template, and the saved model stops on the end-of-turn token
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(full_run / "model")
    model = AutoModelForCausalLM.from_pretrained(full_run / "model")
    assert "<|im_start|>" in tok.chat_template
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_generate_says_which_settings_it_used(full_run, capsys):
    """The run's generation settings (its repetition penalty included) are printed, on stderr beside --json."""
    capsys.readouterr()
    assert main(["generate", str(full_run), "--json", "--max-new-tokens", "5", "the movie"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] <= 5
    assert "generation: max_new_tokens 5, greedy, repetition_penalty 1 (off)" in captured.err
    assert "the run's eval.generate" in captured.err


def test_batched_generation_matches_one_at_a_time(full_run):
    from tunesmith.evaluate.generation import answer
    from tunesmith.trained import load_trained

    trained = load_trained(full_run)
    convs = [[{"role": "user", "content": t}] for t in
             ("the movie", "a very long and boring film with one two three four five six actors", "fun")]
    together = answer(trained.model, trained.chat, convs, trained.generate.model_copy(update={"batch_size": 3}))
    alone = [answer(trained.model, trained.chat, [c], trained.generate)[0] for c in convs]
    assert together == alone
    stop = trained.chat.stop_ids()
    assert all(g.ids[-1] in stop and len(g.ids) == g.tokens for g in together if g.stopped)


def test_chat_keeps_the_conversation(full_run, monkeypatch):
    from tunesmith.data.templates import ChatFormat
    from tunesmith.serve.chat import chat_loop
    from tunesmith.trained import load_trained

    seen = []
    real = ChatFormat.encode_prompt
    monkeypatch.setattr(ChatFormat, "encode_prompt", lambda self, m: seen.append(list(m)) or real(self, m))
    trained = load_trained(full_run)
    out = io.StringIO()
    messages = chat_loop(trained, trained.generate, io.StringIO("the movie\nfun film\n/reset\ndull\n"), out,
                         as_json=True)
    replies = [json.loads(l) for l in out.getvalue().splitlines()]
    assert [r.get("turn") for r in replies] == [1, 2, None, 1]
    assert [m["content"] for m in seen[1]] == ["the movie", replies[0]["reply"], "fun film"]
    assert [m["content"] for m in seen[2]] == ["dull"]  # /reset forgot the conversation
    assert messages[-1] == {"role": "assistant", "content": replies[-1]["reply"]}


def test_chat_can_be_driven_through_a_pipe(full_run):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "tunesmith", "chat", str(full_run), "--json"],
                          input="the movie was good\nand the plot\n", capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [r["turn"] for r in replies] == [1, 2] and all(r["stopped"] for r in replies)


def test_compare_writes_escaped_markdown_and_html(full_run, tiny_llama, in_tmp, capsys):
    rows = [{"instruction": "the movie <b>was</b> good & fun", "output": "good"},
            {"instruction": "a dull film", "output": "bad"}]
    write_jsonl(in_tmp / "held.jsonl", rows)
    assert main(["compare", str(tiny_llama), str(full_run), "--data", str(in_tmp / "held.jsonl"),
                 "--out", str(in_tmp / "report")]) == 0
    page = (in_tmp / "report" / "compare.html").read_text()
    assert "&lt;b&gt;was&lt;/b&gt; good &amp; fun" in page and "<b>was</b>" not in page
    md = (in_tmp / "report" / "compare.md").read_text()
    assert "| stop_rate | 0.0000 | 1.0000 |" in md and "did not stop" in md
    data = json.loads((in_tmp / "report" / "compare.json").read_text())
    assert data["scores"]["tuned"]["loss"] < data["scores"]["base"]["loss"]
    assert [r["reference"] for r in data["rows"]] == ["good", "bad"]


def test_packed_sft_run_trains_on_fewer_sequences(in_tmp, tiny_llama, instruction_dir):
    run = train(in_tmp, tiny_llama, instruction_dir, objective="pack: true")
    card = json.loads((run / "data_card.json").read_text())
    assert card["train"]["packed_sequences"] < card["train"]["rows"] / 2
    s = json.loads((run / "summary.json").read_text())
    assert s["test"]["loss"] < s["base"]["test"]["loss"] / 2 and s["test"]["stop_rate"] == 1.0


def test_generation_metrics_can_be_turned_off(in_tmp, tiny_llama, instruction_dir):
    run = train(in_tmp, tiny_llama, instruction_dir, "{kind: freeze}", "", "", "eval.generate.prompts=0",
                "train.max_steps=2")
    s = json.loads((run / "summary.json").read_text())
    assert "stop_rate" not in s["test"] and "generation" not in s and not (run / "compare.md").exists()


def test_streamed_chat_prints_each_answer_once_as_it_is_generated(full_run, monkeypatch):
    """At a terminal the answer is streamed: its text is already out when generation returns, and what was
    printed is the reply kept in the conversation, once."""
    from tunesmith.serve import chat
    from tunesmith.trained import load_trained

    trained = load_trained(full_run)
    settings = trained.generate.model_copy(update={"max_new_tokens": 12})
    out, printed_by_then = io.StringIO(), []
    real = chat.answer
    monkeypatch.setattr(chat, "answer", lambda *a, **k: (r := real(*a, **k), printed_by_then.append(out.getvalue()))[0])
    messages = chat.chat_loop(trained, settings, io.StringIO("the movie was\n"), out, stream=True)
    reply = messages[-1]["content"]
    assert reply and printed_by_then[0].strip() == reply
    assert out.getvalue().strip().removesuffix("[...]").strip() == reply
    out, printed_by_then[:] = io.StringIO(), []
    chat.chat_loop(trained, settings, io.StringIO("the movie was\n"), out, stream=False)
    assert printed_by_then == [""] and out.getvalue().strip().removesuffix("[...]").strip() == reply
