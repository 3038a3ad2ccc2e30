"""Send the batch's requests to an OpenAI-compatible server, N at a time, with retries.

N workers pull from one queue, so the engine always has N requests to batch together. Each
request is retried (exponential backoff with jitter, Retry-After honoured) on connection errors,
timeouts, 5xx and 429; any other 4xx is the request's own fault and final. When the job is
stopping (Ctrl-C, the cluster died), a request that has no answer yet is abandoned, not failed:
it stays pending in the journal and the next run asks it again. So does the server saying its
engine failed (a rank died): that stops the job at once instead of failing the whole queue.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

import httpx

from launcher.batch import results
from launcher.batch.inputfile import BatchRequest

RETRY_STATUS = (429,)  # and every 5xx
FATAL_CODES = ("engine_failed",)  # the server says it cannot answer anything any more
MAX_BACKOFF_S = 8.0


@dataclass
class Settings:
    base_url: str              # ".../v1"
    api_key: Optional[str]
    concurrency: int
    max_retries: int
    request_timeout: float     # seconds for one attempt, whole answer
    trust_env: bool = True     # HTTP(S)_PROXY from the environment; off for our own loopback cluster


@dataclass
class Outcome:
    request: BatchRequest
    ok: bool
    line: dict                 # the output line
    attempts: int
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None


class _Retry(Exception):
    def __init__(self, code: str, message: str, status: Optional[int] = None, body: Any = None,
                 retry_after: Optional[float] = None):
        super().__init__(message)
        self.code, self.message, self.status, self.body, self.retry_after = code, message, status, body, retry_after


def backoff(attempt: int, retry_after: Optional[float] = None) -> float:
    """Seconds before retry number `attempt` (1, 2, …)."""
    delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 60.0))
    return delay


def _retry_after(r: httpx.Response) -> Optional[float]:
    try:
        return float(r.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _error_of(body: Any, status: int) -> tuple[str, str]:
    """(code, message) from an OpenAI-style error body, else from the status."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type") or f"http_{status}"
        return str(code), str(err.get("message") or f"HTTP {status}")
    if isinstance(err, str):
        return f"http_{status}", err
    text = body if isinstance(body, str) else ""
    return f"http_{status}", f"HTTP {status}" + (f": {text.strip()[:300]}" if text.strip() else "")


def _usage(body: dict) -> tuple[Optional[int], Optional[int]]:
    u = body.get("usage")
    if not isinstance(u, dict):
        return None, None
    p, c = u.get("prompt_tokens"), u.get("completion_tokens")
    return (p if isinstance(p, int) else None), (c if isinstance(c, int) else None)


class Runner:
    def __init__(self, settings: Settings, on_done: Callable[[Outcome], None], stop: asyncio.Event,
                 on_fatal: Optional[Callable[[str], None]] = None):
        self.s = settings
        self.on_done = on_done   # called in the event loop, once per finished request
        self.stop = stop         # set: abandon what has no answer yet
        self.on_fatal = on_fatal # called (then stop is set) when the server says it is broken for good
        self.client: Optional[httpx.AsyncClient] = None

    def _endpoint(self, url: str) -> str:
        return self.s.base_url.rstrip("/") + url[len("/v1"):]

    async def _attempt(self, req: BatchRequest) -> Outcome:
        assert self.client is not None
        try:
            r = await asyncio.wait_for(self.client.post(self._endpoint(req.url), json=req.body),
                                       self.s.request_timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise _Retry("timeout", f"no answer from {self.s.base_url} within {self.s.request_timeout:g} s "
                                    "(--request-timeout)") from None
        except httpx.TransportError as e:
            raise _Retry("connection_error", f"cannot reach {self.s.base_url}: {str(e) or type(e).__name__}") from None
        try:
            body: Any = r.json()
        except ValueError:
            body = r.text
        if 200 <= r.status_code < 300:
            if not isinstance(body, dict):
                return Outcome(req, False, results.error_line(
                    req.custom_id, "invalid_response",
                    f"the server answered {r.status_code} with a body that is not a JSON object",
                    r.status_code, body), 1)
            p, c = _usage(body)
            return Outcome(req, True, results.ok_line(req.custom_id, r.status_code, body), 1, p, c)
        code, message = _error_of(body, r.status_code)
        if r.status_code in RETRY_STATUS or r.status_code >= 500:
            raise _Retry(code, message, r.status_code, body, _retry_after(r))
        return Outcome(req, False, results.error_line(req.custom_id, code, message, r.status_code, body), 1)

    async def send(self, req: BatchRequest) -> Optional[Outcome]:
        """The request's final outcome, or None if the job stopped before it had one."""
        last: Optional[_Retry] = None
        for attempt in range(self.s.max_retries + 1):
            if attempt:
                try:  # sleep, but wake up at once if the job is stopping
                    await asyncio.wait_for(self.stop.wait(), backoff(attempt, last.retry_after if last else None))
                except asyncio.TimeoutError:
                    pass
            if self.stop.is_set():
                return None
            try:
                out = await self._attempt(req)
            except _Retry as e:
                if e.code in FATAL_CODES:
                    if self.on_fatal:
                        self.on_fatal(e.message)
                    self.stop.set()
                    return None
                last = e
                continue
            out.attempts = attempt + 1
            return out
        if self.stop.is_set():
            return None
        assert last is not None
        tries = self.s.max_retries + 1
        message = f"{last.message} (after {tries} attempt{'s' if tries > 1 else ''})"
        return Outcome(req, False, results.error_line(req.custom_id, last.code, message, last.status, last.body), tries)

    async def _worker(self, queue: "asyncio.Queue[BatchRequest]") -> None:
        while not self.stop.is_set():
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            out = await self.send(req)
            if out is None:
                return
            self.on_done(out)

    async def run(self, requests: list[BatchRequest]) -> None:
        """Send every request, or until `stop` is set (the journal then says what is left)."""
        queue: asyncio.Queue[BatchRequest] = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)
        headers = {"Authorization": f"Bearer {self.s.api_key}"} if self.s.api_key else {}
        n = max(1, min(self.s.concurrency, len(requests)))
        timeout = httpx.Timeout(self.s.request_timeout, connect=min(self.s.request_timeout, 10.0))
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers,
                                     trust_env=self.s.trust_env) as client:
            self.client = client
            workers = [asyncio.create_task(self._worker(queue)) for _ in range(n)]
            stopping = asyncio.create_task(self.stop.wait())
            try:
                pending = set(workers)
                while pending and not self.stop.is_set():
                    done, pending = await asyncio.wait(pending | {stopping}, return_when=asyncio.FIRST_COMPLETED)
                    pending.discard(stopping)
                    for w in done - {stopping}:
                        w.result()  # a worker's error (a bug, the journal unwritable) ends the job
            finally:
                # Stopping or failing: in-flight requests are abandoned and stay pending in the journal.
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                stopping.cancel()
