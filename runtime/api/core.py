"""What every dialect does alike between its wire format and `Serving`, written once.

    StrictBody          base of the strictly typed request bodies (unknown fields allowed)
    sampling, seed_for, stop_strings, output_budget
                        the sampling rules every dialect shares (top_p 0 = greedy, seeds
                        mod 2**63, stop strings within limits.MAX_STOP / MAX_STOP_CHARS,
                        max_tokens: default the rest of the context, clamped to it); the
                        bounds themselves are runtime/api/limits.py,
                        enforced for every dialect at `Serving.submit`
    checked_grammar, request_grammar
                        grammars refused up front with a 400 naming the field
    split_events        a Generation's events with the text pieces and tool calls they complete
    stop_or_length      the finish reason OpenAI and Ollama report
    token_logprob       a chat-style logprob entry (OpenAI chat, Ollama)
    reply               the answer: a guarded stream, or the collected result (both cancel the
                        engine requests when they end, the client leaves or anything fails)

A dialect module keeps only its wire types and its mapping onto these.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response

from .. import constrain
from . import access
from ..requests import FinishEvent, TokenEvent
from .errors import APIError, bad_request, internal
from .generation import Generation, Serving, cancel_on_disconnect
from .limits import (
    MAX_REQUEST_TOKENS, MAX_STOP, MAX_STOP_CHARS, SEED_MAX, SEED_MIN, SEED_MOD, check_stops,
)
from .prompt import TokenText
from .sse import EventStreamResponse
from .tools import Splitter, ToolItem, ToolSetup, forced_grammar

log = logging.getLogger("exolaunch.api")

T = TypeVar("T")


class StrictBody(BaseModel):
    """Unknown fields allowed (clients send many), known ones strictly typed; no NaN or
    infinity (JSON has neither, but Python's parser takes `NaN` and turns 1e999 into inf)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


# Wire types of the shared sampling fields, with the bounds of runtime/api/limits.py (in the
# OpenAPI schema too); Serving.submit checks the values again whatever the dialect.
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------


def sampling(temperature: float | None, top_p: float | None, *, default_temperature: float = 1.0,
             default_top_p: float = 1.0) -> tuple[float, float]:
    """(temperature, top_p) for the engine. top_p == 0 keeps only the most likely token:
    greedy."""
    t = default_temperature if temperature is None else float(temperature)
    p = default_top_p if top_p is None else float(top_p)
    return (0.0, 1.0) if p == 0.0 else (t, p)


def seed_for(seed: int | None, choice: int = 0) -> int | None:
    """Choice i of a seeded request uses seed + i; None lets rank 0 draw one."""
    return None if seed is None else (seed + choice) % SEED_MOD


def stop_strings(stop: Any, param: str) -> list[str]:
    """One stop string or a list of them, within the limits; empty ones dropped."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    return [s for s in check_stops(stops, param) if s]


def output_budget(request: Request, serving: Serving, max_tokens: int | None, prompt_len: int,
                  param: str) -> int:
    """The max_tokens the engine gets. None: the rest of the context. More than the context
    leaves beside the prompt: what it leaves (as Ollama and LM Studio do; agents such as Claude
    Code ask for 32000 whatever the model), so the answer may end with the dialect's length
    reason; the clamp is logged and told in a response header (runtime/api/access.py). With
    `--strict-max-tokens` that is a 400 instead. At least 1, so that a prompt that fills the
    context gets the engine's "too long" error with the numbers."""
    room = max(1, serving.context_length - prompt_len)
    if max_tokens is None:
        return room
    if max_tokens > MAX_REQUEST_TOKENS:  # not a budget but garbage: say so rather than clamp
        raise APIError(400, f"{param}: {max_tokens} is more than any context holds (at most "
                       f"{MAX_REQUEST_TOKENS})", "invalid_request_error", param,
                       "context_length_exceeded")
    if max_tokens <= room or prompt_len >= serving.context_length:
        return max_tokens
    if getattr(request.app.state, "strict_max_tokens", False):
        raise APIError(400, f"{param}: {max_tokens} tokens do not fit beside the prompt's "
                       f"{prompt_len} in the model's context of {serving.context_length} (at "
                       f"most {room})", "invalid_request_error", param, "context_length_exceeded")
    log.info("%s %d clamped to %d: the prompt has %d tokens of the context's %d", param,
             max_tokens, room, prompt_len, serving.context_length)
    access.note(request, clamp=(max_tokens, room))
    return room


# ------------------------------------------------------------------------------------------------
# grammars (run these on the tokenizer thread: compiling against the vocabulary takes a while)
# ------------------------------------------------------------------------------------------------


def checked_grammar(tokenizer, grammar: dict | None, param: str) -> dict | None:
    """`grammar` once it is sure to compile on every rank; else a 400 saying why, naming
    `param`."""
    if grammar is not None:
        try:
            constrain.validate(grammar, tokenizer)
        except constrain.UnsupportedGrammar as e:
            raise bad_request(f"{param}: {e}", param) from None
    return grammar


def request_grammar(tokenizer, setup: ToolSetup, fmt: dict | None, fmt_param: str) -> dict | None:
    """The grammar a request decodes under, checked: a forced tool call's (it wins over an
    output format in every dialect: the output is the call), else the format's."""
    if not setup.forced:
        return checked_grammar(tokenizer, fmt, fmt_param)
    try:
        grammar = forced_grammar(tokenizer, setup.tools, setup.choice)
    except constrain.UnsupportedGrammar as e:
        raise bad_request(f"tool_choice: {e}", "tool_choice") from None
    return checked_grammar(tokenizer, grammar, "tools")


# ------------------------------------------------------------------------------------------------
# events
# ------------------------------------------------------------------------------------------------


async def split_events(gen: Generation, splitters: list[Splitter]
                       ) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent, list[ToolItem]]]:
    """(choice, event, the text pieces and tool calls it completes); a finish flushes the
    choice's splitter."""
    async for i, ev in gen.events():
        items = splitters[i].feed(ev.text)
        if isinstance(ev, FinishEvent):
            items += splitters[i].finish()
        yield i, ev, items


