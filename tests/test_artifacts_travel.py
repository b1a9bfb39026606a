"""Artifacts that work outside tunesmith: GGUF files llama.cpp accepts (its pre-tokenizer name, every tokenizer
field, the quant types gguf-py writes), an Ollama Modelfile, adapter folders plain peft loads from another path,
and saved weights readable like any other file."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

from tunesmith.cli import main
from tiny import CHAT_TEMPLATE, make_bpe_tokenizer, train_small

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train(root, model, data, tuning: str, name: str, objective: str = "clm"):
    return train_small(root, model, data, tuning, name, objective, steps=4, generate='max_new_tokens: 40, repetition_penalty: 1.3')


# --- the pre-tokenizer llama.cpp needs ------------------------------------------------------------------------

def test_pre_tokenizer_name_follows_the_tokenizer_not_a_fixed_gpt2():
    from tokenizers import pre_tokenizers

    from tunesmith.export.gguf_vocab import NotExportable, pre_tokenizer_name

    def named(tok):
        return pre_tokenizer_name(tok, json.loads(tok.backend_tokenizer.to_str()))

    tok = make_bpe_tokenizer()
    assert named(tok) == "gpt-2"  # llama.cpp's name for the plain GPT-2 split; it refuses 'gpt2'
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert named(tok) == "smollm"
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(NotExportable, match="llama.cpp would not split text as this tokenizer does"):
        named(tok)


@pytest.mark.integration
def test_smollm2_tokenizer_is_smollm_by_llama_cpp_hash():
    """llama.cpp's own hash of SmolLM2's tokenizer (its tokenizer alone: no weights are read)."""
    from transformers import AutoTokenizer

    from tunesmith.export.gguf_vocab import KNOWN, check_hash, pre_tokenizer_name
    from tunesmith.models.load import resolve

    tok = AutoTokenizer.from_pretrained(resolve("sample:smollm2-135m-instruct"))
    chkhsh = check_hash(tok)
    assert KNOWN.get(chkhsh) == "smollm", chkhsh
    assert pre_tokenizer_name(tok, json.loads(tok.backend_tokenizer.to_str())) == "smollm"


# --- GGUF: tokenizer fields, quant types, Modelfile -----------------------------------------------------------

def _field(reader, key):
    f = reader.fields[key]
    values = [f.parts[i] for i in f.data]
    if f.types[0].name == "STRING":
        return bytes(values[0]).decode()
    if f.types[0].name == "ARRAY":
        return values
    return values[0].tolist()[0] if hasattr(values[0], "tolist") else values[0]


def test_gguf_quant_types_read_back_close_to_f32(tmp_path, bpe_llama):
    """Each quant type gguf-py writes dequantizes to within its precision of the f32 weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export import gguf as gguf_export

    model = AutoModelForCausalLM.from_pretrained(bpe_llama)
    tokenizer = AutoTokenizer.from_pretrained(bpe_llama)
    gguf_export.write(model, tokenizer, tmp_path / "f32.gguf", "f32")
    reference = {t.name: np.array(t.data) for t in GGUFReader(tmp_path / "f32.gguf").tensors}
    bound = {"q8_0": 0.01, "q5_1": 0.05, "q5_0": 0.05, "q4_1": 0.1, "q4_0": 0.12}  # relative RMS error
    for quant, limit in bound.items():
        path = gguf_export.write(model, tokenizer, tmp_path / f"{quant}.gguf", quant)
        reader = GGUFReader(path)
        assert _field(reader, "general.file_type") == int(getattr(__import__("gguf").LlamaFileType,
                                                                  gguf_export.QUANTS[quant]))
        tensors = {t.name: t for t in reader.tensors}
        assert tensors["blk.0.attn_q.weight"].tensor_type.name == quant.upper()
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        for name, t in tensors.items():
            if t.tensor_type.name == "F32":
                continue
            ref = reference[name]
            got = dequantize(np.array(t.data), t.tensor_type).reshape(ref.shape)
            rel = float(np.sqrt(((got - ref) ** 2).mean()) / np.sqrt((ref ** 2).mean()))
            assert rel < limit, (quant, name, rel)
    assert not list(tmp_path.glob("*.partial"))
    from tunesmith.export.gguf import NotExportable

    with pytest.raises(NotExportable, match="unknown GGUF type 'q4_k_m'"):
        gguf_export.write(model, tokenizer, tmp_path / "k.gguf", "q4_k_m")
    assert not (tmp_path / "k.gguf").exists()


