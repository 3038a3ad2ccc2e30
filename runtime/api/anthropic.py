"""Anthropic Messages dialect: POST /v1/messages, POST /v1/messages/count_tokens.

Wire request -> chat messages (system, text, tool_use, tool_result) -> the chat template
(with the tools) -> SamplingParams (+ a grammar when tool_choice forces a tool) ->
`Serving.submit` -> events -> Anthropic's message object, or its named SSE events.

Request fields: model (required), max_tokens (required, >= 1; more than the context leaves
beside the prompt is clamped to what it leaves, see core.output_budget), messages (role
user|assistant, or system: a mid-conversation instruction, kept in place;
content a string or blocks: text, tool_use (assistant), tool_result (user; content a string or
text blocks; is_error prefixes "Error: "), thinking / redacted_thinking (dropped); image and
document blocks are a 400 (text-only models)), system (string or text blocks), stop_sequences
(up to 16, each at most 256 characters), temperature (0..1, default 1; 0 = greedy, else at
least 1e-6), top_p (0..1; 0 = greedy), top_k (>= the vocabulary means off),
tools (custom tools: name, description, input_schema; server tools are a 400), tool_choice
({"type": "auto"|"any"|"tool"|"none", "name"}; "any" and "tool" are enforced with
constrained decoding, so `input` always validates against `input_schema`), output_config.format
({"type": "json_schema", "schema"}: the text is JSON valid for the schema, also constrained;
a tool_choice that forces a tool wins over it, as in the other dialects),
stream.
metadata, thinking, service_tier and any unknown field are accepted and ignored; so are the
`anthropic-version` and `anthropic-beta` headers. A final assistant message is a prefill: the
reply continues it (its text is not repeated in the response).

Response: {"id": "msg_...", "type": "message", "role": "assistant", "model", "content":
[text | tool_use blocks], "stop_reason": "end_turn" | "max_tokens" | "stop_sequence" |
"tool_use", "stop_sequence", "usage": {"input_tokens", "output_tokens", ...}}. No output at
all gives `content: []` (as Anthropic does); whitespace-only text around tool calls is dropped.

Streaming: message_start, ping, then per block content_block_start / content_block_delta
(text_delta, or one input_json_delta carrying the whole input once the call is complete) /
content_block_stop, then message_delta (stop_reason, stop_sequence, usage) and message_stop.
A failure after the stream started is an `error` event ({"type": "error", "error": {...}}),
and the stream ends there.

Errors: {"type": "error", "error": {"type", "message"}} for every path under /v1/messages
(also the API-key middleware's 401 and FastAPI's validation / routing errors). Statuses:
400 invalid_request_error (bad fields, missing max_tokens, prompt too long), 401
authentication_error, 404 not_found_error (unknown model or route), 500 api_error, and 503
when the engine is unavailable: `overloaded_error` while it loads or shuts down, `api_error`
once it has failed. 503 rather than Anthropic's private 529: it is what /ready and every other
dialect of this server say, and the SDK retries both the same way.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from .. import constrain
from ..requests import FinishEvent, SamplingParams
from . import tools as toolkit
from .body import JSONRoute
from .core import (
    StopList, StrictBody, output_budget, reply, request_grammar, sampling, split_events, stop_strings,
)
from .errors import ANTHROPIC_PREFIX, anthropic_error_body as error_body, bad_request
from .generation import Serving
from .prompt import encode_continuation, encode_text, render_chat
from .sse import sse_event

router = APIRouter(route_class=JSONRoute)

PREFIX = ANTHROPIC_PREFIX  # errors under it take Anthropic's shape (errors.py)
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


# ------------------------------------------------------------------------------------------------
# Request bodies: unknown fields allowed, known ones strictly typed and range-checked.
# ------------------------------------------------------------------------------------------------


class Message(StrictBody):
    role: Literal["user", "assistant", "system"]  # system: mid-conversation instructions
    content: str | list[dict[str, Any]]


class ToolDef(StrictBody):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom", or a server tool ("web_search_20250305", ...)


class ToolChoice(StrictBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None  # accepted; one call per turn when forced


class _Shared(StrictBody):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    output_config: dict[str, Any] | None = None  # format: structured output; effort: ignored


class MessagesRequest(_Shared):
    max_tokens: int = Field(ge=1)
    stop_sequences: StopList | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = None  # accepted, ignored
    stream: bool | None = False


class CountTokensRequest(_Shared):
    pass


# ------------------------------------------------------------------------------------------------
# Wire request -> chat messages, tools, grammar, prompt tokens
# ------------------------------------------------------------------------------------------------


def _text_of(blocks: Any, where: str) -> str:
    """A string, or text blocks joined without a separator."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise bad_request(f"{where}: expected a string or a list of text blocks", where)
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise bad_request(f"{where}[{i}]: expected a text block, got {kind!r} (this server "
                              "serves a text-only model)", f"{where}[{i}]")
        out.append(b["text"])
    return "".join(out)


