"""One generation for one request, the way `generate` and `chat` do it (evaluate/generation.py), plus what a
server needs: stop strings, cancellation, and text released piece by piece for a stream.

A streamed answer and the same answer in one piece are the same text: both pass through `Cut`, which
cuts at the first stop string and (for chat) strips the ends, and releases only text it will never
have to take back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


class Halt(StoppingCriteria):
    """Ends a generation when its request is cancelled (timeout, client gone, shutdown) or its text holds a stop
    string."""

    def __init__(self, tokenizer, prompt_len: int, stops: list[str], cancel: threading.Event):
        self.tokenizer, self.prompt_len, self.stops, self.cancel = tokenizer, prompt_len, stops, cancel

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        done = self.cancel.is_set()
        if not done and self.stops:
            text = self.tokenizer.decode(input_ids[0, self.prompt_len:], skip_special_tokens=True)
            done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Cut:
    """The answer's text as it grows: cut before the first stop string, its ends stripped when `strip`.
    `feed` returns the text that can be released now; `finish` the rest."""

    def __init__(self, stops: list[str], strip: bool):
        self.stops, self.strip = [s for s in stops if s], strip
        self.text, self.sent, self.hit_stop = "", "", False

    def _visible(self, final: bool) -> str:
        text = self.text.lstrip() if self.strip else self.text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit_stop = True
            text = text[:min(found)]
        elif not final:
            # hold back a tail that may be the start of a stop string
            held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - held]
        return text.rstrip() if self.strip else text  # trailing space waits for the text that follows it

    def _release(self, final: bool) -> str:
        if self.hit_stop:
            return ""
        visible = self._visible(final)
        new = visible[len(self.sent):]
        self.sent = visible
        return new

    def feed(self, piece: str) -> str:
        self.text += piece
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def whole(self, text: str) -> str:
        """All of an answer at once (what the pieces of a stream add up to)."""
        self.text = text
        return self.finish()


@dataclass
class Request:
    """One generation as the API asked for it."""

    prompt: list[int]
    settings: object
    """config.GenerateConfig: the model's settings with the request's (temperature, top_p, max_tokens)."""
    stops: list[str]
    seed: int
    strip: bool
    """Strip the answer's ends (chat turns, as `generate` prints them); a text completion keeps them."""


@dataclass
class Result:
    text: str
    tokens: int
    """New tokens generated (the stop token included)."""
    finish_reason: str
    """stop (a stop token or stop string) or length (max_tokens reached)."""


def run(served, chat, request: Request, cancel: threading.Event, write=None) -> Result | None:
    """Generate one answer (in a worker thread). `write(text)` receives the released text as it is generated.
    None when cancelled before or while generating."""
    from ..evaluate.generation import generate
    from .chat import _streamer

    if cancel.is_set():  # timed out while waiting in the queue
        return None
    cut = Cut(request.stops, request.strip)
    tokenizer = chat.tokenizer
    def release(piece: str) -> None:
        new = cut.feed(piece)
        if new:
            write(new)

    streamer = _streamer(tokenizer, release) if write is not None else None
    halt = Halt(tokenizer, len(request.prompt), request.stops, cancel)
    out = generate(served.trained.model, tokenizer, [request.prompt], request.settings, chat.stop_ids(),
                   request.seed, streamer=streamer, stopping=StoppingCriteriaList([halt]))[0]
    if cancel.is_set():
        return None
    if write is not None:
        rest = cut.finish()
        if rest:
            write(rest)
        text = cut.sent
    else:
        kept = out.ids[:-1] if out.stopped else out.ids
        text = cut.whole(tokenizer.decode(kept, skip_special_tokens=True))
    reason = "stop" if out.stopped or cut.hit_stop else "length"
    return Result(text, out.tokens, reason)
