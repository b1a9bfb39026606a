"""What the API's routes do, apart from HTTP: pick the model, check the request against the limits, run the
generation in a worker, and shape the answer (whole, or as server-sent events)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import struct
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from . import generating
from .models import ENDPOINTS, Served
from .shapes import ApiError, Shape
from .workers import Busy, Workers

log = logging.getLogger("tunesmith.serve")


@dataclass
class Limits:
    max_tokens: int = 1024
    """Cap on max_tokens: a request asking for more is refused (400)."""
    max_body: int = 1 << 20
    """Largest request body in bytes (413 beyond)."""
    workers: int = 1
    """Generations (or classification batches) computed at once, each in a worker thread."""
    queue: int = 8
    """Requests that may wait for a worker; one more is answered 429."""
    timeout: float = 300.0
    """Seconds a request may take, waiting in the queue included (504 beyond; the generation is stopped)."""


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Service:
    def __init__(self, served: dict[str, Served], limits: Limits):
        self.served, self.limits = served, limits
        self.workers = Workers(limits.workers, limits.queue)

    # -- checks -----------------------------------------------------------------------------------------------

    def pick(self, name: str, endpoint: str | None = None) -> Served:
        found = self.served.get(name)
        if found is None:
            raise ApiError(404, f"no model named {name!r}; this server has: {', '.join(self.served)}",
                           param="model", code="model_not_found")
        if endpoint is not None and endpoint not in ENDPOINTS[found.kind]:
            raise ApiError(400, f"{name!r} is a {found.kind} model; it answers {', '.join(ENDPOINTS[found.kind])}",
                           param="model", code="wrong_endpoint")
        return found

    def busy(self) -> ApiError:
        return ApiError(429, f"the server is busy ({self.limits.workers} running, {self.limits.queue} waiting: "
                             "--workers, --queue); retry later", kind="rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})

    def timed_out(self) -> ApiError:
        return ApiError(504, f"the request took longer than this server's limit of {self.limits.timeout:g} s "
                             "(--timeout)", kind="server_error", code="timeout")

    def request_for(self, model: Served, body, prompt: list[int], strip: bool) -> generating.Request:
        """The generation a request asks for, within the server's cap and the model's context."""
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        asked = body.max_tokens or getattr(body, "max_completion_tokens", None)
        cap = self.limits.max_tokens
        if asked is not None and asked > cap:
            raise ApiError(400, f"max_tokens {asked} is over this server's cap of {cap} (--max-tokens)",
                           param="max_tokens")
        room = model.context - len(prompt) if model.context else cap
        if room < 1 or (asked or 0) > room:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({asked or 1}) exceed the "
                                f"model's context of {model.context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        update: dict = {"max_new_tokens": asked or min(model.trained.generate.max_new_tokens, cap, room),
                        "batch_size": 1}
        if body.temperature is not None:
            update.update(do_sample=body.temperature > 0, temperature=body.temperature or 1.0)
        if body.top_p is not None:
            update["top_p"] = body.top_p
        settings = model.trained.generate.model_copy(update=update)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        return generating.Request(prompt, settings, body.stops(), seed, strip)

    # -- running ----------------------------------------------------------------------------------------------

    async def run(self, job, cancel: threading.Event):
        """`job()` in a worker: 429 when the queue is full, 504 past the timeout."""
        try:
            return await self.workers.run(job, cancel, self.limits.timeout)
        except Busy:
            raise self.busy() from None
        except asyncio.TimeoutError:
            raise self.timed_out() from None

    async def classify(self, model: Served, texts: list[str]) -> dict:
        trained = model.trained
        out = await self.run(lambda: trained.objective.predict(trained.model, trained.tokenizer, texts,
                                                               trained.data_cfg), threading.Event())
        return {"object": "list", "model": model.name,
                "data": [{"object": "classification", "index": i, "label": o["label"], "probabilities": o["scores"]}
                         for i, o in enumerate(out)]}

    async def embed(self, model: Served, texts: list[str], encoding_format: str) -> dict:
        trained = model.trained
        vectors = await self.run(lambda: trained.objective.encode(trained.model, trained.tokenizer, texts,
                                                                  trained.obj_cfg, trained.data_cfg), threading.Event())
        tokens = sum(len(ids) for ids in trained.tokenizer(texts, truncation=True,
                                                           max_length=trained.data_cfg.max_length)["input_ids"])
        as_sent = (lambda v: v) if encoding_format == "float" else \
            (lambda v: base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode())
        return {"object": "list", "model": model.name,
                "data": [{"object": "embedding", "index": i, "embedding": as_sent(v)} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def answer(self, model: Served, chat, req: generating.Request, body, shape: Shape):
        """The whole answer as one response, or (stream) as server-sent events."""
        cancel = threading.Event()
        meta = {"id": f"{shape.prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model.name}
        if body.stream:
            return self.stream(model, chat, req, body, shape, meta, cancel)
        result = await self.run(lambda: generating.run(model, chat, req, cancel), cancel)
        if result is None:  # cancelled by the server's shutdown
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
        return {**meta, "object": shape.object, "choices": [shape.choice(result.text, result.finish_reason)],
                "usage": _usage(req, result)}

    def stream(self, model: Served, chat, req, body, shape: Shape, meta: dict,
               cancel: threading.Event) -> StreamingResponse:
        """Start the generation (or refuse it: a plain 429 before any event) and stream its pieces as they come."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(kind: str, value) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def job():
            try:
                put("done", generating.run(model, chat, req, cancel, write=lambda text: put("text", text)))
            except Exception as e:  # noqa: BLE001 - reported in the stream; the traceback goes to the log
                log.error("error generating for %s", model.name, exc_info=e)
                put("error", e)

        try:
            self.workers.submit(job, cancel)
        except Busy:
            raise self.busy() from None
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(self._events(events, req, shape, meta, cancel, usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(self, events: asyncio.Queue, req, shape: Shape, meta: dict, cancel: threading.Event,
                      usage: bool):
        """Server-sent events: the chunks, an error event if it fails or times out, then `[DONE]`."""
        def chunk(choice: dict | None, **extra) -> str:
            return _sse({**meta, "object": shape.chunk_object, "choices": [choice] if choice else [], **extra})

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.timeout
        try:
            if shape.first() is not None:
                yield chunk(shape.first())
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    yield _sse(self.timed_out().body())
                    break
                if kind == "text":
                    yield chunk(shape.delta(value, None))
                    continue
                if kind == "error":
                    yield _sse(ApiError(500, f"internal error ({type(value).__name__}); see the server's log",
                                        kind="server_error").body())
                elif value is not None:
                    yield chunk(shape.delta("", value.finish_reason))
                    if usage:
                        yield chunk(None, usage=_usage(req, value))
                break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()  # finished, timed out or the client left: stop generating either way


def _usage(req: generating.Request, result: generating.Result) -> dict:
    return {"prompt_tokens": len(req.prompt), "completion_tokens": result.tokens,
            "total_tokens": len(req.prompt) + result.tokens}
