"""The OpenAI-compatible HTTP API over the served models (FastAPI). See docs/serve.md.

  GET  /v1/models                 the served models (and GET /v1/models/{id})
  POST /v1/chat/completions       a chat turn, through the model's own chat template (stream: server-sent events)
  POST /v1/completions            text continued as is (every causal LM; a clm run's only endpoint)
  POST /v1/classifications        labels and class probabilities (classifier runs)
  POST /v1/embeddings             one embedding per text, pooled as trained (embed runs)
  GET  /health                    liveness, without the API key

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for a
bad request; a bug answers 500 in the same shape and its traceback goes to the server's log, not the client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from .models import Served
from .schemas import ChatRequest, ClassificationRequest, CompletionRequest, EmbeddingRequest
from .service import Limits, Service
from .shapes import CHAT, TEXT, ApiError, error

log = logging.getLogger("tunesmith.serve")

__all__ = ["Limits", "build"]


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
    service = Service(served, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.workers.close()  # stop generations still running, so shutdown does not wait for them

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body)
    _errors(app)
    _routes(app, service)
    return app


def request_errors(app: FastAPI) -> None:
    """A refused request (ApiError) and a body that fails its schema, as 4xx in the one error shape: shared by
    every tunesmith web app (serve, ui)."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error(400, message, param=param)


def _errors(app: FastAPI) -> None:
    """Every failure in OpenAI's error shape: bad requests 4xx, a bug 500 with its traceback in the log only."""
    request_errors(app)

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


def _routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(service.served)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.describe() for m in service.served.values()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        return service.pick(name).describe()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        from ..data.templates import TemplateError

        model = service.pick(body.model, "/v1/chat/completions")
        chat = model.trained.chat
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = chat.encode_prompt(messages)
        except TemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await service.answer(model, chat, service.request_for(model, body, prompt, strip=True), body, CHAT)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        model = service.pick(body.model, "/v1/completions")
        prompt = model.plain.encode_prompt([{"role": "user", "content": body.prompt}])
        return await service.answer(model, model.plain, service.request_for(model, body, prompt, strip=False),
                                    body, TEXT)

    @app.post("/v1/classifications")
    async def classifications(body: ClassificationRequest):
        return await service.classify(service.pick(body.model, "/v1/classifications"), body.input)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return await service.embed(service.pick(body.model, "/v1/embeddings"), body.input, body.encoding_format)
