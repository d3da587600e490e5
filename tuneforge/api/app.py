"""The OpenAI-compatible FastAPI app: `GET /v1/models`, `POST /v1/chat/completions`. It holds no
model logic of its own: the Engine generates, this file turns HTTP into calls and back.

Errors come back in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, never as a
traceback: a malformed body is a 400, an unknown model a 404, a missing/wrong key a 401."""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import threading

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.concurrency import run_in_threadpool

from .schemas import (AssistantMessage, ChatCompletion, ChatCompletionChunk,
                      ChatCompletionRequest, Choice, ChunkChoice, Delta, ModelCard, ModelList,
                      Usage, completion_id)

log = logging.getLogger("tuneforge")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error(status: int, message: str, type: str, param=None, code=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine, api_key: str | None = None) -> FastAPI:
    """api_key: required bearer token; None reads the API_KEY environment variable (unset or
    empty: no authentication)."""
    api_key = api_key if api_key is not None else os.environ.get("API_KEY") or None
    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or None
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid body")
        return _error(400, message, "invalid_request_error", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("request failed")  # the traceback goes to the server log, not the client
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_key):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           "invalid_request_error", code="invalid_api_key")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in engine.model_ids()])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatCompletionRequest):
        if not engine.has_model(body.model):
            raise APIError(404, f"model {body.model!r} does not exist; available: "
                           f"{engine.model_ids()}", param="model", code="model_not_found")
        unsupported = body.unsupported_field()
        if unsupported:
            raise APIError(400, f"{unsupported} is not supported by this server; leave it out",
                           param=unsupported, code="unsupported_parameter")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if messages[-1]["role"] == "assistant":
            raise APIError(400, "the last message must be from the user (or system)", param="messages")
        # n choices are n requests queued together: they share a batch (a seeded one: seed + i)
        generations = [engine.generate(
            body.model, messages, stop=body.stop_list(),
            seed=None if body.seed is None else body.seed + i,
            temperature=body.temperature, top_p=body.top_p,
            max_tokens=body.max_completion_tokens or body.max_tokens) for i in range(body.n)]
        if body.stream:
            usage_chunk = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(body.model, generations, usage_chunk),
                                     media_type="text/event-stream")
        try:
            texts = await run_in_threadpool(lambda: ["".join(g) for g in generations])
        except Exception as exc:  # answered here: starlette's catch-all re-raises into the server
            log.exception("generation failed")
            return _error(500, f"internal error: {type(exc).__name__}", "server_error")
        return ChatCompletion(
            id=completion_id(), model=body.model,
            choices=[Choice(index=i, message=AssistantMessage(content=text),
                            finish_reason=g.result.finish_reason)
                     for i, (g, text) in enumerate(zip(generations, texts))],
            usage=_usage(generations))

    return app


def _usage(generations) -> Usage:
    """The prompt is counted once, as OpenAI does for n > 1; completions add up."""
    prompt = generations[0].result.prompt_tokens
    completion = sum(g.result.completion_tokens for g in generations)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(model: str, generations, usage_chunk: bool = False):
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
        for i, piece in _interleave(generations):
            if piece is None:  # choice i has ended
                finished += 1
                last = finished == len(generations) and not usage_chunk
                finish = ChunkChoice(index=i, delta=Delta(), finish_reason=generations[i].result.finish_reason)
                yield event([finish], _usage(generations) if last else None)
            else:
                yield event([ChunkChoice(index=i, delta=Delta(content=piece))])
    except Exception as exc:  # headers are sent already: report in-band, as OpenAI does
        log.exception("generation failed")
        err = {"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                         "param": None, "code": None}}
        yield f"data: {json.dumps(err)}\n\n"
        return
    if usage_chunk:
        yield event([], _usage(generations))
    yield "data: [DONE]\n\n"


def _interleave(generations):
    """(index, piece) in the order pieces arrive from any generation; (index, None) when one ends.
    One generation reads in this thread; more get a reader thread each."""
    if len(generations) == 1:
        for piece in generations[0]:
            yield 0, piece
        yield 0, None
        return
    arrivals: queue.Queue = queue.Queue()

    def read(i, generation):
        try:
            for piece in generation:
                arrivals.put((i, piece))
            arrivals.put((i, None))
        except BaseException as exc:
            arrivals.put((i, exc))

    for i, g in enumerate(generations):
        threading.Thread(target=read, args=(i, g), daemon=True).start()
    open_ = len(generations)
    while open_:
        i, item = arrivals.get()
        if isinstance(item, BaseException):
            raise item
        open_ -= item is None
        yield i, item
