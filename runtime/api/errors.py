"""Errors every dialect can raise, and the handlers that turn them into responses.

An adapter raises `APIError(status, message, ...)`; the handlers installed by
`install_error_handlers` render it, and also turn FastAPI's own failures (validation -> 400,
unknown route -> 404, wrong method -> 405) and anything unexpected (-> 500, traceback logged
server-side only) into the same shape. Never a traceback to a client.

The default shape is OpenAI's error object:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Anthropic's (under /v1/messages) and Ollama's (under /api) shapes live here too, so that the
launcher's front door, which answers in every dialect while the ranks restart, needs neither
FastAPI nor the dialects' request models (with them numpy and mlx: ~0.5 s of CPU at launch).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

log = logging.getLogger("exolaunch.api")

# OpenAI's `type` values.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"
RATE_LIMIT = "requests"  # what OpenAI's 429s say (code "rate_limit_exceeded")


@dataclass(eq=False)
class APIError(Exception):
    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """OpenAI's error object (also what a stream's error chunk carries)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, INVALID_REQUEST, param, code)


def unavailable(message: str, code: str | None = "engine_unavailable") -> APIError:
    return APIError(503, message, UNAVAILABLE, None, code)


def rate_limited(message: str, retry_after: float) -> APIError:
    """429 with Retry-After (whole seconds, at least 1) and retry-after-ms: the official
    SDKs wait that long and retry."""
    ok = isinstance(retry_after, (int, float)) and math.isfinite(retry_after)
    seconds = max(1.0, float(retry_after) if ok else 1.0)
    return APIError(429, message, RATE_LIMIT, None, "rate_limit_exceeded",
                    headers={"Retry-After": str(math.ceil(seconds)),
                             "retry-after-ms": str(int(seconds * 1000))})


def internal(message: str = "internal server error (see the server log)") -> APIError:
    return APIError(500, message, SERVER_ERROR, None, None)


Renderer = Callable[[APIError], JSONResponse]

ANTHROPIC_PREFIX = "/v1/messages"
OLLAMA_PREFIX = "/api"


def _render_openai(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


def anthropic_error_type(err: APIError) -> str:
    if err.status == 503:
        return "api_error" if err.code == "engine_failed" else "overloaded_error"
    if err.status in _ANTHROPIC_TYPES:
        return _ANTHROPIC_TYPES[err.status]
    return "invalid_request_error" if err.status < 500 else "api_error"


def anthropic_error_body(err: APIError) -> dict[str, Any]:
    """{"type": "error", "error": {"type": ..., "message": ...}}; also a stream's error event."""
    message = err.message
    if err.status == 401 and message.startswith("missing API key"):
        message = "missing API key: send the header 'x-api-key: YOUR_KEY'"
    return {"type": "error", "error": {"type": anthropic_error_type(err), "message": message}}


def _render_anthropic(err: APIError) -> JSONResponse:
    return JSONResponse(anthropic_error_body(err), status_code=err.status, headers=err.headers)


def _render_ollama(err: APIError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


_FORMATS: dict[str, Renderer] = {ANTHROPIC_PREFIX: _render_anthropic, OLLAMA_PREFIX: _render_ollama}


def render_for_path(path: str) -> Renderer:
    """The error shape of the dialect that serves `path` (the longest matching prefix; else OpenAI's)."""
    best = ""
    for prefix in _FORMATS:
        if path.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return _FORMATS[best] if best else _render_openai


def error_response(path: str, err: APIError) -> JSONResponse:
    return render_for_path(path)(err)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "tuple", "set", "bytes",
              "nullable", "any"}


def _is_type_tag(p: object) -> bool:
    """pydantic puts the union member tried into `loc` ("stop", "str"): not a field."""
    if not isinstance(p, str):
        return False
    return p.lower() in _TYPE_TAGS or "[" in p or p.startswith(
        ("function-", "lax-", "json-", "constrained-"))


def _loc(loc: tuple | list) -> str:
    parts = [str(p) for i, p in enumerate(loc)
             if not (i == 0 and p == "body") and not _is_type_tag(p)]
    out = ""
    for p in parts:
        if p.isdigit():
            out += f"[{p}]"
        else:
            out += ("." if out else "") + p
    return out


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line naming the offending field(s), and the first field as `param`."""
    msgs: list[str] = []
    param: str | None = None
    for e in errors:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            detail = ctx.get("error")
            return (f"the request body is not valid JSON{': ' + str(detail) if detail else ''}",
                    None)
        where = _loc(e.get("loc", ()))
        # Union members produce one error each ("str", "list[str]"...): keep the field once.
        if param is None and where:
            param = where
        text = f"{where}: {e.get('msg', 'invalid value')}" if where else e.get("msg", "invalid")
        if e.get("type") == "missing":
            text = f"{where}: field required" if where else \
                "the request body is missing: send a JSON object"
        if text not in msgs:
            msgs.append(text)
    if len(msgs) > 4:
        msgs = msgs[:4] + [f"... ({len(msgs) - 4} more)"]
    return "invalid request: " + "; ".join(msgs), param


def install_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return error_response(request.url.path, bad_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", INVALID_REQUEST,
                           None, "not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} not allowed on {request.url.path}",
                           INVALID_REQUEST, None, "method_not_allowed")
        else:
            detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
            typ = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
            err = APIError(exc.status_code, detail, typ)
        err.headers = dict(exc.headers) if exc.headers else None
        return error_response(request.url.path, err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(request.url.path, internal())
