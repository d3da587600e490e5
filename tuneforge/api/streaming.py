"""Answers over HTTP that end with their client: a non-streamed answer is awaited beside a watch
on the connection, and a stream of server-sent events is sent beside the same watch, so a client
that disconnects stops its generations at once (the batcher drops them before its next step)
instead of when the next piece fails to send, or never."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Awaitable, Callable

from starlette.responses import Response

from ..infer.engine import Unavailable
from .errors import internal, shutting_down
from .schemas import ChatCompletionChunk, ChunkChoice, Delta, Usage, completion_id

log = logging.getLogger("tuneforge")


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive, work: Awaitable):
    """`work`'s result, or ClientGone (and `work` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    finished_first = False
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finished_first = task in done
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its cleanup (stopping generations) has run on return
    if finished_first:
        return task.result()
    raise ClientGone()


class EventStream(Response):
    """A text/event-stream response that calls `on_close` however it ends: sent to the end, the
    client gone, or the server cancelling it."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache"})  # no body yet: no Content-Length
        self.events, self.on_close = events, on_close

    async def _send_all(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for event in self.events:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await unless_disconnected(receive, self._send_all(send))
        except (ClientGone, OSError):  # OSError: a server that reports a closed socket on send
            pass
        finally:
            self.on_close()
            await self.events.aclose()


def _error_event(exc: BaseException) -> str:
    """Headers are sent already: errors go in-band, as OpenAI's API reports them."""
    if isinstance(exc, Unavailable):
        err = shutting_down(str(exc))
    else:
        log.error("generation failed", exc_info=exc)
        err = internal(exc)
    return f"data: {json.dumps(err.body())}\n\n"


async def sse_events(model: str, generations, usage_of, usage_chunk: bool = False) -> AsyncIterator[str]:
    """Server-sent events: role chunks, content chunks as any choice produces them (tagged with
    its index), a finish chunk per choice, then [DONE]. Usage rides on the last finish chunk, or,
    with stream_options include_usage, comes as OpenAI sends it: a last chunk with no choices
    (clients that read choices[0] of every chunk never see an empty one unless they asked)."""
    cid = completion_id()

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=cid, model=model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    for i in range(len(generations)):
        yield event([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
    finished = 0
    try:
        async for i, piece in interleave(generations):
            if piece is None:  # choice i has ended
                finished += 1
                last = finished == len(generations) and not usage_chunk
                finish = ChunkChoice(index=i, delta=Delta(), finish_reason=generations[i].result.finish_reason)
                yield event([finish], usage_of(generations) if last else None)
            else:
                yield event([ChunkChoice(index=i, delta=Delta(content=piece))])
    except Exception as exc:
        yield _error_event(exc)
        return
    if usage_chunk:
        yield event([], usage_of(generations))
    yield "data: [DONE]\n\n"


async def interleave(generations) -> AsyncIterator[tuple[int, str | None]]:
    """(index, piece) in the order pieces arrive from any generation; (index, None) when one ends.
    One generation is read directly; more get a task each, all cancelled when this ends."""
    if len(generations) == 1:
        async for piece in generations[0]:
            yield 0, piece
        yield 0, None
        return
    arrivals: asyncio.Queue = asyncio.Queue()

    async def read(i, generation):
        try:
            async for piece in generation:
                await arrivals.put((i, piece))
            await arrivals.put((i, None))
        except Exception as exc:
            await arrivals.put((i, exc))

    tasks = [asyncio.ensure_future(read(i, g)) for i, g in enumerate(generations)]
    try:
        open_ = len(generations)
        while open_:
            i, item = await arrivals.get()
            if isinstance(item, BaseException):
                raise item
            open_ -= item is None
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
