"""The access log: one line per HTTP request on rank 0, with the reason of every failure.

    AccessLog            ASGI middleware (outermost, so a 401 or 413 is logged too)
    attach(request, gen) the engine requests behind an answer (core.reply calls it)
    note(request, ...)   a clamped max_tokens, or an error that ended a started stream

A line, on the logger `exolaunch.api.access`:

    127.0.0.1 "POST /v1/messages?beta=true" anthropic 200 prompt=2310 completion=87 ttft=0.84s
        4.12s max_tokens=32000->5882   (one line in the log)
    127.0.0.1 "POST /v1/chat/completions" openai 400 1ms error: messages[1].role: ...

prompt / completion are tokens, ttft is from the request's arrival to the first generated
token, the last figure the whole request (a stream: until its last byte). Status 2xx/3xx lines
are INFO (DEBUG for the probes: /health, /ready, /metrics, /exolaunch/stats, and for /ready's
503 while loading), 4xx WARNING, 5xx ERROR, so `--log-level warning` keeps only failures and
`--disable-log-requests` (vLLM's name) mutes the successful ones. The reason of a 4xx/5xx is the
message of the error body the client got (any dialect's shape); a stream that fails after its
200 says `stream error: ...`; one whose client left before the end says `cancelled`.

A clamped max_tokens is also told to the client: the response header
`x-exolaunch-max-tokens: requested=32000, granted=5882`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("exolaunch.api.access")

KEY = "exolaunch.access"
CLAMP_HEADER = b"x-exolaunch-max-tokens"
DIALECTS = (("/v1/chat/completions", "openai"), ("/v1/completions", "openai"),
            ("/v1/models", "openai"), ("/v1/responses", "responses"),
            ("/v1/messages", "anthropic"), ("/api/", "ollama"))
_MAX_ERROR_BODY = 8192
# Polled by the front door, load balancers and Prometheus: at debug unless they fail.
PROBES = frozenset({"/health", "/ready", "/metrics", "/exolaunch/stats"})


def dialect_of(path: str) -> str:
    return next((d for prefix, d in DIALECTS if path.startswith(prefix)), "-")


@dataclass
class Record:
    client: str
    method: str
    target: str
    dialect: str
    start: float = field(default_factory=time.monotonic)
    status: int = 0
    gens: list[Any] = field(default_factory=list)
    clamp: tuple[int, int] | None = None
    error: str | None = None
    body: bytes = b""
    logged: bool = False

    def tokens(self) -> tuple[int | None, int | None, float | None]:
        """(prompt tokens, completion tokens, TTFT seconds) of the engine requests."""
        if not self.gens:
            return None, None, None
        prompt = completion = 0
        first: float | None = None
        seen: set[int] = set()
        for gen in self.gens:
            for h in gen.handles:
                if id(h.request.prompt_tokens) not in seen:  # n choices share one prompt
                    seen.add(id(h.request.prompt_tokens))
                    prompt += len(h.request.prompt_tokens)
            for t in getattr(getattr(gen, "track", None), "tracks", ()):  # runtime/api/metrics.py
                completion += t.tokens
                if t.tokens and (first is None or t.first < first):
                    first = t.first
        return prompt, completion, None if first is None else max(0.0, first - self.start)

    def reason(self) -> str | None:
        if self.status == 499:  # cancel_on_disconnect's: nobody receives it
            return "client disconnected"
        if self.status >= 400:
            return self.error or _error_message(self.body) or "(no message)"
        if self.error:
            return f"stream error: {self.error}"
        if any(not all(g.finished) for g in self.gens):
            return "cancelled"
        return None

    def line(self) -> str:
        parts = [self.client, f'"{self.method} {self.target}"', self.dialect, str(self.status)]
        prompt, completion, ttft = self.tokens()
        if prompt is not None:
            parts += [f"prompt={prompt}", f"completion={completion}"]
        if ttft is not None:
            parts.append(f"ttft={ttft:.2f}s")
        took = time.monotonic() - self.start
        parts.append(f"{took:.2f}s" if took >= 0.1 else f"{took * 1000:.0f}ms")
        if self.clamp:
            parts.append(f"max_tokens={self.clamp[0]}->{self.clamp[1]}")
        why = self.reason()
        if why:
            parts.append(("error: " if self.status >= 400 else "") + why)
        return " ".join(parts)


def _error_message(body: bytes) -> str | None:
    """The message of an error body: OpenAI's, Anthropic's and Ollama's shapes."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:300] or None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message"))
    if isinstance(err, str):
        return err
    return obj.get("message") if isinstance(obj, dict) else None


def _record(request: Request) -> Record | None:
    return request.scope.get(KEY)


def attach(request: Request, gen: Any) -> None:
    rec = _record(request)
    if rec is not None:
        rec.gens.append(gen)


def note(request: Request, *, clamp: tuple[int, int] | None = None,
         error: str | None = None) -> None:
    rec = _record(request)
    if rec is not None:
        if clamp is not None:
            rec.clamp = clamp
        if error is not None:
            rec.error = error


class AccessLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        target = scope.get("path", "")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        rec = Record(client[0] if client else "-", scope.get("method", "-"), target,
                     dialect_of(scope.get("path", "")))
        scope[KEY] = rec

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                rec.status = message["status"]
                if rec.clamp:
                    value = f"requested={rec.clamp[0]}, granted={rec.clamp[1]}".encode()
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (CLAMP_HEADER, value)]}
            elif message["type"] == "http.response.body":
                if rec.status >= 400 and len(rec.body) < _MAX_ERROR_BODY:
                    rec.body += message.get("body", b"")[:_MAX_ERROR_BODY]
                if not message.get("more_body"):
                    emit()  # before the last byte leaves: a client that saw the end finds the line
            await send(message)

        def emit() -> None:
            if rec.logged:
                return
            rec.logged = True
            status, path = rec.status, scope.get("path")
            # /ready's 503 is its answer while the ranks load or warm up, not a failure
            polled = path in PROBES and (status < 400 or (path == "/ready" and status == 503))
            level = (logging.DEBUG if polled else logging.ERROR if status >= 500
                     else logging.WARNING if status >= 400 else logging.INFO)
            if log.isEnabledFor(level):
                log.log(level, "%s", rec.line())

        try:
            await self.app(scope, receive, send_logged)
        except BaseException as e:
            if not rec.status:
                rec.status = 500
                rec.error = rec.error or f"{type(e).__name__}: {e}"
            raise
        finally:
            emit()  # a response that never ended (client gone, error)
