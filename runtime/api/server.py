"""Run the API with uvicorn in a background thread (rank 0's main thread owns the signals).

    server = start_server(engine, host, port, api_key, max_body_mb=8.0)
                                                         a daemon thread with its own event
    server.port, server.url; server.stop()               loop; returns once it accepts

The listening socket is bound before uvicorn starts, so a port in use raises OSError in the
caller (uvicorn itself would sys.exit), and port 0 picks a free port (`server.port`).

Graceful shutdown (`stop`): stop accepting, let running requests finish for up to
`graceful_timeout` seconds, then cancel them (which cancels their engine requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from typing import Any

import uvicorn

from ..requests import Engine
from .access import AccessLog
from .app import create_app
from .limits import DEFAULT_MAX_BODY_MB
from .listen import listen

log = logging.getLogger("exolaunch.api")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 52415  # exo's


class APIServer:
    def __init__(self, engine: Engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 api_key: str | None = None, *, app: Any = None, log_level: str = "warning",
                 access_log: bool = False, graceful_timeout: float = 5.0,
                 max_body_mb: float = DEFAULT_MAX_BODY_MB, strict_max_tokens: bool = False):
        self.engine = engine
        self.host = host
        self.port = port
        if app is None:
            app = create_app(engine, api_key=api_key, max_body_mb=max_body_mb)
            # A max_tokens beyond what the context leaves: 400, not clamped (core.output_budget).
            app.state.strict_max_tokens = strict_max_tokens
            app.add_middleware(AccessLog)  # outermost: one line per request, 401s included
        self.app = app
        self.config = uvicorn.Config(
            self.app, host=host, port=port, log_level=log_level, access_log=access_log,
            log_config=None, lifespan="off", ws="none",
            timeout_graceful_shutdown=graceful_timeout, timeout_keep_alive=30,
        )
        # Serving from a thread that is not the main one, uvicorn installs no signal handlers.
        self._server = uvicorn.Server(self.config)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # --- info --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    # --- running -----------------------------------------------------------------------------
    def bind(self) -> None:
        if self._sock is None:
            self._sock = listen(self.host, self.port)
            self.port = self._sock.getsockname()[1]

    async def serve_async(self) -> None:
        self.bind()
        assert self._sock is not None
        log.info("API listening on %s (model %s)", self.url, self.engine.model_id)
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            self._close()

    def start(self, timeout: float = 30.0) -> "APIServer":
        """Serve in a daemon thread; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self.bind()

        def target() -> None:
            try:
                asyncio.run(self.serve_async())
            except BaseException as e:  # SystemExit from uvicorn included
                self._error = e
                log.exception("API server stopped with an error")

        self._thread = threading.Thread(target=target, name="exolaunch-api", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"API server failed to start: {self._error!r}")
            if waited >= timeout:
                self.stop()
                raise TimeoutError(f"API server did not start within {timeout} s")
            self._thread.join(0.02)
            waited += 0.02
        return self

    def stop(self, timeout: float | None = 15.0) -> None:
        """Graceful shutdown; returns when the server thread has ended (background mode)."""
        self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _close(self) -> None:
        serving = getattr(getattr(self.app, "state", None), "serving", None)
        if serving is not None:
            serving.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


def start_server(engine: Engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 api_key: str | None = None, **kwargs: Any) -> APIServer:
    """Serve the API in a background thread (the engine keeps its own); returns when up."""
    return APIServer(engine, host, port, api_key, **kwargs).start()


start = start_server  # the name runtime/__main__.py uses