def _tools(body: _Shared) -> list[toolkit.Tool]:
    out = []
    for i, t in enumerate(body.tools or []):
        where = f"tools[{i}]"
        if t.type not in (None, "custom"):
            raise bad_request(f"{where}.type: server tool {t.type!r} is not supported here "
                              "(only custom tools with an input_schema)", f"{where}.type")
        if not _TOOL_NAME.match(t.name):
            raise bad_request(f"{where}.name: must match ^[a-zA-Z0-9_-]{{1,128}}$",
                              f"{where}.name")
        if t.input_schema is None:
            raise bad_request(f"{where}.input_schema: field required", f"{where}.input_schema")
        if t.input_schema.get("type", "object") != "object":
            raise bad_request(f"{where}.input_schema.type: must be 'object'",
                              f"{where}.input_schema")
        out.append(toolkit.Tool(name=t.name, description=t.description or "",
                                parameters=t.input_schema))
    return toolkit.unique_tools(out)


def _choice(body: _Shared, tools: list[toolkit.Tool]) -> str | dict:
    """Anthropic tool_choice -> the shared choice ("auto"|"none"|"required"|{"name": fn})."""
    tc = body.tool_choice
    if tc is None or tc.type == "auto":
        return "auto"
    if tc.type == "none":
        return "none"
    if not tools:
        raise bad_request(f"tool_choice: type {tc.type!r} needs tools", "tool_choice")
    if tc.type == "any":
        return "required"
    if not tc.name:
        raise bad_request("tool_choice.name: required with type 'tool'", "tool_choice.name")
    return {"name": tc.name}


def _arguments(value: Any, where: str) -> str:
    if not isinstance(value, dict):
        raise bad_request(f"{where}: must be an object", where)
    return json.dumps(value, ensure_ascii=False)


def chat_messages(body: _Shared) -> tuple[list[dict], str | None]:
    """The internal chat messages, and the prefill (text of a final assistant message)."""
    out: list[dict] = []
    if body.system is not None:
        system = _text_of(body.system, "system")
        if system:
            out.append({"role": "system", "content": system})
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results
    prefill: str | None = None
    last = len(body.messages) - 1
    for i, m in enumerate(body.messages):
        where = f"messages[{i}].content"
        if m.role == "system":  # kept in place; render_chat folds it for templates that refuse
            out.append({"role": "system", "content": _text_of(m.content, where)})
            continue
        if isinstance(m.content, str):
            if m.role == "assistant" and i == last:
                prefill = m.content
            else:
                out.append({"role": m.role, "content": m.content})
            continue
        texts: list[str] = []
        calls: list[toolkit.ToolCall] = []
        results: list[dict] = []
        for j, b in enumerate(m.content):
            bw = f"{where}[{j}]"
            kind = b.get("type")
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind in ("thinking", "redacted_thinking"):
                continue  # earlier turns' reasoning: not part of the prompt
            elif kind == "tool_use":
                if m.role != "assistant":
                    raise bad_request(f"{bw}: tool_use blocks belong to assistant messages", bw)
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise bad_request(f"{bw}: tool_use needs an id and a name", bw)
                calls.append(toolkit.ToolCall(id=b["id"], name=b["name"],
                                              arguments=_arguments(b.get("input", {}),
                                                                   f"{bw}.input")))
                names[b["id"]] = b["name"]
            elif kind == "tool_result":
                if m.role != "user":
                    raise bad_request(f"{bw}: tool_result blocks belong to user messages", bw)
                call_id = b.get("tool_use_id")
                if not isinstance(call_id, str):
                    raise bad_request(f"{bw}.tool_use_id: required", f"{bw}.tool_use_id")
                content = b.get("content")
                text = "" if content is None else _text_of(content, f"{bw}.content")
                if b.get("is_error"):
                    text = f"Error: {text}" if text else "Error"
                results.append(toolkit.tool_result_message(call_id, text,
                                                           name=names.get(call_id)))
            else:
                raise bad_request(f"{bw}: content block type {kind!r} is not supported (this "
                                  "server serves a text-only model: text, tool_use and "
                                  "tool_result blocks)", bw)
        text = "".join(texts)
        if m.role == "assistant":
            if calls:
                out.append(toolkit.tool_call_message(calls, content=text or None))
            elif i == last:
                prefill = text
            else:
                out.append({"role": "assistant", "content": text})
        else:
            out.extend(results)  # Anthropic puts tool results first in the user turn
            if texts or not results:
                out.append({"role": "user", "content": text})
    return out, prefill


