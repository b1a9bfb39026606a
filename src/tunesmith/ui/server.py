"""`tunesmith ui [--host 127.0.0.1] [--port 7860] [--runs DIR] [--examples DIR]`: the web UI until stopped.

Binds to this machine only unless --host says otherwise (then with a warning: the page starts runs). The
port is checked before anything starts; Ctrl-C or SIGTERM stops the page (runs it started keep training).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import TunesmithError
from ..serve.server import _bind, _is_local, _signals_end_the_server
from .app import build


def ui(host: str, port: int, runs: Path, examples: Path) -> int:
    import uvicorn

    if runs.exists() and not runs.is_dir():
        raise TunesmithError(f"{runs} is not a folder", where="--runs", hint="give the folder that holds run folders")
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    local = _is_local(bound_host)
    app = build(runs, examples, local=local)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"tunesmith ui at http://{shown}:{bound_port}/ (runs in {runs.resolve()}; Ctrl-C stops)")
    sys.stdout.flush()
    if not local:
        print(f"warning: listening on {host}, reachable from other machines: anyone who can reach it can start runs",
              file=sys.stderr)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, server_header=False)
    with _signals_end_the_server():
        uvicorn.Server(config).run(sockets=[sock])
    sock.close()
    print("ui stopped")
    return 0
