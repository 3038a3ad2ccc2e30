"""The serving handle: everything a dialect uses of the engine, and the engine's errors in HTTP.

`Serving` (one per app, `Serving.of(request)`) holds the engine (an `Engine`, the protocol in
runtime/requests.py) and
- exposes the model fields (id, path, context length, creation time, tokenizer),
- decides whether requests are taken (`state`: /ready and every route ask it),
- resolves the requested model name (`resolve_model`: 404 if it is not the served one;
  `admit` does both for a route),
- runs tokenization off the event loop (one worker thread, so the HF tokenizer is never used
  by two request threads at once),
- submits n engine requests for one API request (`submit` -> `Generation`), every
  SamplingParams checked first (runtime/api/limits.py: a 400 naming the dialect's field, or
  clamped), mapping PromptTooLong -> 400, QueueFull -> 429 with Retry-After and
  EngineFailed / not ready -> 503,
- merges their event streams (`Generation.events()`), turning an engine error into an
  `APIError` and never hanging: if the engine fails without finishing a request, a watchdog
  notices `engine.failed` within `poll_interval` seconds and finishes it with an error,
- cancels every request that has not finished when the consumer stops early (client gone,
  error, server shutdown): `Generation.events()`'s `finally`; `cancel_on_disconnect` does
  the same for a non-streaming answer whose client leaves.

Dialects use the engine only through `Serving`: it keeps the engine private.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from ..contract import read_config
from ..requests import (
    Engine, EngineFailed, FinishEvent, GenerationRequest, PromptTooLong, QueueFull,
    RequestHandle, SamplingParams, TokenEvent,
)
from . import limits
from .errors import (
    APIError, SERVER_ERROR, bad_request, internal, not_found, rate_limited, unavailable,
)
from .metrics import Metrics
from .prompt import TokenText

log = logging.getLogger("exolaunch.api")

T = TypeVar("T")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Collected:
    """One choice gathered to the end (non-streaming responses)."""

    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None


class Generation:
    """The engine requests behind one API request (n choices x prompts)."""

    def __init__(self, serving: "Serving", handles: list[RequestHandle]):
        self.serving = serving
        self.handles = handles
        self.finished = [False] * len(handles)
        self._tasks: list[asyncio.Task] = []
        self.track = serving.metrics.track(handles)  # TTFT, latencies, tokens (metrics.py)

    def cancel(self) -> None:
        """Cancel every request that has not finished (idempotent)."""
        for done, h in zip(self.finished, self.handles):
            if not done:
                h.cancel()
        for t in self._tasks:
            t.cancel()
        self.track.close()

    def _check(self, i: int, ev: TokenEvent | FinishEvent) -> None:
        """Bookkeeping for a finished request; raise APIError for an engine error or a
        cancellation nobody asked for."""
        self.track.event(i, ev)
        if not isinstance(ev, FinishEvent):
            return
        self.finished[i] = True
        if ev.reason == "error":
            failed = self.serving.failed
            if failed:
                raise engine_failed(failed)
            log.error("request %s failed in the engine: %s", self.handles[i].id, ev.error)
            raise APIError(500, f"generation failed: {ev.error or 'engine error'}",
                           SERVER_ERROR, None, "generation_failed")
        if ev.reason == "cancelled" and not self.handles[i].cancelled.is_set():
            raise unavailable("the request was cancelled by the server (shutting down?)",
                              "cancelled")

    async def _watchdog(self) -> None:
        """An engine that fails without finishing our requests must not hang them: once
        `engine.failed` is set, finish every open handle with an error event."""
        while True:
            await asyncio.sleep(self.serving.poll_interval)
            failed = self.serving.failed
            if failed:
                for h in self.handles:
                    if not h.done:
                        h.push(FinishEvent("error", len(h.request.prompt_tokens), 0,
                                           error=str(failed)))
                return

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
        """(choice index, event) in arrival order, ending after every FinishEvent.

        A FinishEvent with reason "error", an unrequested "cancelled", or an engine that failed
        silently raises APIError (5xx); whatever has not finished is then cancelled."""
        watchdog = asyncio.create_task(self._watchdog())
        self._tasks.append(watchdog)
        try:
            if len(self.handles) == 1:  # the common case: no merging hop
                async for ev in self.handles[0].events():
                    self._check(0, ev)
                    yield 0, ev
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(i: int, h: RequestHandle) -> None:
                try:
                    async for ev in h.events():
                        queue.put_nowait((i, ev))
                except asyncio.CancelledError:
                    raise
                except BaseException as e:  # never leave the consumer waiting
                    queue.put_nowait((i, e))

            self._tasks += [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
            remaining = len(self.handles)
            while remaining:
                i, ev = await queue.get()
                if isinstance(ev, BaseException):
                    log.error("event pump failed", exc_info=ev)
                    raise internal()
                self._check(i, ev)
                if isinstance(ev, FinishEvent):
                    remaining -= 1
                yield i, ev
        finally:
            self.cancel()

    async def collect(self) -> list[Collected]:
        out = [Collected() for _ in self.handles]
        async for i, ev in self.events():
            c = out[i]
            if isinstance(ev, TokenEvent):
                c.tokens.append(ev)
                c.text += ev.text
            else:
                c.text += ev.text
                c.finish = ev
        return out


def engine_failed(reason: str) -> APIError:
    return unavailable(f"the inference engine failed: {reason}", "engine_failed")


class Serving:
    poll_interval = 0.5

    def __init__(self, engine: Engine):
        self._engine = engine
        self.metrics = Metrics(engine)  # what /metrics, the dashboard and `exolaunch top` show
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exolaunch-tokenize")
        self._token_text: TokenText | None = None
        self._vocab: int | None = None

    @staticmethod
    def of(request: Request) -> "Serving":
        return request.app.state.serving

    @staticmethod
    def admit(request: Request, model: str | None, generating: bool = True) -> tuple["Serving", str]:
        """The handle and the served model id, for a request the engine can take now: 404 for
        another model, 503 while loading or once failed. `generating`: a submit follows."""
        serving = Serving.of(request)
        model_id = serving.resolve_model(model)
        serving.check_serving()
        if generating:
            serving.arriving()
        return serving, model_id

    def arriving(self) -> None:
        """A request that will generate is being prepared: an idle engine may hold its first
        step a moment for it, so requests sent together prefill together (Engine.arriving)."""
        self._engine.arriving()

    # --- model -------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return str(self._engine.model_id)

    @property
    def model_path(self) -> str | None:
        path = self._engine.model_path
        return None if path is None else str(path)

    @property
    def context_length(self) -> int:
        return int(self._engine.context_length)

    @property
    def created(self) -> int:
        return int(self._engine.created or 0)

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def token_text(self) -> TokenText:
        if self._token_text is None:
            self._token_text = TokenText(self.tokenizer)
        return self._token_text

    @property
    def vocab_size(self) -> int | None:
        """Token ids a prompt may use and the width of the logits a sampler sees: the smaller
        of the tokenizer's size and the model's vocab_size (None if neither is known)."""
        if self._vocab is None:
            sizes = []
            try:
                sizes.append(len(getattr(self.tokenizer, "_tokenizer", self.tokenizer)))
            except TypeError:
                pass
            try:
                config = read_config(self.model_path) if self.model_path else {}
            except (OSError, ValueError):
                config = {}
            v = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
            if isinstance(v, int) and v > 0:
                sizes.append(v)
            self._vocab = min(sizes) if sizes else 0
        return self._vocab or None

    def model_aliases(self) -> set[str]:
        mid = self.model_id
        base = mid.rstrip("/").rsplit("/", 1)[-1]
        names = {mid, "default", base, base.split(":", 1)[0]}  # "demo-llama" for "demo-llama:100m"
        path = self.model_path
        if path is not None:
            names.add(path)
            names.add(os.path.basename(path.rstrip("/")))
        return names

    def resolve_model(self, name: str | None, param: str = "model") -> str:
        """The served model id if `name` designates it: None/""/"default", the exact id, a
        name whose last path component is the id's (or the model directory's) last component,
        or the id without its ":tag" ("demo-llama" for "demo-llama:100m"). Anything else:
        404 model_not_found."""
        if not name or name in self.model_aliases():
            return self.model_id
        if name.rstrip("/").rsplit("/", 1)[-1] in self.model_aliases():
            return self.model_id
        raise not_found(f"the model '{name}' does not exist: this server serves "
                        f"'{self.model_id}'", param, "model_not_found")

    # --- engine state ------------------------------------------------------------------------
    @property
    def failed(self) -> str | None:
        return self._engine.failed

    def state(self) -> tuple[str, str]:
        """("ready" | "loading" | "failed", why): the one place that decides whether the engine
        takes requests (/ready reports it, `check_serving` enforces it)."""
        failed = self._engine.failed
        if failed:
            return "failed", str(failed)
        if not self._engine.ready:
            return "loading", "the model is still loading on the ranks"
        return "ready", ""

    def load(self) -> tuple[int, int]:
        return self._engine.load()

    def check_serving(self) -> None:
        status, why = self.state()
        if status == "failed":
            raise engine_failed(why)
        if status == "loading":
            raise unavailable("the model is still loading: retry shortly", "not_ready")

    async def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work on the tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    # --- submit ------------------------------------------------------------------------------
    async def submit(self, jobs: list[tuple[list[int], SamplingParams]], request_id: str,
                     prompt_param: str = "prompt", names: dict[str, str] | None = None
                     ) -> Generation:
        """One engine request per (prompt tokens, params) job. `names` maps the sampling
        fields (temperature, top_p, top_k, seed, stop, max_tokens, top_logprobs) to the
        dialect's own, for the 400 a bad value gets."""
        self.check_serving()
        limits.check_sequences(len(jobs), 1, prompt_param)
        jobs = [(tokens, limits.checked(params, self.vocab_size, names or {}))
                for tokens, params in jobs]
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for k, (tokens, params) in enumerate(jobs):
                req = GenerationRequest(prompt_tokens=tokens, params=params,
                                        id=f"{request_id}-{k}")
                handles.append(self._engine.submit(req, loop))
        except BaseException as e:
            for h in handles:
                h.cancel()
            if isinstance(e, PromptTooLong):
                raise APIError(400, str(e), "invalid_request_error", prompt_param,
                               "context_length_exceeded") from None
            if isinstance(e, QueueFull):
                raise rate_limited(str(e), e.retry_after) from None
            if isinstance(e, EngineFailed):
                raise engine_failed(str(e)) from None
            if isinstance(e, ValueError):
                raise bad_request(str(e)) from None
            if isinstance(e, Exception):
                log.exception("engine.submit failed")
                raise internal() from None
            raise
        return Generation(self, handles)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await `work`, cancelling it if the client disconnects first (a non-streaming request
    whose client is gone must not keep the engine busy). Returns an empty 499 response then
    (nobody receives it)."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if gone and not (current and current.cancelling()):
            log.debug("client disconnected from %s before the response", request.url.path)
            return Response(status_code=499)
        raise
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
