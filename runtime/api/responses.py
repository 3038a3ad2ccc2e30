"""OpenAI Responses dialect: POST /v1/responses (what `client.responses.create` calls).

Wire request -> chat messages (instructions first, then the input items) -> chat template ->
SamplingParams (+ a grammar for text.format / forced tool calls) -> `Serving.submit` (one
engine request) -> events -> a Response object, or SSE events `event: NAME\\ndata: {...}`.

Request fields
    model, input (a string, or a list of items: messages {"role": user|system|developer|
    assistant, "content": string | [input_text / output_text parts]}, function_call items from
    an earlier response, function_call_output items {"call_id", "output"}), instructions (a
    system message before the input), max_output_tokens (>= 1; default: the rest of the
    context), temperature (0..2; 0 = greedy), top_p (0..1; 0 = greedy), tools (function tools
    only), tool_choice ("auto" | "none" | "required" | {"type": "function", "name"}),
    text.format ({"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "name",
    "schema", "strict"}: enforced by constrained decoding), parallel_tool_calls (echoed),
    stream, plus the extensions top_k (>= the vocabulary means off) and seed (an int64 or
    uint64). Unknown fields are accepted and ignored. The limits are runtime/api/limits.py.

Decisions where the spec is silent or this server differs
- Responses are stored by default (`store: false` opts out), in memory on rank 0, bounded
  (runtime/api/response_store.py: the least recently used go first); `previous_response_id`
  continues a stored one (its conversation and output, then `input`; its instructions are not
  carried over, as in OpenAI's API), `GET /v1/responses/{id}` (and `/input_items`) read it,
  `DELETE` removes it. An unknown or evicted id is a 400 naming previous_response_id (404 on
  GET / DELETE). `item_reference` input items and `background` are a 400.
- tool_choice "none": the tools are still given to the chat template (the conversation may
  speak of them) but the model's text is never parsed for tool calls. "required" / a named
  function: the call is forced by a grammar (so it always parses and its arguments always
  match the function's parameters). "auto": the model's text is
  parsed for calls in its chat template's format.
- When both a forced tool call and a text.format are given, the tool call wins (the output is
  a function_call, not text).
- A response whose model produced no text has one message item with an empty output_text, so
  `response.output_text` is always defined.
- Cut by max_output_tokens: status "incomplete", incomplete_details.reason
  "max_output_tokens", the last message item's status "incomplete" (a function_call that was
  parsed is complete; a call cut half-way is shown as text); the stream ends with
  `response.incomplete` instead of `response.completed`.
- Streaming a function call: calls are recognised once complete (the chat template's markup is
  held back meanwhile), so output_item.added is followed by one function_call_arguments.delta
  carrying the whole arguments, then .done.
- parallel_tool_calls is echoed, not enforced: a forced call is always exactly one call.
- An engine failure before the stream starts is a 503 error object; after it started, an
  `error` event then `response.failed` (response.error {"code": "server_error", ...}).
- Logprobs (`include: ["message.output_text.logprobs"]`, `top_logprobs`), reasoning and
  non-function tools are not supported (the first two are ignored, tools are a 400).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from pydantic import Field

from .. import constrain
from ..requests import FinishEvent, SamplingParams
from . import tools as toolkit
from .body import JSONRoute
from .core import (
    Seed, StrictBody, output_budget, reply, request_grammar, sampling, seed_for,
    split_events,
)
from .errors import APIError, bad_request, not_found
from .generation import Serving
from .prompt import flatten_content, normalize_messages, render_chat
from .response_store import store_of
from .sse import sse_event

router = APIRouter(route_class=JSONRoute)

_ROLES = ("user", "system", "developer", "assistant")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------
# Request body: unknown fields allowed, known ones strictly typed and range-checked.
# ------------------------------------------------------------------------------------------------


class TextConfig(StrictBody):
    format: dict[str, Any] | None = None


class ResponsesRequest(StrictBody):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension
    seed: Seed | None = None  # extension
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    truncation: str | None = None


# ------------------------------------------------------------------------------------------------
# Request -> messages, tools, grammar
# ------------------------------------------------------------------------------------------------


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages: instructions, then the input items in order.
    Consecutive function_call items become one assistant message with tool calls (joined to
    the assistant text right before them); function_call_output items become tool results."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    if not body.input:
        raise bad_request("input: at least one item is required", "input")

    names: dict[str, str] = {}  # call_id -> function name
    pending: list[Any] = []  # ToolCalls waiting to become one assistant message
    pending_text: str | None = None

    def flush() -> None:
        nonlocal pending, pending_text
        if pending:
            messages.append(toolkit.tool_call_message(pending, content=pending_text))
        elif pending_text is not None:
            messages.append({"role": "assistant", "content": pending_text})
        pending, pending_text = [], None

    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad_request(f"{where}.role: must be one of {', '.join(_ROLES)} "
                                  f"(got {role!r})", f"{where}.role")
            content = item.get("content")
            if content is None:
                raise bad_request(f"{where}.content: field required", f"{where}.content")
            text = flatten_content(content, f"{where}.content") or ""
            flush()
            if role == "assistant":  # may be followed by this turn's function calls
                pending_text = text
            else:
                messages.append({"role": role, "content": text})
        elif kind == "function_call":
            call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
            for key, val in (("call_id", call_id), ("name", name), ("arguments", args)):
                if not isinstance(val, str):
                    raise bad_request(f"{where}.{key}: field required (a string)",
                                      f"{where}.{key}")
            names[call_id] = name
            pending.append(toolkit.ToolCall(id=call_id, name=name, arguments=args))
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise bad_request(f"{where}.call_id: field required (a string)",
                                  f"{where}.call_id")
            if "output" not in item:
                raise bad_request(f"{where}.output: field required", f"{where}.output")
            output = flatten_content(item.get("output"), f"{where}.output") or ""
            flush()
            messages.append(toolkit.tool_result_message(call_id, output,
                                                        name=names.get(call_id)))
        elif kind == "item_reference":
            raise bad_request(f"{where}.type: item references are not supported: send the items "
                              "themselves, or previous_response_id", f"{where}.type")
        elif kind == "reasoning":
            continue  # nothing this server can use
        else:
            raise bad_request(f"{where}.type: input item type {kind!r} is not supported "
                              "(message, function_call, function_call_output)", f"{where}.type")
    flush()
    return normalize_messages(messages, param="input")


@dataclass
class ToolSetup(toolkit.ToolSetup):
    """Plus what the response object echoes back."""

    echo_tools: list[dict[str, Any]] = field(default_factory=list)
    echo_choice: Any = "auto"


def tool_setup(body: ResponsesRequest) -> ToolSetup:
    setup = ToolSetup()
    for i, t in enumerate(body.tools or []):
        where = f"tools[{i}]"
        if t.get("type") != "function":
            raise bad_request(f"{where}.type: only function tools are supported "
                              f"(got {t.get('type')!r})", f"{where}.type")
        tool = toolkit.function_tool(t, where)  # Responses tools are flat: no "function" key
        strict = t.get("strict")
        setup.tools.append(tool)
        setup.echo_tools.append({"type": "function", "name": tool.name,
                                 "description": tool.description or None,
                                 "parameters": tool.parameters,
                                 "strict": True if strict is None else bool(strict)})
    toolkit.unique_tools(setup.tools)

    tc = body.tool_choice
    if tc is None:
        choice: Any = "auto"
    elif isinstance(tc, str):
        if tc not in ("auto", "none", "required"):
            raise bad_request("tool_choice: must be 'auto', 'none', 'required' or "
                              "{\"type\": \"function\", \"name\": ...}", "tool_choice")
        choice = tc
    else:
        if tc.get("type") != "function":
            raise bad_request(f"tool_choice.type: only 'function' is supported "
                              f"(got {tc.get('type')!r})", "tool_choice.type")
        choice = {"name": tc.get("name")}
    setup.choice = toolkit.checked_choice(setup.tools, choice, "tool_choice.name")
    setup.echo_choice = tc if tc is not None else "auto"
    return setup


def text_format(body: ResponsesRequest) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the format to echo, the grammar it needs or None)."""
    fmt = (body.text.format if body.text else None) or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return {"type": "text"}, None
    if kind == "json_object":
        return {"type": "json_object"}, constrain.json_object()
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise bad_request("text.format.schema: required (a JSON schema object)",
                              "text.format.schema")
        name = fmt.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("text.format.name: required", "text.format.name")
        echo = {"type": "json_schema", "name": name, "schema": schema,
                "strict": bool(fmt.get("strict", False)),
                "description": fmt.get("description")}
        return echo, constrain.json_schema(schema)
    raise bad_request(f"text.format.type: must be 'text', 'json_object' or 'json_schema' "
                      f"(got {kind!r})", "text.format.type")