@dataclass
class Prepared:
    tokens: list[int]
    setup: toolkit.ToolSetup = field(default_factory=toolkit.ToolSetup)
    grammar: dict | None = None


def prepare(serving: Serving, body: _Shared, *, with_grammar: bool) -> Prepared:
    """Runs on the tokenizer thread: prompt tokens (and the grammar for a forced tool)."""
    tok = serving.tokenizer
    tools = _tools(body)
    setup = toolkit.ToolSetup(tools, toolkit.checked_choice(tools, _choice(body, tools),
                                                            "tool_choice.name"))
    messages, prefill = chat_messages(body)
    kwargs: dict[str, Any] = {}
    if tools:
        kwargs["tools"] = toolkit.template_tools(tools)
    ctx = serving.context_length
    if all(m.role == "system" for m in body.messages):
        raise bad_request("messages: at least one user message is required (system messages "
                          "alone are not a conversation)", "messages")
    if messages:
        tokens = render_chat(tok, messages, context_length=ctx, calls_allowed=setup.active,
                             **kwargs)
    elif prefill:  # only a prefill: treat it as a plain prompt
        tokens, prefill = encode_text(tok, prefill, param="messages", context_length=ctx), None
    else:
        raise bad_request("messages: at least one user message is required", "messages")
    if prefill:
        tokens = tokens + encode_continuation(tok, prefill, param="messages", context_length=ctx)
    fmt = _output_format(body)
    if not with_grammar:
        return Prepared(tokens, setup)
    fmt_grammar = None if fmt is None else constrain.json_schema(fmt)
    return Prepared(tokens, setup,
                    request_grammar(tok, setup, fmt_grammar, "output_config.format.schema"))


def _output_format(body: _Shared) -> dict | None:
    """output_config.format {"type": "json_schema", "schema": {...}} (structured outputs)."""
    oc = getattr(body, "output_config", None)
    if oc is None:
        return None
    if not isinstance(oc, dict):
        raise bad_request("output_config: must be an object", "output_config")
    fmt = oc.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" \
            or not isinstance(fmt.get("schema"), dict):
        raise bad_request("output_config.format: expected {\"type\": \"json_schema\", "
                          "\"schema\": {...}}", "output_config.format")
    return fmt["schema"]


def _params(request: Request, serving: Serving, body: MessagesRequest, prompt_len: int,
            grammar: dict | None) -> SamplingParams:
    temperature, top_p = sampling(body.temperature, body.top_p)
    max_tokens = output_budget(request, serving, body.max_tokens, prompt_len, "max_tokens")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=body.top_k or 0,
                          stop=stop_strings(body.stop_sequences, "stop_sequences"),
                          grammar=grammar)


# ------------------------------------------------------------------------------------------------
# Events -> content blocks (one assembler for both the stream and the final message)
# ------------------------------------------------------------------------------------------------


class Blocks:
    """The splitter's text pieces and tool calls -> Anthropic content blocks, as stream events
    and as the final list.

    A text block opens only once it has non-whitespace text, so whitespace around tool calls
    never becomes a block; text that is whitespace only and alone is kept (one text block)."""

    def __init__(self):
        self.content: list[dict[str, Any]] = []
        self.open = False  # the last block is a text block still open
        self.pending = ""  # whitespace not yet given to a block
        self.tool_uses = 0
        self.fin: FinishEvent | None = None

    def _start(self, block: dict[str, Any]) -> bytes:
        self.content.append(block)
        start = dict(block, input={}) if block["type"] == "tool_use" else dict(block, text="")
        return sse_event("content_block_start", {"type": "content_block_start",
                                                 "index": len(self.content) - 1,
                                                 "content_block": start})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event("content_block_delta", {"type": "content_block_delta",
                                                 "index": len(self.content) - 1, "delta": delta})

    def _stop(self) -> bytes:
        self.open = False
        return sse_event("content_block_stop", {"type": "content_block_stop",
                                                "index": len(self.content) - 1})

    def _text(self, text: str, force: bool = False) -> list[bytes]:
        if not text:
            return []
        if not self.open:
            self.pending += text
            if not self.pending.strip() and not force:
                return []
            text, self.pending = self.pending, ""
            out = [self._start({"type": "text", "text": ""})]
            self.open = True
        else:
            out = []
        self.content[-1]["text"] += text
        out.append(self._delta({"type": "text_delta", "text": text}))
        return out

    def _call(self, call: toolkit.ToolCall) -> list[bytes]:
        out = [self._stop()] if self.open else []
        self.pending = ""
        self.tool_uses += 1
        value = call.input()  # a call cut by max_tokens: what parses of it
        block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name,
                 "input": value}
        out.append(self._start(block))
        out.append(self._delta({"type": "input_json_delta",
                                "partial_json": json.dumps(value, ensure_ascii=False)}))
        out.append(self._stop())
        return out

    def feed(self, items: list[toolkit.ToolItem]) -> list[bytes]:
        out: list[bytes] = []
        for it in items:
            out += self._text(it) if isinstance(it, str) else self._call(it)
        return out

    def finish(self) -> list[bytes]:
        out: list[bytes] = []
        if self.pending and not self.content:  # whitespace-only output: still the answer
            pending, self.pending = self.pending, ""
            out += self._text(pending, force=True)
        if self.open:
            out.append(self._stop())
        return out


