"""Server-sent events: framing, and a response that cancels its work when the client leaves.

`EventStreamResponse(body)` sends `body` (an async iterator of already framed bytes) and,
whatever the ASGI server's spec version, listens for `http.disconnect` at the same time: when
the client goes away the body iterator is cancelled (CancelledError at its current await) and
then closed, so the dialect's generator runs its `finally` and cancels its engine requests.
A body that raises after the headers went out is logged and the stream just ends (the dialect
generators emit their own error events before that can happen).
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("exolaunch.api")

DONE = b"data: [DONE]\n\n"

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # nginx & co: do not buffer the stream
}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj: Any) -> bytes:
    """`data: <json>\\n\\n` (OpenAI style: data lines only)."""
    return f"data: {dumps(obj)}\n\n".encode()


def sse_event(event: str, obj: Any) -> bytes:
    """`event: <name>\\ndata: <json>\\n\\n` (Anthropic / Responses style)."""
    return f"event: {event}\ndata: {dumps(obj)}\n\n".encode()


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], status_code: int = 200,
                 headers: dict[str, str] | None = None,
                 on_close: Callable[[], None] | None = None):
        """`on_close` runs when the response ends however it ends, even if the body was never
        started (a generator that never ran has no `finally` to run): cancel the work there."""
        self.body_iterator = body
        self.on_close = on_close
        self.status_code = status_code
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            try:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the transport went away while sending
                log.debug("client went away from %s", scope.get("path"))
            except Exception:
                log.exception("event stream on %s failed after the response started",
                              scope.get("path"))

        async def listen(cancel: anyio.CancelScope) -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    log.debug("client disconnected from %s", scope.get("path"))
                    cancel.cancel()
                    return

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listen, tg.cancel_scope)
                await stream()
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await aclose()
                    except Exception:
                        log.exception("closing an event stream failed")
            if self.on_close is not None:
                try:
                    self.on_close()
                except Exception:
                    log.exception("event stream on_close failed")
