"""`tunesmith plan`: exact parameter counts from the meta device, and no weights touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.plan import plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_distilbert_lora_plan_prints_peft_count(capsys):
    assert main(["plan", str(EXAMPLES / "seed-distilbert-lora.yaml")]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 628,994 || all params: 67,584,004 || trainable%: 0.9307" in out.splitlines()


@pytest.mark.parametrize("example,trainable", [("seed-distilbert-lora.yaml", 628_994),
                                               ("seed-llama2-7b-qlora.yaml", 16_777_216)])
def test_plan_allocates_nothing(monkeypatch, example, trainable):
    """Building on the meta device: parameters have no storage, and no weight file is opened."""
    import torch

    from tunesmith import plan as plan_module
    from tunesmith.models import load as load_module

    captured = {}
    real = load_module.build_on_meta

    def spy(*args, **kwargs):
        captured["model"] = real(*args, **kwargs)
        return captured["model"]

    monkeypatch.setattr(plan_module, "build_on_meta", spy)
    monkeypatch.setattr(torch.serialization, "load", lambda *a, **k: pytest.fail("plan read weights"))
    result = plan(load_config(EXAMPLES / example))
    assert all(p.device.type == "meta" for p in captured["model"].parameters())
    assert result["trainable"] == trainable


@pytest.mark.parametrize("tuning,trainable", [
    ("{kind: full}", 66_955_010),
    ("{kind: freeze}", 768 * 768 + 768 + 768 * 2 + 2),  # pre_classifier + classifier
    ("{kind: freeze, train_last: 1}", 768 * 768 + 768 + 768 * 2 + 2 + 7_087_872),
])
def test_plan_counts_each_tuning(tmp_path, tuning, trainable):
    cfg = (EXAMPLES / "seed-distilbert-lora.yaml").read_text().replace(
        "{kind: lora, r: 4, alpha: 32, dropout: 0.1, targets: [q_lin]}", tuning)
    (tmp_path / "c.yaml").write_text(cfg)
    result = plan(load_config(tmp_path / "c.yaml"))
    assert result["trainable"] == trainable and result["total"] == 66_955_010
    mem = result["memory"]
    assert mem["gradients"] == 4 * trainable and mem["optimizer"] == 8 * trainable
    assert mem["weights"] == 4 * 66_955_010


def test_llama2_7b_qlora_plan_reports_true_and_packed_counts(capsys):
    """Must show 1: Llama-2-7B from its config on the meta device, 4-bit base, LoRA r=16 on q, k, v, o
    (that nothing is allocated or read: test_plan_allocates_nothing)."""
    assert main(["plan", str(EXAMPLES / "seed-llama2-7b-qlora.yaml")]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 16,777,216 || all params: 6,755,192,832 || trainable%: 0.2484" in out
    # 32 blocks x (4 x 4096^2 + 3 x 4096 x 11008) weights are 4-bit; packed two per byte they count half
    quantized = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert f"{quantized:,d} weights in 224 linear layers" in out
    assert 6_755_192_832 - quantized + quantized // 2 == 3_517_190_144
    assert '"all params: 3,517,190,144" that older peft printed' in out


def test_qlora_memory_counts_packed_weights_and_scales():
    result = plan(load_config(EXAMPLES / "seed-llama2-7b-qlora.yaml"))
    quantized = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    per_layer_scales = {4096 * 4096: 4096 * 4096 // 64 + 4 * (4096 * 4096 // 64 // 256),
                        4096 * 11008: 4096 * 11008 // 64 + 4 * -(-(4096 * 11008 // 64) // 256)}
    scales = 32 * (4 * per_layer_scales[4096 * 4096] + 3 * per_layer_scales[4096 * 11008])
    fp32_rest = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096  # embeddings, untied LM head, norms: fp32 after k-bit prep
    assert result["memory"]["weights"] == quantized // 2 + scales + 4 * fp32_rest + 4 * 16_777_216
    assert result["memory"]["optimizer"] == 8 * 16_777_216
    # the stored model and its training state (activations, heap holes included, do not depend on the tuning's storage)
    full, lora, qlora = (sum(v for k, v in m.items() if k != "activations") for _, m in result["compare"].values())
    assert qlora < lora / 4 < full / 4


@pytest.mark.parametrize("kind", ["full", "freeze", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "adapter"])
def test_plan_count_equals_the_count_of_the_loaded_model(kind, tiny_llama, tmp_path):
    """What plan counts on the meta device is what a run trains (a 4-bit base counted unpacked by both)."""
    import torch
    from transformers import AutoTokenizer

    from tunesmith.models.params import count_parameters
    from tunesmith.tuning import TUNINGS
    from tunesmith.build import load_base

    (tmp_path / "c.yaml").write_text(f"name: p\nmodel: {tiny_llama}\ndata: {{train: x}}\n"
                                     f"tuning: {{kind: {kind}}}\nobjective: {{kind: clm}}\n")
    cfg = load_config(tmp_path / "c.yaml")
    planned = plan(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = TUNINGS[kind].apply(load_base(cfg, "causal-lm", {}, torch.float32, tokenizer.pad_token_id), cfg.tuning,
                                "causal-lm", tokenizer)
    assert (planned["trainable"], planned["total"]) == count_parameters(model)


@pytest.mark.parametrize("model,tuning,objective,message", [
    ("arch:deberta-v2", "prefix", "{kind: classify, labels: [a, b]}", "does not accept"),
    ("arch:llama", "prompt", "{kind: classify, labels: [a, b]}", "prompt tuning cannot train a llama classifier"),
    ("arch:llama", "{kind: ia3, feedforward: [down_proj], targets: [q_proj]}", "clm", "not among the targets"),
    ("arch:llama", "{kind: lora, targets: [q_porj]}", "clm", "did you mean 'q_proj'"),
])
def test_impossible_plans_fail_at_config_validation(tmp_path, capsys, model, tuning, objective, message):
    (tmp_path / "c.yaml").write_text(f"name: p\nmodel: {{name: {model}, config: {{num_hidden_layers: 2}}}}\n"
                                     f"data: {{train: x}}\ntuning: {tuning}\nobjective: {objective}\n")
    assert main(["plan", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_names_its_command_and_validates(path):
    first = path.read_text().splitlines()[0]
    assert first in (f"# tunesmith train examples/{path.name}", f"# tunesmith plan examples/{path.name}")
    from tunesmith import stages

    stages.load(path) if stages.is_staged(path) else load_config(path)


def _tiny_plan(tmp_path, **changes):
    """plan of a 2-layer Llama sft run with LoRA (dropout 0.05) on all linear layers; `changes`: dotted overrides."""
    (tmp_path / "c.yaml").write_text(
        "name: p\nmodel: {name: arch:llama, config: {num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128,"
        " num_attention_heads: 4, vocab_size: 1000}}\ndata: {train: x, max_length: 128}\n"
        "tuning: {kind: lora, r: 8, dropout: 0.05, targets: all-linear}\nobjective: {kind: sft}\n"
        "train: {batch_size: 4}\n")
    return plan(load_config(tmp_path / "c.yaml", [f"{k.replace('__', '.')}={v}" for k, v in changes.items()]))


def test_plan_activation_terms_scale_and_bound(tmp_path):
    """Doubling the batch doubles the per-token terms; chunking bounds the logits; checkpointing lowers the rest."""
    base = _tiny_plan(tmp_path, objective__loss_chunk=0)["phases"]["terms"]
    double = _tiny_plan(tmp_path, objective__loss_chunk=0, train__batch_size=8)["phases"]["terms"]
    for name in ("blocks", "adapters", "logits"):
        assert base[name] > 0 and double[name] == 2 * base[name]
    chunked = _tiny_plan(tmp_path, objective__loss_chunk=64)["phases"]["terms"]
    assert chunked["logits"] == 64 * 1000 * 4 * 3 < base["logits"]
    no_dropout = _tiny_plan(tmp_path, objective__loss_chunk=0, tuning__dropout=0)["phases"]["terms"]
    assert no_dropout["adapters"] < base["adapters"]  # LoRA's dropout copies of each adapted module's input
    ckpt = _tiny_plan(tmp_path, objective__loss_chunk=0, train__gradient_checkpointing="true")["phases"]["terms"]
    assert ckpt["blocks"] == base["blocks"] / 2  # one of the 2 blocks at a time
    assert ckpt["block inputs"] == 2 * 4 * 128 * 64 * 4


def test_plan_counts_generation_and_dpo_pairs(tmp_path):
    with_gen = _tiny_plan(tmp_path, eval__generate__prompts=8, eval__generate__max_new_tokens=512)["phases"]
    without = _tiny_plan(tmp_path, eval__generate__prompts=0)["phases"]
    assert "generation" in with_gen and "generation" not in without
    dpo = _tiny_plan(tmp_path, objective="{kind: dpo}")["phases"]["terms"]
    sft = _tiny_plan(tmp_path)["phases"]["terms"]
    assert dpo["blocks"] == 2 * sft["blocks"]  # chosen and rejected in one batch


def test_plan_total_is_an_estimate_not_an_upper_bound(tmp_path, capsys):
    """The estimate rests on measured per-block constants and a runtime allowance: never called an upper bound."""
    (tmp_path / "c.yaml").write_text(
        "name: p\nmodel: {name: arch:llama, config: {num_hidden_layers: 2}}\ndata: {train: x}\n"
        "tuning: {kind: lora}\nobjective: {kind: sft}\n")
    assert main(["plan", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "upper bound" not in out.replace("not an upper bound", "")
    assert "not an upper bound" in out and "training logits" in out and "runtime" in out


def test_plan_counts_the_heap_holes_of_the_tensors_under_the_mmap_threshold(tmp_path, monkeypatch):
    """glibc's heap keeps a measured share (HEAP_HOLES) of the block activations it serves resident after backward;
    a tensor at or above the mmap threshold is its own mapping and leaves none (allocator.py)."""
    from tunesmith.plan import HEAP_HOLES

    monkeypatch.delenv("TUNESMITH_MMAP_THRESHOLD", raising=False)  # 16 MiB: every tensor of this tiny run is under
    terms = _tiny_plan(tmp_path, objective__loss_chunk=0)["phases"]["terms"]
    assert terms["heap holes"] == pytest.approx(HEAP_HOLES * (terms["blocks"] + terms["adapters"]))
    ckpt = _tiny_plan(tmp_path, train__gradient_checkpointing="true")["phases"]["terms"]
    assert ckpt["heap holes"] == pytest.approx(terms["heap holes"])  # every block's, checkpointed or not
    monkeypatch.setenv("TUNESMITH_MMAP_THRESHOLD", "0")  # glibc's own threshold, rising to 32 MiB: the same
    assert _tiny_plan(tmp_path, objective__loss_chunk=0)["phases"]["terms"]["heap holes"] == terms["heap holes"]
    # 4 x 128 tokens: a hidden-wide tensor (64) is 128 KiB, an intermediate-wide one (128) 256 KiB; between the
    # two, the MLP's 4 intermediate-wide tensors per block are mapped and only the rest leaves holes
    monkeypatch.setenv("TUNESMITH_MMAP_THRESHOLD", str(200_000))
    mid = _tiny_plan(tmp_path, objective__loss_chunk=0)["phases"]["terms"]["heap holes"]
    mlp = 2 * 4 * 128 * 4 * 128 * 4  # layers x tokens x 4 tensors x 128 wide x 4 bytes
    assert mid == pytest.approx(HEAP_HOLES * (terms["blocks"] - mlp + terms["adapters"]))
    monkeypatch.setenv("TUNESMITH_MMAP_THRESHOLD", "65536")  # under both: nothing from the heap
    assert "heap holes" not in _tiny_plan(tmp_path)["phases"]["terms"]
    monkeypatch.delenv("TUNESMITH_MMAP_THRESHOLD")
    from tunesmith import allocator

    monkeypatch.setattr(allocator, "active", lambda: "jemalloc")  # the command on jemalloc: size classes, no holes
    assert "heap holes" not in _tiny_plan(tmp_path, objective__loss_chunk=0)["phases"]["terms"]
