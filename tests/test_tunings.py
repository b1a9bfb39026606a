"""The new tunings through the real command line: a run trains, saves, and `eval` on the reloaded run
scores exactly what the run reported; impossible combinations stop before a run folder exists."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tunesmith.cli import main
from tiny import classify_config, write_config


@pytest.mark.parametrize("tuning,weights", [
    ("{kind: adapter, placement: houlsby, reduction_factor: 4}", "adapters.safetensors"),
    ("{kind: qlora, r: 4, alpha: 8}", "adapter_model.safetensors"),
    ("{kind: prefix, tokens: 4}", "adapter_model.safetensors"),
    ("{kind: ia3}", "adapter_model.safetensors"),
])
def test_run_reloads_to_the_scores_it_reported(in_tmp, tiny_bert, sentiment_dir, capsys, tuning, weights):
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir, tuning, "eval: {compare_base: false}\n")
    assert main(["train", str(cfg), "train.max_steps=12"]) == 0
    run = in_tmp / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert (run / summary["weights"] / weights).exists()
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(sentiment_dir / "test.jsonl")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-6)
    assert scores["accuracy"] == summary["test"]["accuracy"]


def test_bottleneck_adapters_save_only_what_trained(in_tmp, tiny_bert, sentiment_dir):
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, sentiment_dir,
                          "{kind: adapter, placement: pfeiffer, reduction_factor: 8, layers: [-1]}",
                          "eval: {compare_base: false}\n")
    assert main(["train", str(cfg), "train.max_steps=4"]) == 0
    folder = in_tmp / "runs" / "tiny" / "adapter"
    tensors = load_file(folder / "adapters.safetensors")
    # one adapter (last block, after the feed-forward output) and the classifier
    assert sorted(tensors) == ["bert.encoder.layer.1.output.dense.adapter.down.bias",
                               "bert.encoder.layer.1.output.dense.adapter.down.weight",
                               "bert.encoder.layer.1.output.dense.adapter.up.bias",
                               "bert.encoder.layer.1.output.dense.adapter.up.weight",
                               "classifier.bias", "classifier.weight"]
    assert tensors["bert.encoder.layer.1.output.dense.adapter.down.weight"].shape == (4, 32)
    description = json.loads((folder / "adapters.json").read_text())
    assert description["mergeable"] is False
    assert description["adapters"] == {"bert.encoder.layer.1.output.dense.adapter":
                                       {"hidden": 32, "bottleneck": 4, "activation": "ReLU"}}


@pytest.mark.parametrize("tuning,message,where", [
    ("{kind: prompt, tokens: 4}", "prompt tuning cannot train a llama classifier", "tuning.kind"),
    ("{kind: lora, targets: [q_proj, vproj]}", "'vproj' matches no module", "tuning.targets"),
    ("{kind: adapter, layers: [5]}", "block index 5 is out of range", "tuning.layers"),
    ("{kind: lora, train_head: false}", "random initialisation", "tuning.train_head"),
])
def test_impossible_tunings_stop_before_the_run_folder(in_tmp, tiny_llama, sentiment_dir, capsys, tuning, message,
                                                       where):
    cfg = classify_config(in_tmp / "c.yaml", tiny_llama, sentiment_dir, tuning)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and where in err and "Traceback" not in err
    assert not (in_tmp / "runs").exists()


def test_prompt_init_from_text_starts_at_the_texts_embeddings(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.tuning import prompt

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = prompt.apply(AutoModelForCausalLM.from_pretrained(tiny_llama),
                         prompt.Config(tokens=5, init="text", init_text="good movie"), "causal-lm", tok)
    ids = tok("good movie", add_special_tokens=False)["input_ids"]
    words = model.word_embeddings(torch.tensor((ids * 3)[:5]))
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, words)
    # the virtual tokens' logits are dropped: logits line up with input_ids
    x = torch.tensor([ids])
    assert model(input_ids=x, attention_mask=torch.ones_like(x)).logits.shape[:2] == (1, len(ids))


def test_prompt_config_needs_text_exactly_with_text_init(tmp_path, tiny_llama, capsys):
    cfg = write_config(tmp_path / "c.yaml", f"name: x\nmodel: {tiny_llama}\ndata: {{train: x}}\n"
                                            "tuning: {kind: prompt, init: text}\nobjective: clm\n")
    assert main(["plan", str(cfg)]) == 2
    assert "init_text is needed with tuning.init: text" in capsys.readouterr().err