def stop_or_length(fin: FinishEvent | None) -> str:
    """The finish reason OpenAI and Ollama report: "length", else "stop" (an error or an
    unrequested cancel never gets this far)."""
    return fin.reason if fin is not None and fin.reason in ("stop", "length") else "stop"


def finite(x: float | None) -> float | None:
    """JSON has no -inf: a masked-out token's logprob is shown as -9999."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else -9999.0


def token_logprob(tt: TokenText, ev: TokenEvent, k: int) -> dict[str, Any]:
    """{"token", "logprob", "bytes", "top_logprobs": [k of the same]} for one generated token."""
    return {
        "token": tt.text(ev.token), "logprob": finite(ev.logprob),
        "bytes": list(tt.bytes(ev.token)),
        "top_logprobs": [{"token": tt.text(t), "logprob": finite(lp), "bytes": list(tt.bytes(t))}
                         for t, lp in (ev.top_logprobs or [])[:k]],
    }


# ------------------------------------------------------------------------------------------------
# the answer
# ------------------------------------------------------------------------------------------------

OnError = Callable[[APIError], Iterable[bytes]]


async def guard(chunks: AsyncIterator[bytes], on_error: OnError, request: Request
                ) -> AsyncIterator[bytes]:
    """The stream guard: a failure after the stream started becomes the dialect's error
    event(s) (`on_error`), then the stream ends (the access log names the error)."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        access.note(request, error=e.message)
        for chunk in on_error(e):
            yield chunk
    except Exception as e:
        log.exception("stream on %s failed", request.url.path)
        access.note(request, error=f"{type(e).__name__}: {e}")
        for chunk in on_error(internal()):
            yield chunk
    finally:
        await chunks.aclose()


async def reply(request: Request, gen: Generation, streaming: bool,
                stream: Callable[[], AsyncIterator[bytes]], collect: Callable[[], Awaitable[T]],
                on_error: OnError, response: type[EventStreamResponse] = EventStreamResponse
                ) -> T | Response:
    """A guarded stream whose end (however it ends) cancels `gen`; or `collect()` awaited,
    cancelled if the client leaves first, `gen` cancelled whatever happens."""
    access.attach(request, gen)
    if streaming:
        return response(guard(stream(), on_error, request), on_close=gen.cancel)
    try:
        return await cancel_on_disconnect(request, collect())
    finally:
        gen.cancel()
