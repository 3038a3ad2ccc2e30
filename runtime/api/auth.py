"""API-key check for every route except the open ones (health).

With an api_key configured, a request must carry `Authorization: Bearer KEY` (what the
OpenAI SDKs send) or `x-api-key: KEY` (what Anthropic's SDK sends; for the sibling dialect).
Otherwise: 401 in the dialect's error shape, with `WWW-Authenticate: Bearer`. The comparison
is constant-time. A pure ASGI middleware, so streaming responses pass through untouched.
"""

from __future__ import annotations

import hmac
from typing import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import INVALID_REQUEST, APIError, error_response

OPEN_PATHS = frozenset({"/health"})


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (`name` in lower case), or None."""
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def presented_key(scope: Scope) -> str | None:
    auth = header(scope, b"authorization")
    if auth is not None:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = header(scope, b"x-api-key")
    return key.strip() if key else None


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = OPEN_PATHS):
        self.app = app
        self.key = api_key.encode("utf-8")
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        got = presented_key(scope)
        if got is not None and hmac.compare_digest(got.encode("latin-1"), self.key):
            await self.app(scope, receive, send)
            return
        if got is None:
            msg = ("missing API key: send the header 'Authorization: Bearer YOUR_KEY'")
        else:
            msg = "incorrect API key provided"
        err = APIError(401, msg, INVALID_REQUEST, None, "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
        await error_response(scope.get("path", ""), err)(scope, receive, send)
