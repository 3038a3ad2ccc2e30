"""The stable front door: the URL `exolaunch run` prints, served by the launcher process.

Rank 0's API listens on a private address (`internal_address`); this reverse proxy owns the
user's --host/--port for the whole run, across restarts, so clients never see "connection
refused". What it answers depends on `ClusterState.phase` (written by the restart loop):

    ready                 every request goes to rank 0, streamed through unbuffered (SSE,
                          Ollama's NDJSON); responses carry `x-exolaunch-served-by: cluster`
    starting, restarting, stopping
                          /health and /ready: 503 with the phase and the reason;
                          inference: to the fallback upstream that speaks the request's
                          dialect (--fallback: OpenAI chat, completions, responses, models;
                          --fallback-anthropic: Messages; --fallback-ollama: chat, generate,
                          tags, show), else 503 with Retry-After in the dialect's own error
                          shape (runtime/api/errors.py)
    GET /exolaunch/status the run's state as JSON (phase, restarts, hosts, upstream...): what
                          `exolaunch ps` shows. Needs the API key unless asked from loopback.

A cluster answer of 429 (queue full) or 503 (engine failed), or rank 0 unreachable, also
sends a fallback-able request to the fallback. Fallback answers carry
`x-exolaunch-served-by: fallback`; its errors come back in the client's dialect.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from launcher.errors import LaunchError

log = logging.getLogger("exolaunch.frontdoor")

STATUS_PATH = "/exolaunch/status"
SERVED_BY = b"x-exolaunch-served-by"
# What an upstream of each dialect can take as it is: OpenAI-compatible (OpenRouter, vLLM, another
# exolaunch), Anthropic-compatible (Anthropic, or Moonshot's and DeepSeek's /anthropic endpoints),
# Ollama.
FALLBACK_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models")
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
OLLAMA_PATHS = ("/api/chat", "/api/generate", "/api/tags", "/api/show")
# Hop-by-hop headers (RFC 9110 7.6.1) and what the proxy sets itself.
_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length"}
_UPSTREAM_OWN = {b"server", b"date"}


def internal_address(rank0, data_port: int) -> tuple[str, int]:
    """Where rank 0's API listens behind the front door: loopback on a free port when rank 0
    is this machine; else its first ip, two below the data port (the control channel takes
    the port just below it)."""
    if rank0.is_local:
        from launcher.ports import free_port_run

        return "127.0.0.1", free_port_run(1)
    return (rank0.ips[0] if rank0.ips else rank0.name), data_port - 2


def wait_until_ready(upstream: str, api_key: str | None, *, stop: Callable[[], bool],
                     timeout: float = 120.0) -> bool:
    """Poll rank 0's /ready until it says ready (True), `stop()` turns true or `timeout` passes.
    Ranks report ready once loaded; the engine can still be warming up for a moment."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5.0) as client:
        while not stop() and time.monotonic() < deadline:
            try:
                if client.get(upstream + "/ready", headers=headers).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------------- state


