"""The web UI's HTTP side (FastAPI): one page (static/index.html, app.js, style.css; nothing from the network)
and the JSON API it calls.

  GET  /api/runs                    the run list (the rows of `tunesmith runs`)
  GET  /api/runs/{name}             one run: row, config, data card, report sections (curves, findings, ...)
  GET  /api/runs/{name}/report      its report.html
  GET  /api/compare?a=RUN&b=RUN     two runs side by side
  GET  /api/examples[/{name}]       the example configs, and one's YAML
  POST /api/jobs                    {"yaml", "example"?, "force"?}: validate as `tunesmith train` does, then start
  GET  /api/jobs/{id}?offset=N      a started run's state and its log from byte N
  POST /api/chat                    {"run", "messages", "max_tokens"?, "temperature"?}: the next assistant turn

Every error is JSON, `{"error": {"message": ...}}`, 4xx for a bad request; a bug answers 500 and its traceback
goes to the log, never to the page. Requests that change something (POST) must come from the page itself: JSON
bodies only, and no other site's Origin, so a web page elsewhere cannot start runs on this machine.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Optional

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from ..errors import TunesmithError, from_os_error
from ..report.html import REPORT
from ..serve.api import request_errors
from ..serve.shapes import error
from . import views
from .jobs import Jobs
from .talk import Talk

log = logging.getLogger("tunesmith.ui")

STATIC = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
          "/style.css": ("style.css", "text/css")}
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
"""The page loads only its own files (report fragments carry inline style attributes, no script)."""


class NewRun(BaseModel):
    yaml: str
    """The run config's text."""
    example: Optional[str] = None
    """The example it was loaded from: sent unchanged, that file itself is trained (errors name it)."""
    force: bool = False
    """Replace a finished run of the same name (`--force`)."""


class ChatTurn(BaseModel):
    run: str
    messages: list[dict]
    """The conversation so far, OpenAI's shape: [{"role": "user", "content": "..."}, ...]."""
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None


class SameOrigin:
    """ASGI middleware: a POST must be JSON and must not come from another site (a browser sends Origin with a
    cross-site request); on a local address, the Host must name this machine (no DNS rebinding)."""

    def __init__(self, app, local: bool):
        self.app, self.local = app, local

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.local and hostname.strip("[]") not in ("localhost", "127.0.0.1", "::1"):
            return await error(403, f"this UI answers only on this machine (Host {host!r})")(scope, receive, send)
        if scope["method"] == "POST":
            origin = headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1] != host:
                return await error(403, f"requests from {origin} are refused")(scope, receive, send)
            if not headers.get("content-type", "").startswith("application/json"):
                return await error(415, "send a JSON body (Content-Type: application/json)")(scope, receive, send)
        await self.app(scope, receive, send)


def build(runs: Path, examples: Path, local: bool = True) -> FastAPI:
    """The UI over the run folders in `runs`, offering the configs in `examples` as starting points."""
    runs.mkdir(parents=True, exist_ok=True)
    jobs, talk = Jobs(runs, examples), Talk()
    app = FastAPI(title="tunesmith ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SameOrigin, local=local)
    _errors(app)
    _page(app)

    @app.get("/api/runs")
    def run_list():
        return {"dir": str(runs.resolve()), "runs": views.run_list(runs)}

    @app.get("/api/runs/{name}")
    def run_view(name: str):
        return views.run_view(runs, name)

    @app.get("/api/runs/{name}/report")
    def report(name: str):
        path = views.run_dir(runs, name) / REPORT
        if not path.is_file():
            raise TunesmithError(f"run {name!r} has no {REPORT} yet", hint=f"make it with `tunesmith report {path.parent}`")
        return FileResponse(path, media_type="text/html")

    @app.get("/api/compare")
    def compare(a: str, b: str):
        return views.comparison(runs, a, b)

    @app.get("/api/examples")
    def example_list():
        return {"dir": str(examples), "examples": list(jobs.example_paths())}

    @app.get("/api/examples/{name}")
    def example(name: str):
        return {"name": name, "yaml": jobs.example(name)}

    @app.post("/api/jobs")
    def start(body: NewRun):
        return jobs.start(body.yaml, body.example, body.force).describe()

    @app.get("/api/jobs")
    def job_list():
        return {"jobs": [job.describe() for job in jobs.jobs.values()]}

    @app.get("/api/jobs/{job_id}")
    def job_log(job_id: str, offset: int = 0):
        return jobs.log(job_id, offset)

    @app.post("/api/chat")
    async def chat(body: ChatTurn):
        return await talk.reply(body.run, views.run_dir(runs, body.run), body.messages, body.max_tokens,
                                body.temperature)

    return app


def _page(app: FastAPI) -> None:
    files = resources.files(__package__) / "static"
    for route, (name, media) in STATIC.items():
        def serve(name=name, media=media):
            return Response((files / name).read_bytes(), media_type=media,
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

        app.add_api_route(route, serve, methods=["GET"], include_in_schema=False)


def _errors(app: FastAPI) -> None:
    """Every failure as `{"error": {"message": ...}}`: the CLI's text for bad input, a bug's traceback in the log."""

    @app.exception_handler(TunesmithError)
    async def _bad_input(request, exc: TunesmithError):
        return error(400, exc.render())

    request_errors(app)

    @app.exception_handler(ValidationError)
    async def _invalid_chat(request, exc: ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(400, f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg")))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        message = f"no such page: {request.method} {request.url.path}" if exc.status_code == 404 else \
            f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else str(exc.detail)
        return error(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        known = from_os_error(exc) if isinstance(exc, OSError) else None  # a disk or path problem, not a bug
        if known is not None:
            return error(400, known.render())
        log.error("error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, f"internal error in tunesmith ui ({type(exc).__name__}); the log of `tunesmith ui` has the "
                          "details", kind="server_error")
