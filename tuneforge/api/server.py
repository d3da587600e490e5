"""Start the API server with uvicorn (blocking), or in a background thread for tests/notebooks."""

from __future__ import annotations

import threading
import time

DEFAULT_HOST = "127.0.0.1"  # local only unless --host says otherwise
DEFAULT_PORT = 8000


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