def stop_reason(fin: FinishEvent | None, blocks: Blocks) -> tuple[str, str | None]:
    if fin is not None and fin.reason == "length":
        return "max_tokens", None
    if fin is not None and fin.stop_string:
        return "stop_sequence", fin.stop_string
    if blocks.tool_uses:
        return "tool_use", None
    return "end_turn", None


def _usage(prompt_tokens: int, output_tokens: int, cached: int = 0) -> dict[str, Any]:
    """Anthropic counts input_tokens apart from the tokens read from the cache (they add up to
    the prompt); exolaunch's prefix cache is automatic, so nothing is ever "created" on request."""
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


# ------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------


@router.post(PREFIX)
async def messages(request: Request, body: MessagesRequest):
    serving, model = Serving.admit(request, body.model)
    prep = await serving.run_sync(prepare, serving, body, with_grammar=True)
    params = _params(request, serving, body, len(prep.tokens), prep.grammar)
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    gen = await serving.submit([(prep.tokens, params)], mid, prompt_param="messages",
                               names={"stop": "stop_sequences"})
    n_in = len(prep.tokens)

    def message(content: list[dict], reason: str | None, seq: str | None,
                usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": mid, "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": reason, "stop_sequence": seq,
                "usage": usage}

    async def run(blocks: Blocks) -> AsyncIterator[bytes]:
        """Every content event, in order; sets blocks.fin at the end."""
        async for _, ev, items in split_events(gen, [toolkit.Splitter(serving.tokenizer,
                                                                      prep.setup)]):
            for chunk in blocks.feed(items):
                yield chunk
            if isinstance(ev, FinishEvent):
                blocks.fin = ev
                for chunk in blocks.finish():
                    yield chunk

    def ending(blocks: Blocks) -> tuple[str, str | None, dict[str, Any]]:
        """stop_reason, stop_sequence and the usage."""
        fin = blocks.fin
        return (*stop_reason(fin, blocks), _usage(fin.prompt_tokens if fin and fin.prompt_tokens else n_in,
                                                  fin.completion_tokens if fin else 0,
                                                  fin.cached_tokens if fin else 0))

    async def stream() -> AsyncIterator[bytes]:
        blocks = Blocks()
        yield sse_event("message_start", {"type": "message_start", "message": message(
            [], None, None, _usage(n_in, 0))})
        yield sse_event("ping", {"type": "ping"})
        async for chunk in run(blocks):
            yield chunk
        reason, seq, usage = ending(blocks)
        yield sse_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": usage})
        yield sse_event("message_stop", {"type": "message_stop"})

    async def collect() -> dict[str, Any]:
        blocks = Blocks()
        async for _ in run(blocks):
            pass
        reason, seq, usage = ending(blocks)
        return message(blocks.content, reason, seq, usage)

    # A failure after the stream started is one `error` event, and the stream ends there.
    return await reply(request, gen, bool(body.stream), stream, collect,
                       lambda e: [sse_event("error", error_body(e))])


@router.post(PREFIX + "/count_tokens")
async def count_tokens(request: Request, body: CountTokensRequest):
    serving, _ = Serving.admit(request, body.model, generating=False)
    prep = await serving.run_sync(prepare, serving, body, with_grammar=False)
    return {"input_tokens": len(prep.tokens)}


__all__ = ["router", "error_body", "chat_messages", "prepare", "Blocks"]
