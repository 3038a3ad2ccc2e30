"""Ollama dialect at Ollama's own paths, so `OLLAMA_HOST=http://HOST:PORT` works unchanged with
the official `ollama` clients.

Routes (the model routes, /api/tags, /api/show, /api/ps, /api/version and `/`, and the model
names are in runtime/api/ollama_models.py)
    POST /api/chat        messages (role, content, tool_calls on assistant turns, role "tool"
                          results), tools, format, options, stream (default TRUE), keep_alive,
                          think (false only), logprobs / top_logprobs
    POST /api/generate    prompt, system, raw, context, format, options, stream (default TRUE)

Streams are NDJSON (application/x-ndjson): one object per line, the last with "done": true,
"done_reason" ("stop" | "length"), and Ollama's counters: total_duration, load_duration,
prompt_eval_count, prompt_eval_duration, eval_count, eval_duration (nanoseconds, measured:
load = request arrival -> submitted to the engine (parsing, template, tokenizing; the model is
always loaded), prompt_eval = submitted -> first token (queueing + prefill), eval = first token
-> last token, total = arrival -> end). Without streaming: one object with the whole text and
the same counters. An error before the stream starts is an HTTP status with {"error": "..."};
a failure mid-stream is one more line {"error": "..."}, then the stream ends.

Options (`options`): temperature (0..100, default 0.8; 0 = greedy, else at least 1e-6), top_p
(0..1, default 0.9; 0 = greedy), top_k (default 40; <= 0 or >= the vocabulary = off), seed (-1
= random), num_predict (>= 1; -1, -2 or absent: up to the rest of the context window), stop
(list of up to 16 strings of at most 256 characters, or one string), num_ctx (the context
window for this request, at most the model's: num_predict is capped to num_ctx minus the
prompt, which then ends with done_reason "length"; a prompt that alone fills num_ctx, or the
model's context, is a 400: prompts are never silently truncated). min_p (0..1), repeat_penalty
(0.01..100; 0 or 1: off), presence_penalty and frequency_penalty (-2..2) are applied as llama.cpp does, all
three over the last repeat_last_n tokens of prompt and output (default 64; -1: the context; 0:
no penalties; runtime/sampling.py); Ollama's default repeat_penalty of 1.1 is not, so output
stays what the other dialects give. typical_p is checked and ignored, like Ollama's other
options (num_gpu, mirostat, ...). NaN and infinities are a 400. The limits are
runtime/api/limits.py.

A body is JSON whatever its Content-Type says (runtime/api/body.py, AnyJSONRoute), as in
Ollama: `curl URL -d '{...}'` sends application/x-www-form-urlencoded.

format: "json" (a JSON object: constrain.json_object()) or a JSON schema
object (constrain.json_schema), enforced by constrained decoding; a schema the grammar engine
cannot compile is a 400.

Tools: Ollama's [{"type": "function", "function": {name, description, parameters}}]; a call
the model makes comes back as message.tool_calls [{"id", "function": {"index", "name",
"arguments": {...object...}}}] with done_reason "stop". Ollama has no tool_choice; as an
exolaunch extension, "tool_choice" ("auto" | "none" | "required" | a function name |
{"type": "function", "function": {"name": ...}}) is honoured at the top level of the body or
inside `options` (where the official SDK passes unknown keys through): "required" or a name
forces a call by constrained decoding. A function's arguments are the declared properties only
(`additionalProperties: false` unless the schema says otherwise): the official SDK cannot even
send that keyword (it keeps only type / items / description / enum of each property).
Tool results come back as {"role": "tool", "content", "tool_name"?, "tool_call_id"?}; without
an id they are matched to the open calls (by name, else in order).

Decisions
- An empty `messages` (chat) or `prompt` (generate) is Ollama's "load the model" probe: done at
  once with done_reason "load" ("unload" with keep_alive 0; nothing is unloaded).
- `images` (non-empty), `suffix`, a custom `template`, `think: true`: 400 (text-only model, no
  fill-in-the-middle, prompts always go through the model's own chat template).
- generate: `raw: true` sends the prompt as is; otherwise system + prompt go through the chat
  template. `context` (token ids from a previous final object) is prepended; the final object
  returns `context` = prompt + generated tokens, so conversations continue as in Ollama.
- keep_alive is accepted and ignored (the model stays loaded while exolaunch runs).
- Errors are {"error": "..."} under /api (the model routes' too: registered here).
- Auth: with --api-key, every /api route and `/` need the key (the SDK sends
  `Authorization: Bearer $OLLAMA_API_KEY`); only /health is open. An unauthenticated probe of
  `/` therefore gets 401, which is what it should learn.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import constrain
from ..requests import FinishEvent, SamplingParams, TokenEvent
from . import access, limits
from . import tools as toolkit
from .body import AnyJSONRoute
from .core import (
    Seed, StopList, StopString, checked_grammar, reply, request_grammar, sampling, seed_for,
    split_events, stop_or_length, stop_strings, token_logprob,
)
from .errors import APIError, bad_request
from .generation import Generation, Serving, new_id
from .ollama_models import listed_name, resolve
from .prompt import check_token_ids, encode_text, flatten_content, normalize_messages, render_chat
from .sse import EventStreamResponse, dumps

router = APIRouter(route_class=AnyJSONRoute)

NDJSON = "application/x-ndjson"
DEFAULT_TEMPERATURE = 0.8  # Ollama's defaults when the Modelfile sets none
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 40
OPTION_NAMES = {"temperature": "options.temperature", "top_p": "options.top_p",
                "top_k": "options.top_k", "seed": "options.seed", "stop": "options.stop",
                "max_tokens": "options.num_predict", "min_p": "options.min_p",
                "presence_penalty": "options.presence_penalty", "frequency_penalty": "options.frequency_penalty",
                "repetition_penalty": "options.repeat_penalty", "penalty_window": "options.repeat_last_n"}
REPEAT_LAST_N = 64  # Ollama's default window for the penalties


# ------------------------------------------------------------------------------------------------
# Request bodies (unknown fields accepted: Ollama clients send many)
# ------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class Options(_Body):
    """The options a request may set (Ollama's types: an integral float is an integer)."""

    temperature: float | None = Field(None, ge=0, le=limits.MAX_TEMPERATURE)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None  # <= 0: off
    seed: Seed | None = None  # -1: random
    num_predict: int | None = None  # -1, -2: up to the context
    num_ctx: int | None = Field(None, ge=1)
    stop: StopString | StopList | None = None
    tool_choice: str | dict[str, Any] | None = None  # exolaunch extension
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)  # checked, not applied
    repeat_penalty: float | None = Field(None, ge=0, le=limits.MAX_REPETITION_PENALTY)
    presence_penalty: float | None = Field(None, ge=-limits.PENALTY_MAX, le=limits.PENALTY_MAX)
    frequency_penalty: float | None = Field(None, ge=-limits.PENALTY_MAX, le=limits.PENALTY_MAX)
    repeat_last_n: int | None = Field(None, ge=-1)