def test_gguf_export_writes_llama_cpp_tokenizer_fields_and_an_ollama_modelfile(in_tmp, bpe_llama, text_dir, capsys):
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer

    run = train(in_tmp, bpe_llama, text_dir, "{kind: lora, r: 4, alpha: 8}", "chat")
    capsys.readouterr()
    assert main(["export", str(run), "--format", "gguf", "--quant", "q4_0"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "export" / "export-gguf-q4_0.json").read_text())
    assert report["written"]["same_tokenization"] == 5
    tok = AutoTokenizer.from_pretrained(bpe_llama)

    reader = GGUFReader(run / "export" / "chat-q4_0.gguf")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert _field(reader, "tokenizer.ggml.eot_token_id") == im_end
    assert _field(reader, "tokenizer.ggml.eos_token_id") == im_end
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert not _field(reader, "tokenizer.ggml.add_bos_token")
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    types = [int(t[0]) for t in _field(reader, "tokenizer.ggml.token_type")]
    assert types[tok.convert_tokens_to_ids("<|im_start|>")] == TokenType.CONTROL
    assert types[tok("film")["input_ids"][-1]] == TokenType.NORMAL
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0

    modelfile = run / "export" / "chat-q4_0.Modelfile"
    assert f"wrote {modelfile}" in out
    text = modelfile.read_text()
    assert "FROM ./chat-q4_0.gguf\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' \
           '<|im_start|>assistant\n"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER temperature 0\n" in text  # the run decodes greedily
    assert "PARAMETER repeat_penalty 1.3\n" in text and "PARAMETER num_predict 40\n" in text
    assert "SYSTEM" not in text  # this template adds no default system prompt


def test_modelfile_template_only_for_what_renders_as_chatml(tmp_path):
    from types import SimpleNamespace

    from tunesmith.config import GenerateConfig
    from tunesmith.export import modelfile

    tok = make_bpe_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE
    assert modelfile.chatml_system(tok) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = modelfile.write(tmp_path / "m.gguf", tok, GenerateConfig(do_sample=True, temperature=0.7, top_p=0.9),
                           "<|im_end|>").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert "PARAMETER temperature 0.7\n" in text and "PARAMETER top_p 0.9\n" in text

    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert modelfile.chatml_system(tok) is False
    text = modelfile.write(tmp_path / "n.gguf", tok, GenerateConfig(), "</s>").read_text()
    assert "TEMPLATE" not in text and "not ChatML" in text
    assert modelfile.chatml_system(SimpleNamespace(chat_template=None)) is False


# --- adapters and weights that travel -------------------------------------------------------------------------

def test_adapter_folder_travels_and_loads_with_plain_peft(in_tmp, tiny_bert, sentiment_dir, tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.trained import load_trained

    old = os.umask(0o022)
    try:
        run = train(in_tmp, tiny_bert, sentiment_dir, "{kind: lora, r: 4}", "cls", objective="classify")
    finally:
        os.umask(old)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"].count("classifier") == 1
    assert config["base_model_name_or_path"] == str(tiny_bert)  # the name the config gave, as given
    for f in (run / "adapter").iterdir():  # safetensors writes 0600; saved files follow the umask like others
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f

    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(run / "adapter", elsewhere / "adapter")
    shutil.copytree(run, elsewhere / "run")
    shutil.rmtree(run)  # nothing may still point into the original folder
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    plain = PeftModel.from_pretrained(base, elsewhere / "adapter").eval()
    ours = load_trained(elsewhere / "run").model
    tok = AutoTokenizer.from_pretrained(elsewhere / "adapter")
    batch = tok(["a good film", "a dull plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-5)


def test_adapter_config_names_a_sample_base_by_its_sample_name(tmp_path, monkeypatch):
    from tunesmith import artifacts
    from tunesmith.models.samples import MODELS

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    cached = MODELS["smollm2-135m-instruct"].path()
    cached.mkdir(parents=True)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(cached), "modules_to_save": ["classifier", "score", "classifier"]}))
    artifacts.portable_adapter(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sample:smollm2-135m-instruct"
    assert config["modules_to_save"] == ["classifier", "score"]
    assert artifacts.portable_base_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_weights_a_tuning_saves_itself_follow_the_umask(in_tmp, tiny_bert, sentiment_dir):
    """Bottleneck adapters are saved by their own module, not by save_pretrained: the same permissions."""
    old = os.umask(0o027)
    try:
        run = train(in_tmp, tiny_bert, sentiment_dir, "{kind: adapter}", "bottleneck", objective="classify")
    finally:
        os.umask(old)
    files = [f for f in (run / "adapter").iterdir()]
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
