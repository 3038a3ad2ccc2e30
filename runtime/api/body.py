"""What a request body must be before any dialect sees it.

    BodyLimit       ASGI middleware: a body over `max_bytes` is a 413 in the path's dialect,
                    decided from Content-Length before reading, or while reading a body sent
                    without one (chunked); the body is read once and replayed to the app
    JSONRoute       the route class of the OpenAI, Responses and Anthropic routers: a body
                    must be JSON (Content-Type application/json or +json, or none at all;
                    anything else is a 415 naming the header: their official APIs document
                    and their SDKs always send application/json)
    AnyJSONRoute    Ollama's: the body is JSON whatever the Content-Type says, as in Ollama
                    (`curl URL -d '{...}'` sends application/x-www-form-urlencoded)
    parse_json      the one JSON parse: valid UTF-8, at most MAX_JSON_DEPTH levels deep (a
                    100k-deep list is a 400, not a RecursionError), no lone UTF-16 surrogate
                    anywhere ("\\ud800" parses, but no tokenizer, template or JSON encoder can
                    take it) and no NaN or infinity (Python's parser takes them, JSON has
                    neither, and an echoed NaN cannot be encoded back): each a 400 naming
                    where
"""

from __future__ import annotations

import email.message
import json
import math
import re
from typing import Any, Callable, Coroutine

import anyio
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import header
from .errors import INVALID_REQUEST, APIError, bad_request, error_response
from .limits import DEFAULT_MAX_BODY_MB, MAX_JSON_DEPTH

_SURROGATE = re.compile("[\ud800-\udfff]")
_THREAD_PARSE_BYTES = 256 * 1024  # bigger bodies are parsed off the event loop


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of "
                    f"{limit / 1e6:g} MB (--max-body-mb)", INVALID_REQUEST, None,
                    "request_too_large")


class BodyLimit:
    """Read the whole body (at most `max_bytes`) before the app runs, then replay it."""

    def __init__(self, app: ASGIApp, max_bytes: int = int(DEFAULT_MAX_BODY_MB * 1e6)):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            # A client that waits for "100 Continue" sends nothing more: answer at once.
            waiting = (header(scope, b"expect") or "").lower() == "100-continue"
            await self._refuse(scope, receive, send, 0, more=not waiting)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size, message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, seen: int,
                      more: bool) -> None:
        """413. The rest of the body is read first and dropped (up to 4 x the limit; then the
        connection is simply closed): a client still sending would otherwise get a reset
        connection instead of the answer."""
        while more and seen <= self.max_bytes * 4:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
        await error_response(scope.get("path", ""), too_large(self.max_bytes))(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    value = header(scope, b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def parse_json(body: bytes) -> Any:
    """The parsed body, or APIError 400 saying what is wrong with it."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    _check_tree(value)
    return value


def _too_deep() -> APIError:
    return bad_request(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")


def _check_tree(value: Any) -> None:
    """Depth, lone surrogates and non-finite numbers (Python's parser takes NaN, Infinity
    and 1e999; JSON has none of them), without recursion; a 400 names the first offender."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise _offender(value, v)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise _offender(value, v)
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            if isinstance(v, dict):
                for k in v:
                    if _SURROGATE.search(k):
                        raise _offender(value, k)
                items = v.values()
            else:
                items = v
            stack.extend((x, depth + 1) for x in items if isinstance(x, (str, float, dict, list)))


def _offender(root: Any, bad: Any) -> APIError:
    """A 400 for `bad` (a string with a lone surrogate, or NaN / an infinity), at its path."""
    path = _path_to(root, bad).encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(bad, str):
        code = ord(_SURROGATE.search(bad).group())  # type: ignore[union-attr]
        what = (f"a lone UTF-16 surrogate (\\u{code:04x}) is not valid Unicode text (escape a "
                "character outside the BMP as a surrogate pair)")
    else:
        what = f"{bad} is not a number JSON allows"
    return bad_request(f"{path or 'the request body'}: {what}", path or None)


def _path_to(root: Any, bad: Any) -> str:
    """Where `bad` (by identity: a value, or a key) sits in `root`, as messages[0].content."""
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        v, path = stack.pop()
        if v is bad:
            return path
        if isinstance(v, dict):
            for k, x in v.items():
                sub = f"{path}.{k}" if path else str(k)
                if k is bad:
                    return sub
                stack.append((x, sub))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in enumerate(v))
    return ""


def _is_json(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


class _ParsedRequest(Request):
    """A request whose body was read and parsed once here; FastAPI's handler reads it back."""

    def __init__(self, scope: Scope, receive: Receive, body: bytes, parsed: Any):
        super().__init__(scope, receive)
        self._parsed_body = body
        self._parsed_json = parsed

    async def body(self) -> bytes:
        return self._parsed_body

    async def json(self) -> Any:
        return self._parsed_json


def _json_scope(scope: Scope) -> Scope:
    """The scope with `content-type: application/json` (what FastAPI parses as JSON)."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


class JSONRoute(APIRoute):
    any_content_type = False

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler
        lenient = self.any_content_type

        async def parse_then_handle(request: Request) -> Response:
            body = await request.body()
            if not body:
                return await handler(request)
            content_type = request.headers.get("content-type")
            if content_type and not lenient and not _is_json(content_type):
                raise APIError(415, f"the request body must be JSON: send the header "
                               f"'Content-Type: application/json' (got {content_type!r})",
                               INVALID_REQUEST, None, "unsupported_media_type")
            if len(body) > _THREAD_PARSE_BYTES:
                parsed = await anyio.to_thread.run_sync(parse_json, body)
            else:
                parsed = parse_json(body)
            return await handler(_ParsedRequest(_json_scope(request.scope), request.receive,
                                                body, parsed))

        return parse_then_handle


class AnyJSONRoute(JSONRoute):
    any_content_type = True
