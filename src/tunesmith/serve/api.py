"""The OpenAI-compatible HTTP API over the served models (FastAPI). See docs/serve.md.

  GET  /v1/models                 the served models (and GET /v1/models/{id})
  POST /v1/chat/completions       a chat turn, through the model's own chat template (stream: server-sent events)
  POST /v1/completions            text continued as is (every causal LM; a clm run's only endpoint)
  POST /v1/classifications        labels and class probabilities (classifier runs)
  GET  /health                    liveness, without the API key

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for a
bad request; a bug answers 500 in the same shape and its traceback goes to the server's log, not the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from . import generating
from .models import ENDPOINTS, Served
from .schemas import ChatRequest, ClassificationRequest, CompletionRequest
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


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return error(self.status, self.message, param=self.param, code=self.code, kind=self.kind, headers=self.headers)


def error(status: int, message: str, *, param=None, code=None, kind="invalid_request_error",
          headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


class Guard:
    """ASGI middleware in front of every route: the API key, then the body size (read whole, up to the limit,
    before any route sees it)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and scope["path"] != "/health" and \
                not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await error(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                               code="invalid_api_key")(scope, receive, send)
        too_big = error(413, f"request body over this server's limit of {self.max_body} bytes (--max-body)",
                        code="request_too_large")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return await error(400, "bad Content-Length header")(scope, receive, send)
        if int(declared) > self.max_body:
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what follows the body: a disconnect, which streams listen for

        await self.app(scope, replay, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a request body as (message, param)."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ())[1:]]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({(first.get('ctx') or {}).get('error', 'decode error')})", None
    if first.get("type") == "missing" and param is None:
        return "the request needs a JSON body", None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if param is None or isinstance(given, (dict, list)) else f" (got {json.dumps(given)[:80]})"
    return (f"{param}: {msg}{shown}" if param else msg), param


def build(served: dict[str, Served], limits: Limits, api_key: str | None = None) -> FastAPI:
    """The app for these models; `api_key` None: no key needed."""
    workers = Workers(limits.workers, limits.queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        workers.close()  # stop generations still running, so shutdown does not wait for them

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        message = f"no such endpoint: {request.method} {request.url.path}" if exc.status_code == 404 else \
            f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else str(exc.detail)
        return error(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.error("error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, f"internal error in tunesmith serve ({type(exc).__name__}); the server's log has the "
                          "details", kind="server_error")

    def pick(name: str, endpoint: str) -> Served:
        found = served.get(name)
        if found is None:
            raise ApiError(404, f"no model named {name!r}; this server has: {', '.join(served)}", param="model",
                           code="model_not_found")
        if endpoint not in ENDPOINTS[found.kind]:
            raise ApiError(400, f"{name!r} is a {found.kind} model; it answers {', '.join(ENDPOINTS[found.kind])}",
                           param="model", code="wrong_endpoint")
        return found

    async def run(job, cancel: threading.Event):
        try:
            return await workers.run(job, cancel, limits.timeout)
        except Busy:
            raise busy() from None
        except asyncio.TimeoutError:
            raise timed_out() from None

    def busy() -> ApiError:
        return ApiError(429, f"the server is busy ({limits.workers} running, {limits.queue} waiting: --workers, "
                             "--queue); retry later", kind="rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})

    def timed_out() -> ApiError:
        return ApiError(504, f"the request took longer than this server's limit of {limits.timeout:g} s (--timeout)",
                        kind="server_error", code="timeout")

    def request_for(model: Served, body, prompt: list[int], strip: bool) -> generating.Request:
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        asked = body.max_tokens or getattr(body, "max_completion_tokens", None)
        if asked is not None and asked > limits.max_tokens:
            raise ApiError(400, f"max_tokens {asked} is over this server's cap of {limits.max_tokens} (--max-tokens)",
                           param="max_tokens")
        room = model.context - len(prompt) if model.context else limits.max_tokens
        if room < 1 or (asked or 0) > room:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) and max_tokens ({asked or 1}) exceed the model's "
                                f"context of {model.context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        default = min(model.trained.generate.max_new_tokens, limits.max_tokens, room)
        update: dict = {"max_new_tokens": asked or default, "batch_size": 1}
        if body.temperature is not None:
            update.update(do_sample=body.temperature > 0, temperature=body.temperature or 1.0)
        if body.top_p is not None:
            update["top_p"] = body.top_p
        settings = model.trained.generate.model_copy(update=update)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        return generating.Request(prompt, settings, body.stops(), seed, strip)

    def usage(req: generating.Request, result: generating.Result) -> dict:
        return {"prompt_tokens": len(req.prompt), "completion_tokens": result.tokens,
                "total_tokens": len(req.prompt) + result.tokens}

    async def answer(model: Served, chat, req: generating.Request, body, shape):
        """The whole answer as one response, or (stream) as server-sent events."""
        cancel = threading.Event()
        meta = {"id": f"{shape.prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model.name}
        if not body.stream:
            result = await run(lambda: generating.run(model, chat, req, cancel), cancel)
            if result is None:  # cancelled by the server's shutdown
                raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            return {**meta, "object": shape.object, "choices": [shape.choice(result.text, result.finish_reason)],
                    "usage": usage(req, result)}
        return stream(model, chat, req, body, shape, meta, cancel)

    def stream(model: Served, chat, req, body, shape, meta, cancel: threading.Event) -> StreamingResponse:
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
            workers.submit(job, cancel)  # refused before the stream starts: a plain 429
        except Busy:
            raise busy() from None

        def event(choice: dict | None, **extra) -> str:
            chunk = {**meta, "object": shape.chunk_object, "choices": [choice] if choice else [], **extra}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        def failed(e: ApiError) -> str:
            return f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': None, 'code': e.code}})}\n\n"

        async def events_out():
            deadline = loop.time() + limits.timeout
            try:
                if shape.first is not None:
                    yield event(shape.first)
                while True:
                    try:
                        kind, value = await asyncio.wait_for(events.get(), max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        yield failed(timed_out())
                        break
                    if kind == "text":
                        yield event(shape.delta(value, None))
                    elif kind == "error":
                        yield failed(ApiError(500, f"internal error ({type(value).__name__}); see the server's log",
                                              kind="server_error"))
                        break
                    else:
                        if value is not None:
                            yield event(shape.delta("", value.finish_reason))
                            options = body.stream_options
                            if options is not None and options.include_usage:
                                yield event(None, usage=usage(req, value))
                        break
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # finished, timed out or the client left: stop generating either way

        return StreamingResponse(events_out(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(served)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.describe() for m in served.values()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name not in served:
            raise ApiError(404, f"no model named {name!r}; this server has: {', '.join(served)}", param="model",
                           code="model_not_found")
        return served[name].describe()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        from ..data.templates import TemplateError

        model = pick(body.model, "/v1/chat/completions")
        chat = model.trained.chat
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = chat.encode_prompt(messages)
        except TemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await answer(model, chat, request_for(model, body, prompt, strip=True), body, CHAT)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        model = pick(body.model, "/v1/completions")
        plain = model.plain
        prompt = plain.encode_prompt([{"role": "user", "content": body.prompt}])
        return await answer(model, plain, request_for(model, body, prompt, strip=False), body, TEXT)

    @app.post("/v1/classifications")
    async def classifications(body: ClassificationRequest):
        model = pick(body.model, "/v1/classifications")
        trained, cancel = model.trained, threading.Event()
        out = await run(lambda: trained.objective.predict(trained.model, trained.tokenizer, body.input,
                                                          trained.data_cfg), cancel)
        return {"object": "list", "model": model.name,
                "data": [{"object": "classification", "index": i, "label": o["label"], "probabilities": o["scores"]}
                         for i, o in enumerate(out)]}

    return app


@dataclass(frozen=True)
class Shape:
    """How one API names its objects and puts text into a choice."""

    prefix: str
    object: str
    chunk_object: str
    first: dict | None
    """The chunk a stream starts with (chat: the assistant's role), or None."""
    text_key: str

    def choice(self, text: str, finish_reason: str) -> dict:
        if self.text_key == "message":
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str, finish_reason: str | None) -> dict:
        if self.text_key == "message":
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk",
             {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
             "message")
TEXT = Shape("cmpl", "text_completion", "text_completion", None, "text")
