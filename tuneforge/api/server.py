"""Start the API server with uvicorn (blocking), or in a background thread for tests/notebooks.

Shutting down (SIGTERM, SIGINT, or leaving a BackgroundServer) drains: the listening socket is
closed and new requests get a 503 at once; running generations have `drain_timeout` seconds to
finish, then they are stopped (a non-streamed request gets a 503, a stream an in-band error
event) and the process exits, so a long generation cannot hold the server up."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time

from ..errors import ConfigError
from .limits import env_number

DEFAULT_HOST = "127.0.0.1"  # local only unless --host says otherwise
DEFAULT_PORT = 8000
DEFAULT_DRAIN_TIMEOUT = 10.0  # seconds running generations may go on after a SIGTERM
_GRACE = 5.0                  # then uvicorn's own limit for the responses to close

log = logging.getLogger("tuneforge")


def resolve_address(serve_args, host: str | None = None, port: int | None = None) -> tuple[str, int]:
    """Command-line value, then config key (api_host/api_port), then API_HOST/API_PORT, then default.
    Raises ConfigError for a port outside 1-65535, naming where it came from."""
    host = host or serve_args.api_host or os.environ.get("API_HOST") or DEFAULT_HOST
    where = "--port"
    if port is None:
        port, where = serve_args.api_port, "config key 'api_port'"
    if port is None:
        env, where = os.environ.get("API_PORT"), "environment variable API_PORT"
        try:
            port = int(env) if env else DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"environment variable API_PORT must be a port number; got {env!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where} must be a port number (1-65535); got {port}")
    return host, port


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, opened before the model loads so that an address in use
    (or unknown, or not allowed) is one line at once. Raises ConfigError."""
    hint = "pick another --host / --port (api_host / api_port)"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: unknown host ({exc}); {hint}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from None
    return sock


def resolve_api_key(serve_args) -> str | None:
    """The api_key config key, else the API_KEY environment variable; None: no authentication."""
    return serve_args.api_key or os.environ.get("API_KEY") or None


def resolve_drain_timeout() -> float:
    """API_DRAIN_TIMEOUT (seconds, >= 0) from the environment, else DEFAULT_DRAIN_TIMEOUT.
    Raises ConfigError for a value that is not a non-negative number."""
    return env_number("API_DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT, "seconds", positive=False)


def make_server(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
                drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, log_level: str = "info"):
    """A uvicorn.Server for `engine` that drains on shutdown (see the module); its FastAPI app is
    `.config.app` (routes may be added before it runs)."""
    import uvicorn  # the server's libraries load when a server starts, not with this module

    from .app import create_app

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            engine.stop_accepting()
            loop = asyncio.get_running_loop()
            loop.call_later(drain_timeout, lambda: log.info("drain timeout: stopped %d generation(s)",
                                                            engine.stop_all()))
            await super().shutdown(sockets)

    config = uvicorn.Config(create_app(engine, api_key=api_key), host=host, port=port,
                            log_level=log_level, timeout_graceful_shutdown=int(drain_timeout + _GRACE))
    return DrainingServer(config)


def serve(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          drain_timeout: float | None = None, sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain (see the module). drain_timeout None reads
    API_DRAIN_TIMEOUT; sock: a socket from listen(host, port), else one is opened here. Raises
    ConfigError for a bad API_DRAIN_TIMEOUT or an address it cannot listen on."""
    if drain_timeout is None:
        drain_timeout = resolve_drain_timeout()
    sock = sock or listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d/v1 (SIGTERM or Ctrl+C: drain for up to %gs, then stop)",
             ", ".join(engine.model_ids()), shown, port, drain_timeout)
    make_server(engine, host, port, api_key, drain_timeout, "info").run(sockets=[sock])


class BackgroundServer:
    """`with BackgroundServer(engine, port=...) as url:` runs the real uvicorn server in a thread;
    leaving the block drains it (drain_timeout seconds, 0: stop running generations at once)."""

    def __init__(self, engine, host: str = DEFAULT_HOST, port: int = 0, api_key: str | None = None,
                 drain_timeout: float = 0.0):
        self.server = make_server(engine, host, port, api_key, drain_timeout, "warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
