"""`tunesmith export`: a merged transformers folder and GGUF files that compute what the tuned model computed."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.cli import main
from tiny import train_small


def train(root, model, data, tuning: str, name: str, objective: str = "clm"):
    return train_small(root, model, data, tuning, name, objective, steps=8)


@pytest.mark.parametrize("tuning", ["{kind: qlora, r: 4, alpha: 8}", "{kind: dora, r: 4, alpha: 8}"])
def test_merged_export_is_a_plain_transformers_model_with_the_same_outputs(in_tmp, bpe_llama, text_dir, tuning, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = train(in_tmp, bpe_llama, text_dir, tuning, "m")
    capsys.readouterr()
    assert main(["export", str(run), "--format", "merged", "--prompt", "the plot", "--prompt", "a film"]) == 0
    out = capsys.readouterr().out
    assert "greedy output identical on 2/2 prompts" in out
    report = json.loads((run / "export" / "export-merged.json").read_text())
    assert report["written"]["max_abs_logit_diff"] < 1e-4 and report["written"]["greedy_match"] == 2
    if "qlora" in tuning:
        assert report["reference"] == "4-bit base + adapter"
    # the folder holds an ordinary checkpoint: no peft, no quantization, loadable by transformers alone
    folder = run / "export" / "merged"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k or "absmax" in k or "quant" in k]
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("the plot")["input_ids"]


def test_gguf_export_reads_back_with_transformers(in_tmp, bpe_llama, text_dir, capsys):
    run = train(in_tmp, bpe_llama, text_dir, "{kind: lora, r: 4, alpha: 8}", "g")
    for quant in ("f32", "q8_0"):
        capsys.readouterr()
        assert main(["export", str(run), "--format", "gguf", "--quant", quant]) == 0
        report = json.loads((run / "export" / f"export-gguf-{quant}.json").read_text())
        written = report["written"]
        assert written["same_tokenization"] == 5, "the tokenizer rebuilt from GGUF metadata splits text differently"
        if quant == "f32":
            assert written["max_abs_logit_diff"] < 1e-4 and written["greedy_match"] == 5
        else:  # 8-bit blocks move logits a little; greedy text of this tiny model is robust to that
            assert written["max_abs_logit_diff"] < 0.1 and written["greedy_match"] >= 4
    from gguf import GGUFReader

    reader = GGUFReader(run / "export" / "g-q8_0.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied to token_embd, as llama.cpp writes it


def test_gguf_permutes_q_and_k_like_llama_cpp():
    """Our permutation followed by transformers' reverse permutation is the identity, for MHA and GQA."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tunesmith.export.gguf import _permute

    w = np.random.default_rng(0).standard_normal((4 * 8, 32)).astype(np.float32)
    for heads, kv in ((4, 4), (8, 4)):
        permuted = _permute(w, heads, kv)
        assert not np.array_equal(permuted, w)
        back = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv}) \
            ._reverse_permute_weights(permuted, heads, kv)
        assert np.array_equal(back, w)


def test_gguf_head_size_is_written_as_llama_cpp_reads_it(tmp_path):
    """llama.cpp takes the head size from key_length, else hidden_size / heads, and refuses a file whose rotary
    dimension differs ("invalid n_rot"); transformers' reader takes head_dim from the rotary dimension, so the
    export's own read-back cannot notice a missing key_length. A head_dim of its own (16, not 32 / 4) is the case."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny import make_model_dir
    from tunesmith.export import gguf

    folder = make_model_dir(tmp_path / "m", "llama-bpe", head_dim=16)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    path = gguf.write(model, tokenizer, tmp_path / "m.gguf")
    fields = {f.name: f.contents() for f in GGUFReader(path).fields.values()}
    hidden, heads = fields["llama.embedding_length"], fields["llama.attention.head_count"]
    head_size = fields.get("llama.attention.key_length", hidden // heads)  # llama.cpp's llama_model::load_hparams
    assert head_size == fields["llama.rope.dimension_count"] == 16
    assert fields.get("llama.attention.value_length", hidden // heads) == 16
    loaded, _ = gguf.load(path)
    ids = tokenizer("the plot", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)


def test_unmergeable_and_unexportable_runs_are_refused(in_tmp, bpe_llama, text_dir, tiny_bert, sentiment_dir, capsys):
    run = train(in_tmp, bpe_llama, text_dir, "{kind: prompt, tokens: 4}", "p")
    capsys.readouterr()
    assert main(["export", str(run), "--format", "merged"]) == 2
    err = capsys.readouterr().err
    assert "prompt tuning adds virtual tokens" in err and "Traceback" not in err
    assert not (run / "export").exists()

    run = train(in_tmp, tiny_bert, sentiment_dir, "{kind: lora, r: 4}", "c", objective="classify")
    capsys.readouterr()
    assert main(["export", str(run), "--format", "gguf"]) == 2
    assert "GGUF holds language models" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "merged"]) == 0  # a classifier merges fine
    assert "same predicted class on 5/5 prompts" in capsys.readouterr().out