class _Gen(_Body):
    model: str | None = None
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool | None = True
    keep_alive: float | int | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)
    tool_choice: str | dict[str, Any] | None = None  # exolaunch extension


class Message(_Body):
    role: str
    content: str | list[Any] | None = None
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class ChatBody(_Gen):
    messages: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Gen):
    prompt: str | None = None
    system: str | None = None
    template: str | None = None
    suffix: str | None = None
    raw: bool | None = False
    context: list[int] | None = None
    images: list[Any] | None = None


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _params(request: Request, serving: Serving, body: _Gen, prompt_len: int,
            grammar: dict | None) -> SamplingParams:
    o = body.options or Options()
    num_predict, num_ctx, seed = o.num_predict, o.num_ctx, o.seed
    temperature, top_p = sampling(o.temperature, o.top_p, default_temperature=DEFAULT_TEMPERATURE,
                                  default_top_p=DEFAULT_TOP_P)
    top_k = DEFAULT_TOP_K if o.top_k is None else max(0, o.top_k)
    model_ctx = serving.context_length
    ctx = model_ctx if num_ctx is None else min(num_ctx, model_ctx)
    room = ctx - prompt_len
    if room < 1:
        where = f"num_ctx ({ctx})" if num_ctx is not None and num_ctx < model_ctx \
            else f"the model's context of {model_ctx} tokens"
        raise APIError(400, f"the prompt has {prompt_len} tokens, which leaves no room to "
                       f"generate within {where}", "invalid_request_error", "prompt",
                       "context_length_exceeded")
    if num_predict is None or num_predict in (-1, -2):
        max_tokens = room
    elif num_predict >= 1:
        max_tokens = min(num_predict, room)
        if num_predict > room:  # Ollama's own rule; told as in the other dialects
            access.note(request, clamp=(num_predict, room))
    else:
        raise bad_request('option "num_predict" must be >= 1, or -1 / -2 (up to the context)',
                          "options.num_predict")
    want_lp = bool(body.logprobs)
    window = REPEAT_LAST_N if o.repeat_last_n is None else ctx if o.repeat_last_n == -1 else o.repeat_last_n
    penalties = {}
    if window:  # llama.cpp: a window of 0 turns all three off
        penalties = dict(presence_penalty=o.presence_penalty or 0.0, frequency_penalty=o.frequency_penalty or 0.0,
                         repetition_penalty=o.repeat_penalty or 1.0, penalty_window=window)
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed_for(None if seed == -1 else seed),
        stop=stop_strings(o.stop, "options.stop"),
        logprobs=want_lp, top_logprobs=(body.top_logprobs or 0) if want_lp else 0,
        grammar=grammar, min_p=o.min_p or 0.0, **penalties,
    )


def _grammar(tokenizer, fmt: Any, setup: toolkit.ToolSetup) -> dict | None:
    """Runs on the tokenizer thread. The format is checked even when a forced call wins over
    it (the output is then the call)."""
    if fmt is None or fmt == "":
        grammar = None
    elif fmt == "json":
        grammar = constrain.json_object()
    elif isinstance(fmt, dict):
        grammar = constrain.json_schema(fmt)
    else:
        raise bad_request(f'format: must be "json" or a JSON schema object (got {fmt!r})',
                          "format")
    return request_grammar(tokenizer, setup, checked_grammar(tokenizer, grammar, "format"),
                           "format")


def _open(request: Request, body: _Gen) -> tuple[Serving, str]:
    """The serving handle and the listed model name (404 for another model, 400 for thinking)."""
    serving = Serving.of(request)
    model = resolve(serving, body.model)
    if body.think not in (None, False, "", "false"):
        raise bad_request(f'"{listed_name(serving)}" does not support thinking', "think")
    return serving, model


@dataclass
class _Clock:
    """Ollama's counters, in nanoseconds."""

    arrived: int = field(default_factory=time.perf_counter_ns)
    submitted: int = 0
    first: int = 0
    last: int = 0

    def token(self) -> None:
        now = time.perf_counter_ns()
        if not self.first:
            self.first = now
        self.last = now

    def final(self, fin: FinishEvent | None, prompt_len: int, reason: str) -> dict[str, Any]:
        end = time.perf_counter_ns()
        submitted = self.submitted or self.arrived
        first = self.first or end
        last = max(self.last, first)
        eval_count = fin.completion_tokens if fin is not None else 0
        return {
            "done": True,
            "done_reason": reason,
            "total_duration": max(1, end - self.arrived),
            "load_duration": max(1, submitted - self.arrived),
            "prompt_eval_count": (fin.prompt_tokens if fin is not None and fin.prompt_tokens
                                  else prompt_len),
            "prompt_eval_duration": max(1, first - submitted),
            "eval_count": eval_count,
            "eval_duration": max(1, (end if eval_count <= 1 else last) - first),
        }


class NDJSONResponse(EventStreamResponse):
    media_type = NDJSON  # the stream's content type; the rest as for SSE


def _line(obj: dict) -> bytes:
    return (dumps(obj) + "\n").encode()


@dataclass
class _Answer:
    """What /api/chat and /api/generate stream or return alike: under `key` ("message" or
    "response") the text (and a chat's tool calls, numbered in order), logprobs when asked,
    then the counters; generate's final object adds `context` (prompt + generated tokens)."""

    serving: Serving
    gen: Generation
    clock: _Clock
    model: str
    prompt: list[int]
    params: SamplingParams
    splitter: toolkit.Splitter
    key: str
    value: Callable[[str, list[dict]], Any]  # (text, tool_calls) -> what goes under key
    generated: list[int] = field(default_factory=list)
    fin: FinishEvent | None = None

    async def _pieces(self) -> AsyncIterator[tuple[str, list[dict], list[dict] | None]]:
        n_calls = 0
        async for _, ev, items in split_events(self.gen, [self.splitter]):
            lps = None
            if isinstance(ev, TokenEvent):
                self.clock.token()
                self.generated.append(int(ev.token))
                if self.params.logprobs:
                    lps = [token_logprob(self.serving.token_text, ev, self.params.top_logprobs)]
            else:
                self.fin = ev
            calls = [_call_json(c, n_calls + i)
                     for i, c in enumerate(p for p in items if not isinstance(p, str))]
            n_calls += len(calls)
            yield "".join(p for p in items if isinstance(p, str)), calls, lps

    def _object(self, text: str, calls: list[dict]) -> dict[str, Any]:
        return {"model": self.model, "created_at": _now(), self.key: self.value(text, calls)}

    def _final(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj.update(self.clock.final(self.fin, len(self.prompt), stop_or_length(self.fin)))
        if self.key == "response":
            obj["context"] = self.prompt + self.generated
        return obj

    async def stream(self) -> AsyncIterator[bytes]:
        async for text, calls, lps in self._pieces():
            if text or calls or lps:
                obj = {**self._object(text, calls), "done": False}
                if lps:
                    obj["logprobs"] = lps
                yield _line(obj)
        yield _line(self._final(self._object("", [])))

    async def collect(self) -> dict[str, Any]:
        text, calls, lps = "", [], []
        async for t, c, lp in self._pieces():
            text += t
            calls += c
            lps += lp or []
        obj = self._object(text, calls)
        if self.params.logprobs:
            obj["logprobs"] = lps
        return self._final(obj)


async def _respond(request: Request, gen: Generation, body: _Gen, stream_fn, collect_fn):
    """A failure mid-stream is one more line {"error": "..."}, then the stream ends."""
    return await reply(request, gen, body.stream is not False, stream_fn, collect_fn,
                       lambda e: [_line({"error": e.message})], response=NDJSONResponse)


def _load_response(model: str, body: _Gen, key: str, empty: Any) -> JSONResponse | Response:
    reason = "unload" if body.keep_alive in (0, "0", "0s", "0m") else "load"
    obj = {"model": model, "created_at": _now(), key: empty, "done": True, "done_reason": reason}
    if body.stream is False:
        return JSONResponse(obj)
    return Response(_line(obj), media_type=NDJSON)


# ------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------


def _tool_setup(body: ChatBody) -> toolkit.ToolSetup:
    tools = toolkit.function_tools(body.tools, close_objects=True)  # SDKs strip the bounds
    names = [t.name for t in tools]

    tc = body.tool_choice
    if tc is None and body.options is not None:
        tc = body.options.tool_choice
    if tc is None or tc == "auto":
        choice: Any = "auto"
    elif tc in ("none", "required"):
        choice = tc
    else:
        if isinstance(tc, dict):
            fn = tc.get("function") if isinstance(tc.get("function"), dict) else tc
            name = fn.get("name")
        else:
            name = tc
        if not isinstance(name, str) or name not in names:
            raise bad_request(f"tool_choice: must be 'auto', 'none', 'required' or the name of "
                              f"one of the tools (got {tc!r})", "tool_choice")
        choice = {"name": name}
    return toolkit.ToolSetup(tools, toolkit.checked_choice(tools, choice))


def _arguments_text(args: Any, where: str) -> str:
    if isinstance(args, str):  # tolerate OpenAI-style JSON text
        return args
    if args is None:
        return "{}"
    if not isinstance(args, dict):
        raise bad_request(f"{where}: must be an object", where)
    return json.dumps(args, ensure_ascii=False)


def _chat_messages(body: ChatBody) -> list[dict[str, Any]]:
    """Ollama messages -> template messages (tool calls and results through runtime/api/tools)."""
    out: list[dict[str, Any]] = []
    open_calls: list[Any] = []  # calls of the latest assistant turn not answered yet
    n_calls = 0
    for i, message in enumerate(body.messages or []):
        where = f"messages[{i}]"
        m = message.model_dump()
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{where}.role: required", f"{where}.role")
        if m.get("images"):
            raise bad_request(f"{where}.images: this model does not support images "
                              "(text only)", f"{where}.images")
        content = flatten_content(m.get("content"), f"{where}.content") or ""
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise bad_request(f"{where}.tool_calls: must be a list", f"{where}.tool_calls")
            parsed = []
            for j, c in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_request(f"{cw}.function.name: required", f"{cw}.function.name")
                cid = c.get("id") if isinstance(c.get("id"), str) and c.get("id") \
                    else f"call_{n_calls}"
                n_calls += 1
                parsed.append(toolkit.ToolCall(id=cid, name=fn["name"], arguments=_arguments_text(
                    fn.get("arguments"), f"{cw}.function.arguments")))
            out.append(toolkit.tool_call_message(parsed, content=content or None))
            open_calls = list(parsed)
        elif role == "tool":
            name = m.get("tool_name") or m.get("name")
            cid = m.get("tool_call_id")
            match = None
            if isinstance(cid, str) and cid:
                match = next((c for c in open_calls if c.id == cid), None)
            elif name:
                match = next((c for c in open_calls if c.name == name), None)
            elif open_calls:
                match = open_calls[0]
            if match is not None:
                open_calls.remove(match)
                cid, name = match.id, name or match.name
            if not cid:
                cid = f"call_{n_calls}"
                n_calls += 1
            out.append(toolkit.tool_result_message(cid, content, name=name))
        else:
            out.append({"role": role, "content": content})
    return normalize_messages(out)


def _call_json(call: toolkit.ToolCall, index: int) -> dict[str, Any]:
    return {"id": call.id, "function": {"index": index, "name": call.name,
                                        "arguments": call.input()}}


# ------------------------------------------------------------------------------------------------
# /api/chat
# ------------------------------------------------------------------------------------------------


@router.post("/api/chat")
async def chat(request: Request, body: ChatBody):
    clock = _Clock()
    serving, model = _open(request, body)
    if not body.messages:
        return _load_response(model, body, "message", {"role": "assistant", "content": ""})
    serving.check_serving()
    serving.arriving()
    setup = _tool_setup(body)
    messages = _chat_messages(body)
    tok = serving.tokenizer
    grammar = await serving.run_sync(_grammar, tok, body.format, setup)
    kw: dict[str, Any] = {}
    if setup.active:
        kw["tools"] = toolkit.template_tools(setup.tools)
    tokens = await serving.run_sync(render_chat, tok, messages,
                                    context_length=serving.context_length, **kw)
    params = _params(request, serving, body, len(tokens), grammar)
    gen = await serving.submit([(tokens, params)], new_id("ollama-chat"), prompt_param="messages",
                               names=OPTION_NAMES)
    clock.submitted = time.perf_counter_ns()

    def message(content: str, calls: list[dict]) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        return msg

    answer = _Answer(serving, gen, clock, model, tokens, params, toolkit.Splitter(tok, setup),
                     "message", message)
    return await _respond(request, gen, body, answer.stream, answer.collect)


# ------------------------------------------------------------------------------------------------
# /api/generate
# ------------------------------------------------------------------------------------------------


def _generate_tokens(serving: Serving, body: GenerateBody) -> list[int]:
    tok, n_ctx = serving.tokenizer, serving.context_length
    prompt = body.prompt or ""
    if body.raw:
        ids = encode_text(tok, prompt, context_length=n_ctx) if prompt else []
    else:
        messages = []
        if body.system:
            messages.append({"role": "system", "content": body.system})
        messages.append({"role": "user", "content": prompt})
        ids = render_chat(tok, messages, param="prompt", context_length=n_ctx)
    if body.context:
        ctx = check_token_ids(list(body.context), serving.vocab_size, param="context")
        if body.raw or not ids:
            ids = ctx + ids
        else:  # the template may start with BOS again: keep one
            bos = getattr(tok, "bos_token_id", None)
            if bos is not None and ids and ids[0] == bos and ctx and ctx[0] == bos:
                ids = ids[1:]
            ids = ctx + ids
    if not ids:
        ids = encode_text(tok, prompt, context_length=n_ctx)
    return ids


@router.post("/api/generate")
async def generate(request: Request, body: GenerateBody):
    clock = _Clock()
    serving, model = _open(request, body)
    if body.images:
        raise bad_request("images: this model does not support images (text only)", "images")
    if body.suffix:
        raise bad_request("suffix: fill-in-the-middle is not supported by this server", "suffix")
    if body.template:
        raise bad_request("template: custom prompt templates are not supported (the model's "
                          "chat template is used; send raw: true with a rendered prompt)",
                          "template")
    if not body.prompt and not body.context:
        return _load_response(model, body, "response", "")
    serving.check_serving()
    serving.arriving()
    grammar = await serving.run_sync(_grammar, serving.tokenizer, body.format, toolkit.ToolSetup())
    tokens = await serving.run_sync(_generate_tokens, serving, body)
    params = _params(request, serving, body, len(tokens), grammar)
    gen = await serving.submit([(tokens, params)], new_id("ollama-gen"), prompt_param="prompt",
                               names=OPTION_NAMES)
    clock.submitted = time.perf_counter_ns()
    answer = _Answer(serving, gen, clock, model, tokens, params,
                     toolkit.Splitter(serving.tokenizer, toolkit.ToolSetup()), "response",
                     lambda text, calls: text)
    return await _respond(request, gen, body, answer.stream, answer.collect)


