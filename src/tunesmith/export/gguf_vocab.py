"""The tokenizer as GGUF metadata, written the way llama.cpp's `convert_hf_to_gguf.py` writes a byte-level BPE
vocabulary, so llama.cpp (and Ollama, LM Studio, transformers' GGUF loader) rebuild the same tokenizer.

llama.cpp splits text before BPE with a regex it picks from `tokenizer.ggml.pre`. It knows the name of a
tokenizer by a hash: the ids of a fixed test text, as llama.cpp's converter computes them. This module does
the same, then falls back to the shape of the tokenizer's pre-tokenizer for tokenizers no table lists (a
tokenizer trained from scratch): a plain GPT-2 byte-level split is `gpt-2`; the same with every digit split
off first is `smollm`. Anything else is refused with the hash, never written under a wrong name.
"""

from __future__ import annotations

import json
from hashlib import sha256

from ..errors import TunesmithError

CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
"""llama.cpp's `chktxt` (convert_hf_to_gguf.py, get_vocab_base_pre): the hash of its token ids names the
pre-tokenizer."""

KNOWN: dict[str, str] = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
}
"""chkhsh -> `tokenizer.ggml.pre`, copied from llama.cpp's table for the byte-level BPE models it lists."""


class NotExportable(TunesmithError):
    """The model or tokenizer has a form this GGUF writer does not produce."""


def check_hash(tokenizer) -> str:
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def _byte_level(step: dict) -> bool:
    return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")


def pre_tokenizer_name(tokenizer, spec: dict) -> str:
    """The `tokenizer.ggml.pre` llama.cpp needs to split text as this tokenizer does."""
    chkhsh = check_hash(tokenizer)
    if chkhsh in KNOWN:
        return KNOWN[chkhsh]
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _byte_level(steps[0]):
        return "gpt-2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and _byte_level(steps[1])):
        return "smollm"
    raise NotExportable(
        f"llama.cpp would not split text as this tokenizer does: its pre-tokenizer ({json.dumps(pre)[:200]}) is "
        f"neither a known model's (hash {chkhsh[:16]}...) nor a plain GPT-2 byte-level split",
        hint="export --format merged writes the model as a transformers folder; llama.cpp's convert_hf_to_gguf.py "
             "converts it if llama.cpp knows this tokenizer")


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (as llama.cpp's converter treats them)."""
    return token.startswith("<|") and token.endswith("|>")


def end_of_turn(tokenizer) -> str | None:
    """The token that ends an assistant turn in the chat template: ChatML's `<|im_end|>`, else the eos token."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<|im_end|>" in template and "<|im_end|>" in tokenizer.get_vocab():
        return "<|im_end|>"
    return tokenizer.eos_token


def write(writer, tokenizer, vocab_size: int) -> None:
    """Tokens, token types, merges, special ids, add_bos/add_eos and the chat template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise NotExportable(f"GGUF export writes byte-level BPE tokenizers (as SmolLM2's); this one is "
                            f"{spec['model']['type']}", hint="export --format merged writes any tokenizer")
    pre = pre_tokenizer_name(tokenizer, spec)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise NotExportable(f"the tokenizer has {len(by_id)} tokens, more than the model's {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses, padded as llama.cpp pads them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or _looks_special(token):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    eot = end_of_turn(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(eot))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and len(probe) > 1 and probe[-1] == tokenizer.eos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