# ------------------------------------------------------------------------------------------------
# Response objects
# ------------------------------------------------------------------------------------------------


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call: Any, status: str, arguments: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if arguments is None else arguments, "status": status}


@dataclass
class _Ctx:
    """Everything a Response object echoes from its request."""

    rid: str
    created: int
    model: str
    body: ResponsesRequest
    tools: ToolSetup
    fmt: dict[str, Any]
    prompt_tokens: int

    def response(self, status: str, output: list[dict], fin: FinishEvent | None = None,
                 error: dict | None = None) -> dict[str, Any]:
        usage = None
        if fin is not None:
            inp = fin.prompt_tokens or self.prompt_tokens
            usage = {"input_tokens": inp, "input_tokens_details": {"cached_tokens": fin.cached_tokens},
                     "output_tokens": fin.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": inp + fin.completion_tokens}
        b = self.body
        return {
            "id": self.rid, "object": "response", "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "model": self.model, "output": output,
            "parallel_tool_calls": True if b.parallel_tool_calls is None
            else b.parallel_tool_calls,
            "previous_response_id": b.previous_response_id, "reasoning": None,
            "store": b.store is not False,
            "temperature": 1.0 if b.temperature is None else float(b.temperature),
            "top_p": 1.0 if b.top_p is None else float(b.top_p),
            "text": {"format": self.fmt}, "tool_choice": self.tools.echo_choice,
            "tools": self.tools.echo_tools, "truncation": b.truncation or "disabled",
            "metadata": b.metadata or {}, "user": b.user, "background": False,
            "usage": usage,
        }


def _status(fin: FinishEvent | None) -> str:
    return "incomplete" if fin is not None and fin.reason == "length" else "completed"


# ------------------------------------------------------------------------------------------------
# Output items, as stream events and as the final Response (one assembler for both)
# ------------------------------------------------------------------------------------------------


class _EventWriter:
    """Output items as Responses stream events, with a sequence number from 0; `response` is
    the final Response object once finished. encode=False (no stream) skips the events'
    encoding."""

    def __init__(self, ctx: _Ctx, encode: bool = True):
        self.ctx = ctx
        self.encode = encode
        self.seq = 0
        self.output: list[dict] = []  # finished items
        self.msg: dict | None = None  # the open message item: {"id", "text"}
        self.response: dict[str, Any] | None = None

    def event(self, name: str, payload: dict[str, Any]) -> bytes:
        self.seq += 1
        if not self.encode:
            return b""
        return sse_event(name, {"type": name, "sequence_number": self.seq - 1, **payload})

    def start(self) -> list[bytes]:
        r = self.ctx.response("in_progress", [])
        return [self.event("response.created", {"response": r}),
                self.event("response.in_progress", {"response": r})]

    def _open_message(self) -> list[bytes]:
        mid = _id("msg")
        self.msg = {"id": mid, "text": ""}
        idx = len(self.output)
        return [
            self.event("response.output_item.added", {
                "output_index": idx,
                "item": {"type": "message", "id": mid, "status": "in_progress",
                         "role": "assistant", "content": []}}),
            self.event("response.content_part.added", {
                "item_id": mid, "output_index": idx, "content_index": 0,
                "part": _text_part("")}),
        ]

    def _close_message(self, status: str) -> list[bytes]:
        if self.msg is None:
            return []
        mid, text, idx = self.msg["id"], self.msg["text"], len(self.output)
        self.msg = None
        item = _message_item(mid, text, status)
        self.output.append(item)
        return [
            self.event("response.output_text.done", {
                "item_id": mid, "output_index": idx, "content_index": 0, "text": text,
                "logprobs": []}),
            self.event("response.content_part.done", {
                "item_id": mid, "output_index": idx, "content_index": 0,
                "part": _text_part(text)}),
            self.event("response.output_item.done", {"output_index": idx, "item": item}),
        ]

    def text(self, delta: str) -> list[bytes]:
        out = self._open_message() if self.msg is None else []
        self.msg["text"] += delta  # type: ignore[index]
        out.append(self.event("response.output_text.delta", {
            "item_id": self.msg["id"], "output_index": len(self.output),  # type: ignore[index]
            "content_index": 0, "delta": delta, "logprobs": []}))
        return out

    def call(self, call: Any) -> list[bytes]:
        out = self._close_message("completed")
        fid, idx = _id("fc"), len(self.output)
        item = _call_item(fid, call, "incomplete" if call.partial else "completed")
        self.output.append(item)
        out += [
            self.event("response.output_item.added", {
                "output_index": idx, "item": _call_item(fid, call, "in_progress", "")}),
            self.event("response.function_call_arguments.delta", {
                "item_id": fid, "output_index": idx, "delta": call.arguments}),
            self.event("response.function_call_arguments.done", {
                "item_id": fid, "output_index": idx, "name": call.name,
                "arguments": call.arguments}),
            self.event("response.output_item.done", {"output_index": idx, "item": item}),
        ]
        return out

    def pieces(self, pieces: list[Any]) -> list[bytes]:
        out: list[bytes] = []
        for p in pieces:
            out += self.text(p) if isinstance(p, str) else self.call(p)
        return out

    def finish(self, fin: FinishEvent) -> list[bytes]:
        status = _status(fin)
        # A response without output has one empty message, so output_text is always defined.
        out = self._open_message() if self.msg is None and not self.output else []
        if self.msg is not None:
            out += self._close_message(status)
        self.response = self.ctx.response(status, self.output, fin)
        name = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self.event(name, {"response": self.response}))
        return out

    def fail(self, err: APIError) -> list[bytes]:
        out = self._close_message("incomplete")
        out.append(self.event("error", {"code": err.code or err.type, "message": err.message,
                                        "param": err.param}))
        error = {"code": "server_error", "message": err.message}
        out.append(self.event("response.failed", {
            "response": self.ctx.response("failed", self.output, error=error)}))
        return out


