"""`tunesmith chat RUN`: a conversation on stdin/stdout that keeps its history.

Each line read is a user turn; the model's answer is printed, and both join the conversation,
which is rendered by the same ChatFormat as in training (data/templates.py). Lines starting with
`/` are commands: `/reset` forgets the conversation, `/exit` ends (so does end of input).
With `--json`, every answer is one JSON line, so a program can drive the chat through a pipe.
At a terminal the answer is printed as it is generated (streamed), token by token.
"""

from __future__ import annotations

import json
from typing import TextIO

from ..evaluate.generation import answer


def _streamer(tokenizer, write):
    """A transformers streamer that writes the answer's text as it comes (not the prompt, not the stop token)."""
    from transformers import TextStreamer

    class Writer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            write(text)

    return Writer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat_loop(trained, settings, stdin: TextIO, stdout: TextIO, *, as_json: bool = False,
              interactive: bool = False, seed: int = 0, stream: bool | None = None) -> list[dict]:
    """Run the conversation until /exit or end of input; returns it (the messages exchanged).
    `stream` (default: when interactive and not json) prints each answer while it is generated."""
    messages: list[dict] = []
    stream = (interactive if stream is None else stream) and not as_json

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    if interactive:
        say("chat with the tuned model: /reset to start over, /exit or Ctrl-D to end")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = []
            if as_json:
                say(json.dumps({"reset": True}))
            continue
        messages.append({"role": "user", "content": text})
        streamer = _streamer(trained.chat.tokenizer, write) if stream else None
        reply = answer(trained.model, trained.chat, [messages], settings, seed, streamer=streamer)[0]
        messages.append({"role": "assistant", "content": reply.text})
        if as_json:
            say(json.dumps({"reply": reply.text, "stopped": reply.stopped, "tokens": reply.tokens,
                            "turn": len(messages) // 2}, ensure_ascii=False))
        elif stream:
            say("" if reply.stopped else " [...]")
        else:
            say(reply.text + ("" if reply.stopped else " [...]"))
            if interactive:
                say("")
    return messages
