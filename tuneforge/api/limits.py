"""Request-body limits, as a plain ASGI middleware around the FastAPI app.

A body larger than `max_bytes` is a 413 (at once when Content-Length says so, else as soon as
the bytes read pass it), and a body whose next bytes do not come within `stall_seconds` is a 408,
so a client that declares a length and stalls (or trickles a huge body) cannot hold a connection
and its memory forever. Both answers are in OpenAI's error shape (errors.APIError), sent before
the app sees the request; the app then reads the whole body from memory as usual, and every later
`receive()` (the disconnect watch while generating) goes to the server unchanged."""

from __future__ import annotations

import asyncio
import os

from ..errors import ConfigError
from ..fileio import human_size
from .errors import APIError

DEFAULT_MAX_BODY_MB = 16.0     # a chat request of many long messages is well under this
DEFAULT_BODY_TIMEOUT = 30.0    # seconds the next part of a body may take to arrive


def env_number(name: str, default: float, unit: str, positive: bool = True) -> float:
    """The environment variable `name` as a finite number (> 0, or >= 0 with positive=False),
    `default` when unset or empty; unit ("seconds", "MB") is for the message. Raises ConfigError
    naming the variable otherwise."""
    env = os.environ.get(name)
    if not env:
        return default
    try:
        value = float(env)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf") if positive else 0 <= value < float("inf")):
        raise ConfigError(f"environment variable {name} must be a number of {unit} "
                          f"{'>' if positive else '>='} 0; got {env!r}")
    return value


def body_limits() -> dict:
    """BodyLimits' settings from API_MAX_BODY_MB and API_BODY_TIMEOUT (see the defaults above)."""
    return {"max_bytes": int(env_number("API_MAX_BODY_MB", DEFAULT_MAX_BODY_MB, "MB") * 2**20),
            "stall_seconds": env_number("API_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT, "seconds")}


class BodyLimits:
    """ASGI middleware: read each HTTP request body whole, within the limits above, then call
    `app` with it. max_bytes: bytes (> 0); stall_seconds: seconds (> 0)."""

    def __init__(self, app, max_bytes: int, stall_seconds: float):
        self.app, self.max_bytes, self.stall_seconds = app, max_bytes, stall_seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await _answer(send, self._too_large())
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.stall_seconds)
            except asyncio.TimeoutError:
                return await _answer(send, APIError(
                    408, f"the request body stopped arriving (nothing for {self.stall_seconds:g} s); "
                    "send the whole body at once", code="request_timeout"))
            if message["type"] != "http.request":  # the client left while sending: nobody to answer
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _answer(send, self._too_large())
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {human_size(self.max_bytes)}, the server's limit "
                        "(API_MAX_BODY_MB); send a shorter request", code="request_too_large")


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


async def _answer(send, error: APIError) -> None:
    response = error.response()
    response.headers["connection"] = "close"
    await response({"type": "http"}, _no_receive, send)


async def _no_receive():
    return {"type": "http.disconnect"}