# ------------------------------------------------------------------------------------------------
# The route
# ------------------------------------------------------------------------------------------------


@router.post("/v1/responses")
async def create_response(request: Request, body: ResponsesRequest):
    serving = Serving.of(request)
    model = serving.resolve_model(body.model)
    if body.background:
        raise bad_request("background: not supported (responses are answered while the client "
                          "waits)", "background")
    store = store_of(request.app)
    items = _conversation(store, body)
    body = body.model_copy(update={"input": items})
    serving.check_serving()
    serving.arriving()

    setup = tool_setup(body)
    fmt, fmt_grammar = text_format(body)
    tok = serving.tokenizer
    grammar = await serving.run_sync(request_grammar, tok, setup, fmt_grammar, "text.format")

    messages = input_messages(body)
    template_kw: dict[str, Any] = {}
    if setup.tools:  # also with "none": the conversation may speak of them
        template_kw["tools"] = toolkit.template_tools(setup.tools)
    tokens = await serving.run_sync(render_chat, tok, messages, param="input",
                                    context_length=serving.context_length,
                                    calls_allowed=setup.active, **template_kw)

    temperature, top_p = sampling(body.temperature, body.top_p)
    params = SamplingParams(max_tokens=output_budget(request, serving, body.max_output_tokens,
                                                     len(tokens), "max_output_tokens"),
                            temperature=temperature, top_p=top_p, top_k=body.top_k or 0,
                            seed=seed_for(body.seed), grammar=grammar)
    rid = _id("resp")
    gen = await serving.submit([(tokens, params)], rid, prompt_param="input",
                               names={"max_tokens": "max_output_tokens"})
    ctx = _Ctx(rid=rid, created=int(time.time()), model=model, body=body, tools=setup, fmt=fmt,
               prompt_tokens=len(tokens))
    streaming = _EventWriter(ctx)

    async def events(w: _EventWriter) -> AsyncIterator[bytes]:
        for chunk in w.start():
            yield chunk
        async for _, ev, pieces in split_events(gen, [toolkit.Splitter(tok, setup)]):
            for chunk in w.pieces(pieces):
                yield chunk
            if isinstance(ev, FinishEvent):
                for chunk in w.finish(ev):
                    yield chunk
                if body.store is not False and w.response is not None:
                    store.put(w.response, items)

    async def collect() -> dict[str, Any] | None:
        w = _EventWriter(ctx, encode=False)
        async for _ in events(w):
            pass
        return w.response

    return await reply(request, gen, bool(body.stream), lambda: events(streaming), collect,
                       streaming.fail)


