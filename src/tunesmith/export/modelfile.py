"""An Ollama Modelfile next to an exported GGUF file (`x.gguf` -> `x.Modelfile`): `ollama create NAME -f
x.Modelfile` in that folder, then `ollama run NAME`.

It names the file (FROM ./x.gguf), the chat template in Ollama's Go-template form, the end-of-turn token as a
stop word and the run's generation settings. The template is written only for ChatML-style chat templates (as
SmolLM2's), and only after rendering the run's own Jinja template on a conversation shows it is exactly ChatML,
with a default system prompt (if the template adds one) written as SYSTEM. Any other template is left to
Ollama, which reads the one stored in the GGUF file, and the Modelfile says so.
"""

from __future__ import annotations

from pathlib import Path

CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
"""ChatML in Ollama's Go template: every message in turn, then the opening of the assistant's turn."""


def _chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def chatml_system(tokenizer) -> str | None | bool:
    """False when the tokenizer's chat template is not ChatML; else the default system prompt it adds (or None)."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return False
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    try:
        if tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) != _chatml(conversation):
            return False
        alone = [{"role": "user", "content": "U"}]
        rendered = tokenizer.apply_chat_template(alone, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that cannot render this conversation is not plain ChatML
        return False
    if rendered == _chatml(alone):
        return None
    head, sep, tail = rendered.partition("<|im_start|>user\nU")
    prefix, suffix = "<|im_start|>system\n", "<|im_end|>\n"
    if sep and "<|im_start|>user\nU" + tail == _chatml(alone) and head.startswith(prefix) and head.endswith(suffix):
        return head[len(prefix):-len(suffix)]
    return False


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def write(gguf_path: Path, tokenizer, generate, stop: str | None) -> Path:
    """Write the Modelfile next to `gguf_path`; `generate` is the run's GenerateConfig, `stop` its end-of-turn token."""
    path = gguf_path.with_suffix(".Modelfile")  # one per exported file: several quant types share a folder
    lines = [f"# ollama create {gguf_path.stem} -f {path.name}   (run in this folder)",
             f"FROM ./{gguf_path.name}", ""]
    system = chatml_system(tokenizer)
    if system is False:
        lines.append("# the chat template is not ChatML: Ollama uses the one stored in the GGUF file")
    else:
        lines.append(f"TEMPLATE {_quoted(CHATML)}")
        if system:
            lines.append(f"SYSTEM {_quoted(system)}")
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    # the run's generation settings (generate: in its config); greedy decoding is temperature 0 in Ollama
    lines.append(f"PARAMETER temperature {generate.temperature if generate.do_sample else 0}")
    if generate.do_sample:
        lines.append(f"PARAMETER top_p {generate.top_p}")
    lines.append(f"PARAMETER repeat_penalty {generate.repetition_penalty}")
    lines.append(f"PARAMETER num_predict {generate.max_new_tokens}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
