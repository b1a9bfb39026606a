"""Write a (merged) Llama-family causal LM as one GGUF file (f32, q8_0, q5_1, q5_0, q4_1 or q4_0) with its tokenizer, using the
`gguf` package the way llama.cpp's `convert_hf_to_gguf.py` does.

- Tensor names come from gguf's own name map (`model.layers.3.self_attn.q_proj.weight` ->
  `blk.3.attn_q.weight`); a tied LM head is left out (readers tie it back when `output.weight` is absent).
- The rows of Q and K are permuted from Hugging Face's rotary layout (two half-rotations) to GGML's
  interleaved one, per head (K per key/value head), exactly as llama.cpp does; readers undo it.
- q8_0 stores each 2-D weight in blocks of 32 values with one scale (8.5 bits per value), q5_1/q5_0/q4_1/q4_0
  in blocks of 32 with 5 or 4 bits a value (6, 5.5, 5, 4.5 bits with their scales); norms stay f32.
- The tokenizer goes in as GGUF metadata (gguf_vocab.py: byte-level BPE with the pre-tokenizer name llama.cpp
  needs, token types, merges, special ids, chat template), so llama.cpp and transformers' GGUF loader rebuild
  it without the original files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from . import gguf_vocab
from .gguf_vocab import NotExportable

QUANTS = {"f32": "ALL_F32", "q8_0": "MOSTLY_Q8_0", "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0",
          "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}
"""GGUF types gguf-py quantizes in Python -> llama.cpp's file type. K-quants (q4_k_m, q5_k_m) are not among
them: gguf-py only reads those; llama.cpp's `llama-quantize` makes them from the f32 file."""


def check_exportable(config) -> None:
    """Only what this writer reproduces exactly: plain Llama blocks with default rotary embeddings."""
    if config.model_type != "llama":
        raise NotExportable(f"GGUF export writes Llama-family models; this one is {config.model_type!r}",
                            hint="export --format merged writes any mergeable run as a transformers folder")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise NotExportable(f"rotary scaling {rope.get('rope_type')!r} is not written by this exporter")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise NotExportable("Llama models with attention or MLP biases are not written by this exporter")


def _permute(weight: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """Hugging Face's rotary row order -> GGML's (llama.cpp `LlamaModel.permute`)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensor(writer, name: str, data: np.ndarray, quant: str) -> None:
    import gguf

    if quant != "f32" and data.ndim == 2 and data.shape[-1] % 32 == 0:  # all these types use blocks of 32
        qtype = gguf.GGMLQuantizationType[quant.upper()]
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float32))


def write(model, tokenizer, path: Path, quant: str = "f32", name: str = "tunesmith") -> Path:
    """Write `model` (a plain LlamaForCausalLM) and `tokenizer` to `path` as GGUF."""
    import gguf

    config = model.config
    check_exportable(config)
    if quant not in QUANTS:
        raise NotExportable(f"unknown GGUF type {quant!r}; choose from {', '.join(QUANTS)}")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    path.parent.mkdir(parents=True, exist_ok=True)

    tmp = path.with_name(path.name + ".partial")  # renamed once whole: a failed export leaves no .gguf behind
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    # llama.cpp takes the head size from key_length/value_length, else hidden_size / heads, and refuses a file whose
    # rotary dimension differs from it ("invalid n_rot"): written always, so a head_dim of its own (not hidden /
    # heads) loads too. transformers' GGUF reader takes head_dim from the rotary dimension, so it cannot notice.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[QUANTS[quant]])
    if quant != "f32":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_vocab.write(writer, tokenizer, config.vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise NotExportable(f"no GGUF name for tensor {key!r}")
        data = value.detach().to(torch.float32).cpu().numpy()
        if key.endswith("q_proj.weight"):
            data = _permute(data, n_head, n_head)
        elif key.endswith("k_proj.weight"):
            data = _permute(data, n_head, n_kv)
        _tensor(writer, new, data, quant)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def load(path: Path):
    """The model and tokenizer back from a GGUF file, through transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unittest import mock

    from ..models.load import quiet_transformers

    # the GGUF reader draws its own tqdm bar, which transformers' progress-bar switch does not reach
    with quiet_transformers(), mock.patch("transformers.modeling_gguf_pytorch_utils.tqdm", lambda it, **_: it):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer
