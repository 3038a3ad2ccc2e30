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
    stream, plus the extensions top_k and seed. Unknown fields are accepted and ignored.

Decisions where the spec is silent or this server differs
- Nothing is stored: `store` is accepted but every response says `"store": false`;
  `previous_response_id` is a 400 (param previous_response_id) telling the client to send the
  whole conversation in `input`; `item_reference` input items are a 400 for the same reason.
  `background` is a 400 too (no polling without storage), `GET /v1/responses/{id}` a 404.
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

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from .. import constrain
from ..requests import FinishEvent, SamplingParams
from .errors import APIError, bad_request, internal, not_found
from .generation import Generation, Serving, cancel_on_disconnect
from .prompt import flatten_content, normalize_messages, render_chat
from . import tools as toolkit
from .sse import EventStreamResponse, sse_event

log = logging.getLogger("exolaunch.api")

router = APIRouter()

SEED_MOD = 1 << 63
_ROLES = ("user", "system", "developer", "assistant")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------
# Request body: unknown fields allowed, known ones strictly typed and range-checked.
# ------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextConfig(_Body):
    format: dict[str, Any] | None = None


class ResponsesRequest(_Body):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension
    seed: int | None = None  # extension
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


def _text_of(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return flatten_content(value, where) or ""
    if value is None:
        return ""
    raise bad_request(f"{where}: expected a string or a list of text parts", where)


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
            text = _text_of(content, f"{where}.content")
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
            output = _text_of(item.get("output"), f"{where}.output")
            flush()
            messages.append(toolkit.tool_result_message(call_id, output,
                                                        name=names.get(call_id)))
        elif kind == "item_reference":
            raise bad_request(f"{where}.type: item references are not supported (this server "
                              "stores no responses): send the items themselves", f"{where}.type")
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
    raw = body.tools or []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if t.get("type") != "function":
            raise bad_request(f"{where}.type: only function tools are supported "
                              f"(got {t.get('type')!r})", f"{where}.type")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"{where}.name: field required", f"{where}.name")
        params = t.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_request(f"{where}.parameters: must be a JSON schema object",
                              f"{where}.parameters")
        desc = t.get("description") or ""
        if not isinstance(desc, str):
            raise bad_request(f"{where}.description: must be a string", f"{where}.description")
        strict = t.get("strict")
        setup.echo_tools.append({"type": "function", "name": name, "description": desc or None,
                                 "parameters": params,
                                 "strict": True if strict is None else bool(strict)})
    names = [t["name"] for t in setup.echo_tools]
    if len(set(names)) != len(names):
        raise bad_request("tools: function names must be unique", "tools")

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
        fn = tc.get("name")
        if fn not in names:
            raise bad_request(f"tool_choice.name: no function named {fn!r} in tools",
                              "tool_choice.name")
        choice = {"name": fn}
    if choice == "required" and not names:
        raise bad_request("tool_choice: 'required' needs tools", "tool_choice")
    setup.choice = choice
    setup.echo_choice = tc if tc is not None else "auto"
    setup.tools = [toolkit.Tool(name=t["name"], description=t["description"] or "",
                                parameters=t["parameters"]) for t in setup.echo_tools]
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


def _validate_grammar(serving: Serving, grammar: dict, param: str) -> None:
    try:
        constrain.validate(grammar, serving.tokenizer)
    except constrain.UnsupportedGrammar as e:
        raise bad_request(f"{param}: {e}", param) from None


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
    temperature: float
    top_p: float
    max_output_tokens: int | None
    prompt_tokens: int

    def response(self, status: str, output: list[dict], fin: FinishEvent | None = None,
                 error: dict | None = None) -> dict[str, Any]:
        usage = None
        if fin is not None:
            inp = fin.prompt_tokens or self.prompt_tokens
            usage = {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
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
            "instructions": b.instructions, "max_output_tokens": self.max_output_tokens,
            "model": self.model, "output": output,
            "parallel_tool_calls": True if b.parallel_tool_calls is None
            else b.parallel_tool_calls,
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": self.temperature, "top_p": self.top_p,
            "text": {"format": self.fmt}, "tool_choice": self.tools.echo_choice,
            "tools": self.tools.echo_tools, "truncation": b.truncation or "disabled",
            "metadata": b.metadata or {}, "user": b.user, "background": False,
            "usage": usage,
        }


def _status(fin: FinishEvent | None) -> str:
    return "incomplete" if fin is not None and fin.reason == "length" else "completed"


class _Splitter:
    """Generated text -> a sequence of text pieces and ToolCalls (tool parsing when active)."""

    def __init__(self, setup: ToolSetup, tokenizer: Any):
        self.stream = (toolkit.ToolCallStream(tokenizer, setup.tools) if setup.active
                       else None)

    def feed(self, text: str) -> list[Any]:
        if self.stream is None:
            return [text] if text else []
        return [p for p in self.stream.feed(text) if p != ""]

    def finish(self) -> list[Any]:
        if self.stream is None:
            return []
        return [p for p in self.stream.finish() if p != ""]


# ------------------------------------------------------------------------------------------------
# Non-streaming
# ------------------------------------------------------------------------------------------------


def _collect_output(pieces: list[Any], status: str) -> list[dict]:
    output: list[dict] = []
    text: str | None = None
    for p in pieces:
        if isinstance(p, str):
            text = (text or "") + p
            continue
        if text is not None:
            output.append(_message_item(_id("msg"), text, "completed"))
            text = None
        output.append(_call_item(_id("fc"), p, "completed"))
    if text is not None or not output:
        output.append(_message_item(_id("msg"), text or "", status))
    return output  # a parsed function call is complete even when the response is not


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------


class _EventWriter:
    """Output items as Responses stream events, with a sequence number from 0."""

    def __init__(self, ctx: _Ctx):
        self.ctx = ctx
        self.seq = 0
        self.output: list[dict] = []  # finished items
        self.msg: dict | None = None  # the open message item: {"id", "text"}

    def event(self, name: str, payload: dict[str, Any]) -> bytes:
        obj = {"type": name, "sequence_number": self.seq, **payload}
        self.seq += 1
        return sse_event(name, obj)

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
        item = _call_item(fid, call, "completed")
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
        if self.msg is None and not self.output:
            out = self._open_message()
        else:
            out = []
        if self.msg is not None:
            out += self._close_message(status)
        name = "response.completed" if status == "completed" else "response.incomplete"
        out.append(self.event(name, {"response": self.ctx.response(status, self.output, fin)}))
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


def _serving(request: Request) -> Serving:
    return request.app.state.serving


@router.post("/v1/responses")
async def create_response(request: Request, body: ResponsesRequest):
    serving = _serving(request)
    model = serving.resolve_model(body.model)
    if body.previous_response_id is not None:
        raise bad_request("previous_response_id: this server does not store responses; send "
                          "the whole conversation in `input` (earlier output items included)",
                          "previous_response_id")
    if body.background:
        raise bad_request("background: not supported (this server does not store responses)",
                          "background")
    serving.check_serving()

    setup = tool_setup(body)
    fmt, grammar = text_format(body)
    grammar_param = "text.format"
    if setup.forced:
        try:
            grammar = toolkit.forced_grammar(serving.tokenizer, setup.tools,
                                                     setup.choice)
        except ValueError as e:  # constrain.UnsupportedGrammar
            raise bad_request(f"tool_choice: {e}", "tool_choice") from None
        grammar_param = "tools"
    if grammar is not None:
        _validate_grammar(serving, grammar, grammar_param)

    messages = input_messages(body)
    template_kw: dict[str, Any] = {}
    if setup.tools:  # also with "none": the conversation may speak of them
        template_kw["tools"] = toolkit.template_tools(setup.tools)
    tokens = await serving.run_sync(render_chat, serving.tokenizer, messages, param="input",
                                    **template_kw)

    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    s_temp, s_top_p = (0.0, 1.0) if top_p == 0.0 else (temperature, top_p)
    max_tokens = body.max_output_tokens
    if max_tokens is None:
        max_tokens = max(1, serving.engine.context_length - len(tokens))
    params = SamplingParams(max_tokens=max_tokens, temperature=s_temp, top_p=s_top_p,
                            top_k=body.top_k or 0,
                            seed=None if body.seed is None else body.seed % SEED_MOD,
                            grammar=grammar)
    rid = _id("resp")
    gen = await serving.submit([(tokens, params)], rid, prompt_param="input")
    ctx = _Ctx(rid=rid, created=int(time.time()), model=model, body=body, tools=setup, fmt=fmt,
               temperature=temperature, top_p=top_p, max_output_tokens=body.max_output_tokens,
               prompt_tokens=len(tokens))

    if body.stream:
        return EventStreamResponse(_stream(gen, ctx, serving.tokenizer), on_close=gen.cancel)

    async def work() -> dict[str, Any]:
        splitter = _Splitter(setup, serving.tokenizer)
        pieces: list[Any] = []
        fin: FinishEvent | None = None
        async for _, ev in gen.events():
            pieces += splitter.feed(ev.text)
            if isinstance(ev, FinishEvent):
                fin = ev
        pieces += splitter.finish()
        status = _status(fin)
        return ctx.response(status, _collect_output(pieces, status), fin)

    try:
        return await cancel_on_disconnect(request, work())
    finally:
        gen.cancel()


async def _stream(gen: Generation, ctx: _Ctx, tokenizer: Any) -> AsyncIterator[bytes]:
    w = _EventWriter(ctx)
    splitter = _Splitter(ctx.tools, tokenizer)
    try:
        for chunk in w.start():
            yield chunk
        async for _, ev in gen.events():
            pieces = splitter.feed(ev.text)
            if isinstance(ev, FinishEvent):
                pieces += splitter.finish()
            for chunk in w.pieces(pieces):
                yield chunk
            if isinstance(ev, FinishEvent):
                for chunk in w.finish(ev):
                    yield chunk
    except APIError as e:
        for chunk in w.fail(e):
            yield chunk
    except Exception:
        log.exception("responses stream failed")
        for chunk in w.fail(internal()):
            yield chunk
    finally:
        gen.cancel()


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str):
    raise not_found(f"no response '{response_id}': this server does not store responses",
                    "response_id", "not_found")