@dataclass
class ClusterState:
    """What the front door knows about the cluster. The restart loop (main thread) writes it,
    the proxy thread reads it; every field is replaced whole, so no lock is needed."""
    model: str = ""
    url: str = ""                    # the public base URL (…/v1)
    max_restarts: int = 0
    phase: str = "starting"          # starting | ready | restarting | stopping
    upstream: str | None = None      # rank 0's internal base URL (http://ip:port), None when down
    restarts: int = 0
    world_size: int = 0
    hosts: list[str] = field(default_factory=list)
    reason: str = "the cluster is loading the model"
    last_failure: str | None = None
    started_at: float = field(default_factory=time.time)
    since: float = field(default_factory=time.time)  # when phase last changed
    expected_ready: float | None = None  # time.monotonic() when the cluster should serve again
    load_seconds: float = 10.0        # last launch-to-ready time (a guess until measured)
    served: dict = field(default_factory=lambda: {"cluster": 0, "fallback": 0, "unavailable": 0})

    def set(self, phase: str, reason: str = "", upstream: str | None = None) -> None:
        self.upstream = upstream if phase == "ready" else None
        self.reason, self.phase, self.since = reason, phase, time.time()

    def retry_after(self) -> int:
        """Whole seconds a client should wait: until the relaunch should be serving."""
        if self.expected_ready is None:
            return 5
        left = self.expected_ready - time.monotonic()
        return max(1, min(300, math.ceil(left if left > 0 else 2)))

    def to_dict(self) -> dict:
        return {"state": self.phase, "reason": self.reason or None, "model": self.model, "url": self.url,
                "restarts": self.restarts, "max_restarts": self.max_restarts,
                "world_size": self.world_size, "hosts": list(self.hosts), "upstream": self.upstream,
                "last_failure": self.last_failure, "started_at": self.started_at, "since": self.since,
                "retry_after": None if self.phase == "ready" else self.retry_after(),
                "served": dict(self.served)}


@dataclass
class Fallback:
    """The upstreams for while the cluster cannot serve, one per dialect: --fallback URL (an
    OpenAI-compatible base URL such as https://openrouter.ai/api/v1), --fallback-anthropic URL
    (an Anthropic base URL, as the SDK's ANTHROPIC_BASE_URL: /v1/messages is appended) and
    --fallback-ollama URL (an Ollama server); their key (--fallback-key-env) and --fallback-model
    (NAME for every request, or LOCAL=REMOTE pairs)."""
    url: str | None = None
    key: str | None = None
    model: str | None = None
    models: dict[str, str] = field(default_factory=dict)
    anthropic_url: str | None = None
    ollama_url: str | None = None

    def base(self, path: str) -> str | None:
        """The upstream base URL that speaks `path`'s dialect, or None: no fallback for it."""
        if path in FALLBACK_PATHS:
            return self.url
        if path in ANTHROPIC_PATHS:
            return self.anthropic_url
        if path in OLLAMA_PATHS:
            return self.ollama_url
        return None

    def target(self, path: str, query: bytes) -> str:
        base = self.base(path).rstrip("/")
        rest = path[len("/v1"):] if path in FALLBACK_PATHS else path  # OpenAI base URLs end in /v1
        return base + rest + (("?" + query.decode("latin-1")) if query else "")

    def auth(self, path: str) -> list[tuple[bytes, bytes]]:
        """The key as the dialect's clients send it (Anthropic's SDK: x-api-key)."""
        if not self.key:
            return []
        key = self.key.encode("latin-1")
        if path in ANTHROPIC_PATHS:
            return [(b"x-api-key", key), (b"authorization", b"Bearer " + key)]
        return [(b"authorization", b"Bearer " + key)]

    def map_body(self, body: bytes) -> bytes:
        if not (self.model or self.models) or not body:
            return body
        try:
            obj = json.loads(body)
        except ValueError:
            return body  # the upstream says what is wrong with it
        if not isinstance(obj, dict):
            return body
        name = obj.get("model")
        if isinstance(name, str) and name in self.models:
            obj["model"] = self.models[name]
        elif self.model:
            obj["model"] = self.model
        else:
            return body
        return json.dumps(obj).encode()


def parse_fallback_models(values: list[str]) -> tuple[str | None, dict[str, str]]:
    """--fallback-model values: one bare NAME (every request), and/or LOCAL=REMOTE pairs."""
    from launcher.errors import ConfigError

    model, models = None, {}
    for v in values:
        local, eq, remote = v.partition("=")
        if eq:
            if not local.strip() or not remote.strip():
                raise ConfigError(f"--fallback-model {v!r}: expected NAME or LOCAL=REMOTE.")
            models[local.strip()] = remote.strip()
        elif not v.strip():
            raise ConfigError("--fallback-model '': expected NAME or LOCAL=REMOTE.")
        elif model is not None:
            raise ConfigError(f"--fallback-model {v!r}: only one bare NAME (given {model!r} already); "
                              "map more names with LOCAL=REMOTE.")
        else:
            model = v.strip()
    return model, models


