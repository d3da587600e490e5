"""Every error the server answers, in OpenAI's shape {"error": {"message", "type", "param",
"code"}}, never a traceback: a malformed body is a 400 naming the field (as a path such as
messages[0].content[1].text) and what it should be, a missing/wrong key a 401, an unknown model
a 404, a server shutting down a 503, a failure of ours a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tuneforge")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def internal(exc: BaseException) -> APIError:
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error")


def shutting_down(message: str) -> APIError:
    return APIError(503, message, "server_error", code="server_shutting_down")


# ---- pydantic's validation errors as one line -------------------------------------------------
def _path(loc) -> str:
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(value) -> str:
    """A JSON value's kind, for messages: "an integer", "null", ..."""
    if value is None:
        return "null"
    for types, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                        (str, "a string"), (dict, "an object"), ((list, tuple), "an array")):
        if isinstance(value, types):
            return name
    return type(value).__name__


_EXPECTED = {"string_type": "a string", "int_type": "an integer", "float_type": "a number",
             "bool_type": "true or false", "list_type": "an array", "dict_type": "an object",
             "model_type": "an object", "model_attributes_type": "an object", "int_from_float":
             "an integer", "string_sub_type": "a string"}
_BOUND = {"greater_than": "greater than", "greater_than_equal": "at least", "less_than": "less than",
          "less_than_equal": "at most"}


def validation_message(error: dict) -> tuple[str, str | None]:
    """One pydantic error -> (message, param)."""
    param = _path(error.get("loc", ())) or None
    kind, ctx, value = error.get("type", ""), error.get("ctx") or {}, error.get("input")
    if kind == "json_invalid":
        return f"the body is not valid JSON ({ctx.get('error', 'parse error')})", None
    if param is None:
        if kind == "missing":
            return "the request needs a JSON body", None
        if isinstance(value, (bytes, bytearray)):  # a body FastAPI did not parse: not sent as JSON
            return "the body must be JSON, sent with 'Content-Type: application/json'", None
        return f"the body must be a JSON object, not {describe(value)}", None
    if kind == "missing":
        return f"missing required parameter '{param}'", param
    if kind in _EXPECTED:
        return f"invalid type for '{param}': expected {_EXPECTED[kind]}, got {describe(value)}", param
    if kind in _BOUND:
        bound = next(iter(ctx.values()), "?")
        return f"invalid value for '{param}': must be {_BOUND[kind]} {bound}, got {value!r}", param
    if kind == "literal_error":
        return f"invalid value for '{param}': must be {ctx.get('expected')}, got {value!r}", param
    if kind.endswith("_type"):  # a type check of ours (content, stop): its message names the types
        return f"invalid type for '{param}': {error.get('msg', 'wrong type')}", param
    if kind == "too_short":
        return f"invalid value for '{param}': must hold at least {ctx.get('min_length')} item", param
    if kind == "too_long":
        return f"invalid value for '{param}': must hold at most {ctx.get('max_length')} items", param
    return f"invalid value for '{param}': {error.get('msg', 'invalid')}", param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        message, param = validation_message(errors[0]) if errors else ("invalid body", None)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's
            message = ("the body could not be read as JSON (not UTF-8, nested too deep, or a number "
                       "too long)")
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("request failed")  # the traceback goes to the server log, not the client
        return internal(exc).response()
