"""The one internal request type and event stream that every API dialect maps onto, and the
`Engine` protocol: what the API may use of the engine, with the errors `submit` raises.

A dialect adapter turns its wire request into a GenerationRequest, submits it through the
serving handle (runtime/api/generation.py) and turns the RequestHandle's events into its wire
format. Nothing in the API uses the engine beyond `Engine` below; runtime/engine.py implements
it, tests/fake_engine.py fakes it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, AsyncIterator, Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: rank 0 draws one (ranks must agree on every draw)
    stop: list[str] = field(default_factory=list)  # stop strings; the text is excluded
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token when logprobs is on
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    # Constrained decoding: a grammar every rank compiles identically and applies as a logits
    # mask, e.g. {"type": "json_schema", "schema": {...}}, {"type": "json_object"},
    # {"type": "lark", "grammar": "..."} (see runtime/constrain.py).
    grammar: dict | None = None
    # Every rank applies these alike (runtime/sampling.py): min_p keeps the tokens at least
    # min_p x as likely as the most likely one (0: off; before temperature, as llama.cpp);
    # logit_bias is added to the logits; the penalties follow OpenAI's convention (presence and
    # frequency over the output, repetition over prompt and output), or with penalty_window N
    # llama.cpp's (all three over the last N tokens).
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    penalty_window: int = 0


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    params: SamplingParams
    id: str = ""

    @property
    def kv_tokens(self) -> int:
        """The most KV cache it can take: prompt + max_tokens (what admission reserves)."""
        return len(self.prompt_tokens) + self.params.max_tokens


@dataclass
class TokenEvent:
    """One generated token. `text` is the new text it completes (may be '' while a multi-byte
    character or a possible stop string is still pending)."""

    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # any text held back until the end (flushed detokenizer tail)
    stop_string: str | None = None  # the stop string that ended generation, if any
    error: str | None = None
    cached_tokens: int = 0  # of prompt_tokens, how many the prefix cache served (no prefill)
    # Speculative decoding (--speculative): draft tokens proposed for this request, and how many of
    # them the model accepted (each accepted one is a completion token that cost no forward pass).
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


Event = TokenEvent | FinishEvent

_ids = itertools.count()


class RequestHandle:
    """Engine -> one request's consumer. The engine thread calls `push`; an asyncio consumer
    iterates `events()`; `cancel()` asks rank 0 to drop the request at the next step."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.id = request.id or f"req-{next(_ids)}"
        self.cancelled = threading.Event()
        self.admitted_at: float | None = None  # monotonic time the engine let it join the batch
        self._loop = loop
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop else None
        self._sync: list[Event] = []
        self._cond = threading.Condition()
        self.done = False

    def push(self, ev: Event) -> None:
        if isinstance(ev, FinishEvent):
            self.done = True
        if self._aq is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass
        else:
            with self._cond:
                self._sync.append(ev)
                self._cond.notify_all()

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        assert self._aq is not None, "submit with a loop to consume asynchronously"
        while True:
            ev = await self._aq.get()
            yield ev
            if isinstance(ev, FinishEvent):
                return

    def iter_sync(self, timeout: float | None = None):
        """Blocking iteration for in-process use (benchmarks, tests)."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._sync):
                    if not self._cond.wait(timeout):
                        raise TimeoutError(f"request {self.id}: no event within {timeout} s")
                ev = self._sync[i]
            i += 1
            yield ev
            if isinstance(ev, FinishEvent):
                return


class PromptTooLong(ValueError):
    """The prompt plus max_tokens does not fit the context window (the API says 400)."""


class EngineFailed(RuntimeError):
    """The engine cannot take requests: it failed, or it is shutting down (the API says 503)."""


class QueueFull(Exception):
    """Admission control: the waiting queue is full (the API says 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Engine(Protocol):
    """What rank 0's API uses of the engine. Read-only properties: plain attributes satisfy
    them."""

    @property
    def model_id(self) -> str: ...
    @property
    def model_path(self) -> str | PathLike | None: ...  # the weights directory, if any
    @property
    def context_length(self) -> int: ...
    @property
    def created(self) -> int: ...  # unix time the engine was built (OpenAI's model card)
    @property
    def tokenizer(self) -> Any: ...  # mlx-lm's TokenizerWrapper
    @property
    def ready(self) -> bool: ...  # every rank has loaded and the step loop runs
    @property
    def failed(self) -> str | None: ...  # why the engine can no longer serve, once it cannot

    def load(self) -> tuple[int, int]: ...  # (running sequences, requests waiting to be admitted)

    def arriving(self) -> None:
        """A request passed admission and is being prepared (parsed, tokenized): its submit()
        follows soon, or never if it fails. A hint only: an idle engine may hold its first step
        a moment for it, so requests sent together start together."""
        ...

    def submit(self, req: GenerationRequest,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; raises PromptTooLong (it can never fit the context or the KV
        budget), QueueFull (too many waiting now), EngineFailed, or ValueError (a bad request,
        e.g. constrain.UnsupportedGrammar). A request that fits but not now waits its turn."""
        ...