# ----------------------------------------------------------------------------------- the proxy


class _Unavailable(Exception):
    """Rank 0 could not be reached or would not take the request (and may hand it on)."""


class FrontDoor:
    """The proxy: `FrontDoor(state, host, port, ...).bind()` (port in use raises LaunchError
    in the caller), `.start()` serves from a daemon thread, `.stop()`."""

    def __init__(self, state: ClusterState, host: str, port: int, *, api_key: str | None = None,
                 fallback: Fallback | None = None, max_body_mb: float = 8.0):
        self.state, self.host, self.port = state, host, port
        self.api_key = api_key
        self.fallback = fallback
        self.max_body = int(max_body_mb * 1_000_000)
        self._sock = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._error: BaseException | None = None
        self._stopping = False
        self._cluster = None  # launcher.upstream.Pool, made on the proxy's loop
        self._upstream = None

    # -- lifecycle ---------------------------------------------------------------------------
    def bind(self) -> None:
        if self._sock is None:
            from runtime.api.listen import listen

            try:
                self._sock = listen(self.host, self.port)
            except OSError as e:
                raise LaunchError(f"the front door cannot listen on {self.host}:{self.port}: {e}. "
                                  "Fix: pass another --port, or stop what holds it.", status=5) from e
            self.port = self._sock.getsockname()[1]

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> "FrontDoor":
        """Serve from a daemon thread. wait=False returns at once (`run` starts the ranks
        meanwhile: uvicorn's and httpx's imports take ~0.2 s, and the bound socket
        queues connections until then); wait_started() then says whether it came up."""
        self.bind()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="exolaunch-frontdoor", daemon=True)
        self._thread.start()
        if wait:
            self.wait_started(timeout)
        return self

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self._server is None or not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise LaunchError(f"the front door did not start on {self.host}:{self.port}: {self._error!r}")
            self._thread.join(0.02)

    def _run(self) -> None:
        try:
            server = self._make_server()
            self._server = server
            if not self._stopping:  # stop() before the imports ended: never serve
                asyncio.run(self._serve())
        except BaseException as e:
            self._error = e
            log.exception("front door stopped with an error")

    def _make_server(self):
        import uvicorn

        app = self._app
        if self.api_key:
            from runtime.api.auth import APIKeyMiddleware

            app = APIKeyMiddleware(app, self.api_key, open_paths={"/health", STATUS_PATH})
        from runtime.api.dashboard import Dashboard

        app = Dashboard(app)  # the page holds no data (no key needed) and loads while the cluster restarts
        config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None,
                                lifespan="off", ws="none", timeout_keep_alive=30,
                                interface="asgi3", proxy_headers=False)
        return uvicorn.Server(config)

    async def _serve(self) -> None:
        import httpx

        from launcher.upstream import Pool

        self._cluster = Pool()
        self._upstream = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=16))
        try:
            await self._server.serve(sockets=[self._sock])
        finally:
            self._cluster.close()
            await self._upstream.aclose()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()

    # -- requests ----------------------------------------------------------------------------
    async def _app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == STATUS_PATH:
            return await self._status(scope, receive, send)
        if path == "/metrics" and scope["method"] == "GET":
            return await self._metrics(send)
        buf, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            buf += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(buf) > self.max_body:
                from runtime.api.errors import APIError

                return await self._error_reply(scope, receive, send, APIError(
                    413, f"request body larger than {self.max_body / 1e6:g} MB", code="request_too_large"))
        body = bytes(buf)
        st = self.state
        if path in ("/health", "/ready") and st.phase != "ready":
            return await self._json(send, 503, {"status": st.phase, "reason": st.reason, "restarts": st.restarts},
                                    [(b"retry-after", str(st.retry_after()).encode())])
        upstream = st.upstream
        fallback_ok = self.fallback is not None and self.fallback.base(path) is not None
        if st.phase == "ready" and upstream:
            try:
                return await self._forward(scope, receive, send, body, upstream, fallback_ok)
            except _Unavailable as e:
                why = str(e)
        else:
            why = st.reason or f"the cluster is {st.phase}"
        if fallback_ok:
            return await self._to_fallback(scope, receive, send, body, why)
        if path in ("/health", "/ready"):
            return await self._json(send, 503, {"status": "down", "reason": why, "restarts": st.restarts},
                                    [(b"retry-after", str(st.retry_after()).encode())])
        await self._unavailable(scope, receive, send, why)

    async def _status(self, scope, receive, send) -> None:
        if self.api_key and not _loopback_client(scope):
            from runtime.api.auth import presented_key

            got = presented_key(scope)
            if got is None or not hmac.compare_digest(got.encode("latin-1"), self.api_key.encode()):
                from runtime.api.errors import APIError

                return await self._error_reply(scope, receive, send, APIError(
                    401, "missing or incorrect API key", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}))
        await self._json(send, 200, self.state.to_dict())

    async def _metrics(self, send) -> None:
        """Rank 0's series (while it serves) and the front door's own, which outlive restarts:
        restarts_total and requests by who served them. The key middleware has checked the key."""
        from launcher.upstream import UpstreamError

        text = b""
        upstream = self.state.upstream
        if self.state.phase == "ready" and upstream:
            host, _, port = upstream.removeprefix("http://").rpartition(":")
            headers = [(b"authorization", f"Bearer {self.api_key}".encode())] if self.api_key else []
            try:
                resp = await self._cluster.request("GET", host.strip("[]"), int(port), "/metrics", headers, b"")
                body = await resp.read()
                await resp.release()
                if resp.status == 200:
                    text = body
            except UpstreamError as e:
                log.info("metrics: rank 0 is not answering (%s)", e)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"), (SERVED_BY, b"cluster")]})
        await send({"type": "http.response.body", "body": text + door_metrics(self.state)})

    async def _forward(self, scope, receive, send, body: bytes, upstream: str, fallback_ok: bool) -> None:
        from launcher.upstream import UpstreamError

        host, _, port = upstream.removeprefix("http://").rpartition(":")
        target = scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        try:
            resp = await self._cluster.request(scope["method"], host.strip("[]"), int(port), target, headers, body)
        except UpstreamError as e:
            raise _Unavailable(f"rank 0 is not answering ({e})") from e
        if fallback_ok and resp.status in (429, 503):
            await resp.release()
            raise _Unavailable("the cluster's queue is full" if resp.status == 429
                               else "the cluster cannot serve right now")
        self.state.served["cluster"] += 1
        await self._relay(resp.status, resp.headers, resp.chunks(), resp.release, receive, send, b"cluster")

    async def _to_fallback(self, scope, receive, send, body: bytes, why: str) -> None:
        import httpx
        from runtime.api.errors import APIError, unavailable

        fb = self.fallback
        path = scope["path"]
        base = fb.base(path)
        headers = [(k, v) for k, v in scope["headers"]
                   if k.lower() not in _HOP and k.lower() not in (b"authorization", b"x-api-key", b"cookie")]
        headers += fb.auth(path)
        req = self._upstream.build_request(scope["method"], fb.target(path, scope.get("query_string", b"")),
                                           headers=headers, content=fb.map_body(body))
        try:
            resp = await self._upstream.send(req, stream=True)
        except httpx.TransportError as e:
            err = unavailable(f"{why}, and the fallback {base} is unreachable too "
                              f"({type(e).__name__}: {e or 'no answer'})", code="fallback_unavailable")
            return await self._unavailable(scope, receive, send, None, err)
        self.state.served["fallback"] += 1
        if resp.status_code >= 400:
            raw = await resp.aread()
            await resp.aclose()
            message, typ, code = _upstream_error(raw, resp.status_code)
            keep = {k: v for k, v in resp.headers.items() if k.lower() in ("retry-after", "retry-after-ms")}
            err = APIError(resp.status_code, f"fallback {base}: {message}", typ, None, code, keep or None)
            return await self._error_reply(scope, receive, send, err, served_by=b"fallback")
        await self._relay(resp.status_code, resp.headers.raw, resp.aiter_raw(), resp.aclose, receive, send,
                          b"fallback")

    async def _relay(self, status: int, raw_headers, chunks, close, receive, send, served_by: bytes) -> None:
        """Stream an upstream response to the client chunk by chunk as it arrives; a client that
        leaves closes the upstream response (rank 0 then cancels the request)."""
        headers = [(k, v) for k, v in raw_headers
                   if k.lower() not in _HOP - {b"content-length"} and k.lower() not in _UPSTREAM_OWN]
        headers.append((SERVED_BY, served_by))

        async def pump() -> None:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        relay, watch = asyncio.ensure_future(pump()), asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
            if relay.done():
                try:
                    relay.result()
                except Exception as e:  # the upstream broke mid-response: the client sees it cut
                    log.info("upstream broke mid-response: %r", e)
        finally:
            for t in (relay, watch):
                t.cancel()
            await close()

    # -- replies -------------------------------------------------------------------------------
    async def _unavailable(self, scope, receive, send, why: str | None, err=None) -> None:
        from runtime.api.errors import unavailable

        st = self.state
        if err is None:
            err = unavailable(f"the cluster is not serving right now ({st.phase}: {why}); "
                              f"retry in {st.retry_after()} s", code="cluster_unavailable")
        secs = st.retry_after()
        err.headers = {**(err.headers or {}), "Retry-After": str(secs), "retry-after-ms": str(secs * 1000)}
        st.served["unavailable"] += 1
        await self._error_reply(scope, receive, send, err)

    async def _error_reply(self, scope, receive, send, err, served_by: bytes | None = None) -> None:
        from runtime.api.errors import error_response

        resp = error_response(scope["path"], err)
        if served_by:
            resp.headers[SERVED_BY.decode()] = served_by.decode()
        await resp(scope, receive, send)

    @staticmethod
    async def _json(send, status: int, obj: dict, headers=()) -> None:
        data = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode()), *headers]})
        await send({"type": "http.response.body", "body": data, "more_body": False})


