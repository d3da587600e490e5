"""Start the API server with uvicorn (blocking), or in a background thread for tests/notebooks."""

from __future__ import annotations

import os
import threading
import time

from ..errors import ConfigError

DEFAULT_HOST = "127.0.0.1"  # local only unless --host says otherwise
DEFAULT_PORT = 8000


def resolve_address(serve_args, host: str | None = None, port: int | None = None) -> tuple[str, int]:
    """Command-line value, then config key (api_host/api_port), then API_HOST/API_PORT, then default."""
    host = host or serve_args.api_host or os.environ.get("API_HOST") or DEFAULT_HOST
    if port is None:
        port = serve_args.api_port
    if port is None:
        env = os.environ.get("API_PORT")
        try:
            port = int(env) if env else DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"environment variable API_PORT must be a port number; got {env!r}") from None
    return host, port


def resolve_api_key(serve_args) -> str | None:
    """The api_key config key, else the API_KEY environment variable; None: no authentication."""
    return serve_args.api_key or os.environ.get("API_KEY") or None


def serve(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None) -> None:
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(engine, api_key=api_key), host=host, port=port, log_level="info")


class BackgroundServer:
    """`with BackgroundServer(engine, port=...) as url:` runs the real uvicorn server in a thread."""

    def __init__(self, engine, host: str = DEFAULT_HOST, port: int = 0, api_key: str | None = None):
        import uvicorn

        from .app import create_app

        config = uvicorn.Config(create_app(engine, api_key=api_key), host=host, port=port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
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
        self.thread.join(timeout=10)
