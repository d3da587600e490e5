"""One request's answer as the batcher produces it: iterate it (in a thread) or `async for` it (in
an event loop, woken by the batcher rather than parking a thread per request) for text pieces;
`result` holds the counts once it has ended. Whoever stops listening early calls `cancel()` (the
async and sync iterations do it themselves when closed), and the batcher drops the request
before its next step."""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from ..errors import TuneforgeError
from .batcher import END, Job
from .textstream import TextAssembler


class RequestError(TuneforgeError, ValueError):
    """A request the model cannot serve as asked (a prompt longer than the context, ...): the
    caller's fault, with the request field it concerns in `param`. A TuneforgeError, so that
    `tuneforge chat` prints it as one line."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class Unavailable(RuntimeError):
    """The server is shutting down: no new request is started, and the running ones are stopped."""


SHUTTING_DOWN = "the server is shutting down; the request was stopped (retry it later)"


@dataclass
class GenerationResult:
    """Filled in once a Generation has ended."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    text: str = ""


class Generation:
    """Iterate (or async-iterate) for the answer's text pieces. Iteration raises Unavailable when
    the server stopped the request while shutting down, and the batcher's exception when this
    request's generation failed."""

    def __init__(self, job: Job, assembler: TextAssembler, eos_ids: set[int], prompt_tokens: int):
        self.job, self.assembler, self.eos_ids = job, assembler, eos_ids
        self.result = GenerationResult(prompt_tokens=prompt_tokens)
        self.ended = False

    def cancel(self) -> None:
        """Stop generating (thread-safe; nothing happens once the answer has ended)."""
        if not self.ended:
            self.job.stop("client")

    def _take(self, item) -> tuple[str, bool]:
        """One item from the batcher -> (text to send, whether the answer has ended)."""
        if item is END:
            self.ended = True
            if self.job.reason == "shutdown":
                raise Unavailable(SHUTTING_DOWN)
            return self._finish(), True
        if isinstance(item, BaseException):
            self.ended = True
            raise item
        piece = self.assembler.add(item)
        if self.assembler.stopped:  # a stop string: done, whatever the batcher still makes
            self.job.stop("stop")
            self.ended = True
            return piece + self._finish(), True
        return piece, False

    def _finish(self) -> str:
        rest = self.assembler.finish()
        ids = self.assembler.ids
        r = self.result
        r.completion_tokens, r.text = len(ids), self.assembler.text
        ended_by_eos = bool(ids) and ids[-1] in self.eos_ids
        r.finish_reason = ("length" if not self.assembler.stopped and not ended_by_eos
                           and len(ids) >= self.job.kwargs["max_new_tokens"] else "stop")
        return rest

    def __iter__(self) -> Iterator[str]:
        try:
            while not self.ended:
                piece, _ = self._take(self.job.out.get())
                if piece:
                    yield piece
        finally:
            self.cancel()  # also when the reader went away mid-answer

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        asked = [False]  # a wake-up is on its way: one per wait, not one per token

        def wake() -> None:
            if not asked[0]:
                asked[0] = True
                loop.call_soon_threadsafe(arrived.set)

        self.job.waker = wake
        try:
            while not self.ended:
                try:
                    item = self.job.out.get_nowait()
                except queue.Empty:
                    await arrived.wait()
                    arrived.clear()
                    asked[0] = False  # before the queue is read again: no item goes unnoticed
                    continue
                piece, _ = self._take(item)
                if piece:
                    yield piece
        finally:
            self.job.waker = None
            self.cancel()  # cancelled (client gone) or closed early

    async def text(self) -> str:
        """The whole answer (async)."""
        return "".join([piece async for piece in self])
