"""The OpenAI-compatible FastAPI app: `GET /v1/models`, `POST /v1/chat/completions`, and the
OpenAPI schema at /openapi.json (behind the key like the rest; no /docs or /redoc pages). It holds
no model logic of its own: the Engine generates, this file turns HTTP into calls and back.

Errors come back in OpenAI's shape (errors.py), never as a traceback. A request that cannot be
served as sent is refused before any generation starts; one request's failure never fails
another's. Limits: max_tokens (or max_completion_tokens) is capped to what the model's context
leaves after the prompt, the answer then ending with finish_reason "length", as OpenAI's API
does; left out, the answer may run to the end of the context. A prompt the context cannot hold
with one answer token is a 400 naming the limit. A body over API_MAX_BODY_MB (16) is a 413, one
that stalls for API_BODY_TIMEOUT seconds (30) a 408 (limits.py). Generation stops when the client disconnects,
streamed or not, for every choice of n."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ..infer.engine import RequestError, Unavailable
from .errors import APIError, install_handlers, internal, shutting_down
from .limits import BodyLimits, body_limits
from .schemas import (AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, ModelCard,
                      ModelList, Usage, completion_id)
from .streaming import ClientGone, EventStream, sse_events, unless_disconnected

log = logging.getLogger("tuneforge")


def create_app(engine, api_key: str | None = None) -> FastAPI:
    """api_key: required bearer token; None reads the API_KEY environment variable (unset or
    empty: no authentication). Request bodies are limited by API_MAX_BODY_MB and API_BODY_TIMEOUT
    (limits.py). Raises ConfigError for a malformed limit in the environment."""
    api_key = api_key if api_key is not None else os.environ.get("API_KEY") or None
    expected = api_key.encode("utf-8") if api_key is not None else None
    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimits, **body_limits())
    install_handlers(app)

    def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1")  # the header's bytes as sent (any charset)
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    @app.get("/openapi.json", dependencies=[Depends(authorize)], include_in_schema=False)
    def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in engine.model_ids()])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatCompletionRequest, request: Request):
        generations = await _start(engine, body)
        if body.stream:
            def stop_all():
                for g in generations:
                    g.cancel()

            return EventStream(sse_events(body.model, generations, _usage, body.include_usage()),
                               on_close=stop_all)
        try:
            texts = await unless_disconnected(request.receive, _texts(generations))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the generations are stopped
        except Unavailable as exc:
            raise shutting_down(str(exc)) from None
        except Exception as exc:  # answered here: starlette's catch-all re-raises into the server
            log.error("generation failed", exc_info=exc)
            return internal(exc).response()
        finally:
            for g in generations:
                g.cancel()
        return ChatCompletion(
            id=completion_id(), model=body.model,
            choices=[Choice(index=i, message=AssistantMessage(content=text),
                            finish_reason=g.result.finish_reason)
                     for i, (g, text) in enumerate(zip(generations, texts))],
            usage=_usage(generations))

    return app


async def _start(engine, body: ChatCompletionRequest):
    """Check the request against the server and queue its n choices (tokenizing in a thread)."""
    if not engine.has_model(body.model):
        raise APIError(404, f"model {body.model!r} does not exist; available: {engine.model_ids()}",
                       param="model", code="model_not_found")
    unsupported = body.unsupported_field()
    if unsupported:
        raise APIError(400, f"{unsupported} is not supported by this server; leave it out",
                       param=unsupported, code="unsupported_parameter")
    messages = [m.as_dict() for m in body.messages]
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the last message must be from the user (or system)", param="messages")
    try:
        return await run_in_threadpool(
            engine.generate_choices, body.model, messages, body.n, body.stop_list(), body.seed,
            body.temperature, body.top_p, body.answer_limit())
    except RequestError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    except Unavailable as exc:
        raise shutting_down(str(exc)) from None


async def _texts(generations) -> list[str]:
    return list(await asyncio.gather(*(g.text() for g in generations)))


def _usage(generations) -> Usage:
    """The prompt is counted once, as OpenAI does for n > 1; completions add up."""
    prompt = generations[0].result.prompt_tokens
    completion = sum(g.result.completion_tokens for g in generations)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