def door_metrics(state: ClusterState) -> bytes:
    """The front door's Prometheus series, in the text format rank 0's prometheus-client writes."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Door:
        def collect(self):
            yield CounterMetricFamily("exolaunch:restarts", "Relaunches of the cluster by run --restart.",
                                      value=state.restarts)
            yield GaugeMetricFamily("exolaunch:cluster_ready", "1 while the cluster behind the front door serves.",
                                    value=1 if state.phase == "ready" else 0)
            served = CounterMetricFamily("exolaunch:frontdoor_requests",
                                         "Requests the front door answered, by who served them.", labels=["served_by"])
            for who, n in state.served.items():
                served.add_metric([who], n)
            yield served

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Door())
    return generate_latest(registry)


def _loopback_client(scope) -> bool:
    client = scope.get("client")
    try:
        return bool(client) and ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


def _upstream_error(raw: bytes, status: int) -> tuple[str, str, str | None]:
    """Message, OpenAI error type and code from an upstream's error body, whatever its shape."""
    from runtime.api.errors import INVALID_REQUEST, SERVER_ERROR

    typ, code = (INVALID_REQUEST if status < 500 else SERVER_ERROR), None
    try:
        obj = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return (text[:500] or f"HTTP {status}"), typ, code
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        message = err.get("message") or err.get("detail") or json.dumps(err)[:500]
        typ = err.get("type") if isinstance(err.get("type"), str) else typ
        code = err.get("code") if isinstance(err.get("code"), str) else None
    else:
        message = str(err)
    return str(message)[:2000], typ, code
