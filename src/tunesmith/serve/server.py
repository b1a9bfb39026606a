"""`tunesmith serve RUN_OR_MODEL ...`: load the models, bind the address, answer the OpenAI API until stopped.

    tunesmith serve runs/sft-lora runs/sentiment --port 8000 --api-key KEY

Everything that can be wrong with the command line (a run that is not finished, two models of one name,
a port in use) is reported before the server starts. Ctrl-C or SIGTERM stops it cleanly: running
generations are cancelled and the command exits 0.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import sys
from contextlib import contextmanager

from ..errors import TunesmithError
from .api import build
from .service import Limits
from .models import load


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
    except socket.gaierror:
        raise TunesmithError(f"unknown host {host!r}", where="--host") from None
    except OSError as e:
        raise TunesmithError(f"cannot listen on {host}:{port} ({e.strerror or e})", where="--port",
                             hint="choose another --port (0 picks a free one)") from None
    sock.set_inheritable(True)
    return sock


def _is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextmanager
def _signals_end_the_server():
    """uvicorn handles Ctrl-C and SIGTERM while it runs, then raises the signal again once it has shut down:
    by then the server has stopped as asked, so that second signal is ignored instead of ending in an error."""
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: None)
    except ValueError:  # not the main thread: uvicorn leaves signals alone there too
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(sources: list[str], host: str, port: int, api_key: str | None, limits: Limits,
          trust_remote_code: bool = False) -> int:
    import uvicorn

    served = load(sources, trust_remote_code)
    app = build(served, limits, api_key)
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    width = max(len(name) for name in served)
    print(f"serving {len(served)} model{'s' * (len(served) != 1)} at http://{shown}:{bound_port}/v1 "
          f"({'API key required' if api_key else 'no API key'}; Ctrl-C stops)")
    for model in served.values():
        print(f"  {model.name:<{width}}  {model.kind:<10}  {model.source}")
    sys.stdout.flush()
    if not _is_local(bound_host) and not api_key:
        print(f"warning: listening on {host}, reachable from other machines, without --api-key", file=sys.stderr)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5, server_header=False)
    with _signals_end_the_server():
        uvicorn.Server(config).run(sockets=[sock])
    sock.close()
    print("server stopped")
    return 0