def _conversation(store, body: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation's input items: the previous response's (its conversation and its
    output), then this request's input."""
    if isinstance(body.input, str):
        new = [{"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": body.input}]}]
    else:
        new = list(body.input)
    if body.previous_response_id is None:
        return new
    prev = store.get(body.previous_response_id)
    if prev is None:
        raise bad_request(f"previous_response_id: no stored response "
                          f"'{body.previous_response_id}' (never stored, deleted, or evicted: this "
                          "server keeps the latest responses in memory)", "previous_response_id",
                          "previous_response_not_found")
    return prev.conversation() + new


def _stored(request: Request, response_id: str):
    entry = store_of(request.app).get(response_id)
    if entry is None:
        raise not_found(f"no response '{response_id}' (never stored, deleted, or evicted)",
                        "response_id", "not_found")
    return entry


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str):
    return _stored(request, response_id).response


@router.get("/v1/responses/{response_id}/input_items")
async def get_input_items(request: Request, response_id: str):
    items = [dict(it, id=it.get("id") or f"item_{i}")
             for i, it in enumerate(_stored(request, response_id).items)]
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": False}


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str):
    if not store_of(request.app).delete(response_id):
        raise not_found(f"no response '{response_id}' (never stored, deleted, or evicted)",
                        "response_id", "not_found")
    return {"id": response_id, "object": "response", "deleted": True}
