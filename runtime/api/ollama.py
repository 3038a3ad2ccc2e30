"""Ollama dialect at Ollama's own paths, so `OLLAMA_HOST=http://HOST:PORT` works unchanged with
the official `ollama` clients.

Routes
    POST /api/chat        messages (role, content, tool_calls on assistant turns, role "tool"
                          results), tools, format, options, stream (default TRUE), keep_alive,
                          think (false only), logprobs / top_logprobs
    POST /api/generate    prompt, system, raw, context, format, options, stream (default TRUE)
    GET  /api/tags        the served model (name, size on disk, digest, details)
    POST /api/show        modelfile, parameters, template, details, model_info, capabilities
    GET  /api/ps          the loaded model (expires_at: far future, it is never unloaded)
    GET  /api/version     {"version": "0.12.0"} (the Ollama API level this adapter speaks)
    GET|HEAD /            "Ollama is running"

Streams are NDJSON (application/x-ndjson): one object per line, the last with "done": true,
"done_reason" ("stop" | "length"), and Ollama's counters: total_duration, load_duration,
prompt_eval_count, prompt_eval_duration, eval_count, eval_duration (nanoseconds, measured:
load = request arrival -> submitted to the engine (parsing, template, tokenizing; the model is
always loaded), prompt_eval = submitted -> first token (queueing + prefill), eval = first token
-> last token, total = arrival -> end). Without streaming: one object with the whole text and
the same counters. An error before the stream starts is an HTTP status with {"error": "..."};
a failure mid-stream is one more line {"error": "..."}, then the stream ends.

Options (`options`): temperature (>= 0, default 0.8; 0 = greedy), top_p (0..1, default 0.9;
0 = greedy), top_k (default 40; <= 0 = off), seed (-1 = random), num_predict (>= 1; -1, -2 or
absent: up to the rest of the context window), stop (list of strings, or one string), num_ctx
(the context window for this request, at most the model's: num_predict is capped to num_ctx
minus the prompt, which then ends with done_reason "length"; a prompt that alone fills num_ctx,
or the model's context, is a 400: prompts are never silently truncated). Other Ollama options
(repeat_penalty, num_gpu, mirostat, ...) are accepted and ignored.

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
- The model name: the served id, "default", the id's last path component, with or without
  ":latest" (what /api/tags lists: the id plus ":latest" when it has no tag). Others: 404.
- An empty `messages` (chat) or `prompt` (generate) is Ollama's "load the model" probe: done at
  once with done_reason "load" ("unload" with keep_alive 0; nothing is unloaded).
- `images` (non-empty), `suffix`, a custom `template`, `think: true`: 400 (text-only model, no
  fill-in-the-middle, prompts always go through the model's own chat template).
- generate: `raw: true` sends the prompt as is; otherwise system + prompt go through the chat
  template. `context` (token ids from a previous final object) is prepended; the final object
  returns `context` = prompt + generated tokens, so conversations continue as in Ollama.
- keep_alive is accepted and ignored (the model stays loaded while exolaunch runs).
- /api/version says 0.12.0: clients gate features (tools, format schemas) on a minimum
  version; a plain x.y.z (no "-exolaunch" suffix, which semver sorts *below* x.y.z).
- Auth: with --api-key, every /api route and `/` need the key (the SDK sends
  `Authorization: Bearer $OLLAMA_API_KEY`); only /health is open. An unauthenticated probe of
  `/` therefore gets 401, which is what it should learn.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ..requests import FinishEvent, SamplingParams, TokenEvent
from .errors import APIError, bad_request, internal, not_found, register_error_format
from .generation import Generation, Serving, cancel_on_disconnect, new_id
from .prompt import check_token_ids, encode_text, flatten_content, normalize_messages, render_chat
from .sse import EventStreamResponse, dumps

log = logging.getLogger("exolaunch.api")

router = APIRouter()

VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
SEED_MOD = 1 << 63
MAX_STOP = 16
DEFAULT_TEMPERATURE = 0.8  # Ollama's defaults when the Modelfile sets none
DEFAULT_TOP_P = 0.9
DEFAULT_TOP_K = 40
EXPIRES_AT = "2318-08-15T00:00:00Z"  # "never" (Ollama shows keep_alive -1 the same way)


# ------------------------------------------------------------------------------------------------
# Errors: {"error": "..."} under /api
# ------------------------------------------------------------------------------------------------


def _render(err: APIError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


register_error_format("/api", _render)


def _error_line(err: APIError) -> bytes:
    return (dumps({"error": err.message}) + "\n").encode()


# ------------------------------------------------------------------------------------------------
# Request bodies (unknown fields accepted: Ollama clients send many)
# ------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Gen(_Body):
    model: str | None = None
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool | None = True
    keep_alive: float | int | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tool_choice: str | dict[str, Any] | None = None  # exolaunch extension


class ChatBody(_Gen):
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Gen):
    prompt: str | None = None
    system: str | None = None
    template: str | None = None
    suffix: str | None = None
    raw: bool | None = False
    context: list[int] | None = None
    images: list[Any] | None = None


class ShowBody(_Body):
    model: str | None = None
    name: str | None = None  # the older spelling
    verbose: bool | None = False


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _listed_name(serving: Serving) -> str:
    mid = serving.model_id
    last = mid.rstrip("/").rsplit("/", 1)[-1]
    return mid if ":" in last else f"{mid}:latest"


def _resolve(serving: Serving, name: str | None) -> str:
    """The served model's listed name, or 404 in Ollama's words."""
    candidates = [name]
    if name and name.endswith(":latest"):
        candidates.append(name[: -len(":latest")])
    for c in candidates:
        try:
            serving.resolve_model(c)
            return _listed_name(serving)
        except APIError:
            continue
    raise not_found(f'model "{name}" not found: this server serves "{_listed_name(serving)}"',
                    "model", "model_not_found")


def _tools_module():
    from . import tools  # the shared tool-calling layer

    return tools


def _constrain_module():
    from .. import constrain

    return constrain


def _num(options: dict, key: str, kind: type, lo: float | None = None,
         hi: float | None = None) -> Any:
    v = options.get(key)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind is int:
        if isinstance(v, float) and ok and v.is_integer():
            v = int(v)
        ok = ok and isinstance(v, int)
    if not ok:
        typ = "integer" if kind is int else "number"
        raise bad_request(f'option "{key}" must be of type {typ}', f"options.{key}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise bad_request(f'option "{key}" must be {rng} (got {v})', f"options.{key}")
    return v


def _stops(options: dict) -> list[str]:
    stop = options.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request('option "stop" must be a list of strings', "options.stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f'option "stop": at most {MAX_STOP} stop sequences', "options.stop")
    return [s for s in stops if s]


def _params(serving: Serving, body: _Gen, prompt_len: int, grammar: dict | None) -> SamplingParams:
    o = body.options or {}
    if not isinstance(o, dict):
        raise bad_request("options: must be an object", "options")
    temperature = _num(o, "temperature", float, 0)
    top_p = _num(o, "top_p", float, 0, 1)
    top_k = _num(o, "top_k", int)
    seed = _num(o, "seed", int)
    num_predict = _num(o, "num_predict", int)
    num_ctx = _num(o, "num_ctx", int, 1)
    temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    top_p = DEFAULT_TOP_P if top_p is None else float(top_p)
    if top_p == 0.0:
        temperature, top_p = 0.0, 1.0
    top_k = DEFAULT_TOP_K if top_k is None else max(0, top_k)
    model_ctx = int(serving.engine.context_length)
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
    else:
        raise bad_request('option "num_predict" must be >= 1, or -1 / -2 (up to the context)',
                          "options.num_predict")
    if seed is not None and seed == -1:
        seed = None
    want_lp = bool(body.logprobs)
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=None if seed is None else seed % SEED_MOD, stop=_stops(o),
        logprobs=want_lp, top_logprobs=(body.top_logprobs or 0) if want_lp else 0,
        grammar=grammar,
    )


def _format_grammar(serving: Serving, fmt: Any) -> dict | None:
    if fmt is None or fmt == "":
        return None
    constrain = _constrain_module()
    if fmt == "json":
        grammar = constrain.json_object()
    elif isinstance(fmt, dict):
        grammar = constrain.json_schema(fmt)
    else:
        raise bad_request(f'format: must be "json" or a JSON schema object (got {fmt!r})',
                          "format")
    _validate_grammar(serving, grammar, "format")
    return grammar


def _validate_grammar(serving: Serving, grammar: dict, param: str) -> None:
    constrain = _constrain_module()
    try:
        constrain.validate(grammar, serving.tokenizer)
    except constrain.UnsupportedGrammar as e:
        raise bad_request(f"{param}: {e}", param) from None


def _check_common(serving: Serving, body: _Gen) -> None:
    if body.think not in (None, False, "", "false"):
        raise bad_request(f'"{_listed_name(serving)}" does not support thinking', "think")


def _logprob_entry(serving: Serving, ev: TokenEvent, k: int) -> dict[str, Any]:
    tt = serving.token_text

    def lp(x: float | None) -> float:
        x = float(x) if x is not None else -9999.0
        return x if x == x and abs(x) != float("inf") else -9999.0

    return {"token": tt.text(ev.token), "logprob": lp(ev.logprob),
            "bytes": list(tt.bytes(ev.token)),
            "top_logprobs": [{"token": tt.text(t), "logprob": lp(v), "bytes": list(tt.bytes(t))}
                             for t, v in (ev.top_logprobs or [])[:k]]}


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


def _done_reason(fin: FinishEvent | None) -> str:
    return fin.reason if fin is not None and fin.reason in ("stop", "length") else "stop"


class NDJSONResponse(EventStreamResponse):
    media_type = NDJSON

    def __init__(self, body: AsyncIterator[bytes], on_close=None):
        super().__init__(body, on_close=on_close)  # headers from media_type: NDJSON


async def _guard(gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in gen:
            yield chunk
    except APIError as e:
        yield _error_line(e)
    except Exception:
        log.exception("ollama stream failed")
        yield _error_line(internal())
    finally:
        await gen.aclose()


def _line(obj: dict) -> bytes:
    return (dumps(obj) + "\n").encode()


async def _respond(request: Request, gen: Generation, stream: bool, stream_fn, collect_fn):
    if stream:
        return NDJSONResponse(_guard(stream_fn()), on_close=gen.cancel)

    async def work():
        return JSONResponse(await collect_fn())

    try:
        return await cancel_on_disconnect(request, work())
    finally:
        gen.cancel()


def _load_response(model: str, body: _Gen, key: str, empty: Any) -> JSONResponse | Response:
    reason = "unload" if body.keep_alive in (0, "0", "0s", "0m") else "load"
    obj = {"model": model, "created_at": _now(), key: empty, "done": True, "done_reason": reason}
    if body.stream is False:
        return JSONResponse(obj)
    return Response(_line(obj), media_type=NDJSON)


# ------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------


def _tool_setup(body: ChatBody):
    setup = _tools_module().ToolSetup()
    tools = _tools_module().function_tools(body.tools, close_objects=True)  # SDKs strip the bounds
    names = [t.name for t in tools]

    tc = body.tool_choice
    if tc is None and isinstance(body.options, dict):
        tc = body.options.get("tool_choice")
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
    if choice != "auto" and choice != "none" and not names:
        raise bad_request("tool_choice: requires tools", "tool_choice")
    setup.choice = choice
    setup.tools = tools
    return setup


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
    for i, m in enumerate(body.messages or []):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where}: must be an object", where)
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
            tools = _tools_module()
            parsed = []
            for j, c in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_request(f"{cw}.function.name: required", f"{cw}.function.name")
                cid = c.get("id") if isinstance(c.get("id"), str) and c.get("id") \
                    else f"call_{n_calls}"
                n_calls += 1
                parsed.append(tools.ToolCall(id=cid, name=fn["name"], arguments=_arguments_text(
                    fn.get("arguments"), f"{cw}.function.arguments")))
            out.append(tools.tool_call_message(parsed, content=content or None))
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
            out.append(_tools_module().tool_result_message(cid, content, name=name))
        else:
            out.append({"role": role, "content": content})
    return normalize_messages(out)


def _call_json(call: Any, index: int) -> dict[str, Any]:
    try:
        args = json.loads(call.arguments) if call.arguments else {}
    except (TypeError, ValueError):
        args = {"arguments": call.arguments}
    if not isinstance(args, dict):
        args = {"value": args}
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": args}}


class _Splitter:
    """Text -> (content, tool calls) when tools are active; plain text otherwise."""

    def __init__(self, serving: Serving, setup: Any):
        self.stream = _tools_module().ToolCallStream(serving.tokenizer, setup.tools) \
            if setup.active else None

    def feed(self, text: str) -> list[Any]:
        if self.stream is None:
            return [text] if text else []
        return [p for p in self.stream.feed(text) if p != ""]

    def finish(self) -> list[Any]:
        if self.stream is None:
            return []
        return [p for p in self.stream.finish() if p != ""]


# ------------------------------------------------------------------------------------------------
# /api/chat
# ------------------------------------------------------------------------------------------------


@router.post("/api/chat")
async def chat(request: Request, body: ChatBody):
    clock = _Clock()
    serving = _serving(request)
    model = _resolve(serving, body.model)
    _check_common(serving, body)
    if not body.messages:
        return _load_response(model, body, "message", {"role": "assistant", "content": ""})
    serving.check_serving()
    setup = _tool_setup(body)
    messages = _chat_messages(body)
    grammar = _format_grammar(serving, body.format)
    if setup.forced:  # a forced call wins over format (the output is the call)
        try:
            grammar = _tools_module().forced_grammar(serving.tokenizer, setup.tools, setup.choice)
        except _constrain_module().UnsupportedGrammar as e:
            raise bad_request(f"tool_choice: {e}", "tool_choice") from None
        if grammar is not None:
            _validate_grammar(serving, grammar, "tools")
    kw: dict[str, Any] = {}
    if setup.active:
        kw["tools"] = _tools_module().template_tools(setup.tools)
    tokens = await serving.run_sync(render_chat, serving.tokenizer, messages, **kw)
    params = _params(serving, body, len(tokens), grammar)
    gen = await serving.submit([(tokens, params)], new_id("ollama-chat"), prompt_param="messages")
    clock.submitted = time.perf_counter_ns()
    k = params.top_logprobs
    want_lp = params.logprobs

    def message(content: str, calls: list[dict] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        return msg

    async def stream() -> AsyncIterator[bytes]:
        splitter = _Splitter(serving, setup)
        n_calls = 0
        fin: FinishEvent | None = None

        def emit(pieces: list[Any], lps: list[dict] | None = None) -> list[bytes]:
            nonlocal n_calls
            out = []
            text = "".join(p for p in pieces if isinstance(p, str))
            calls = []
            for p in pieces:
                if not isinstance(p, str):
                    calls.append(_call_json(p, n_calls))
                    n_calls += 1
            if text or calls or lps:
                obj = {"model": model, "created_at": _now(), "message": message(text, calls),
                       "done": False}
                if lps:
                    obj["logprobs"] = lps
                out.append(_line(obj))
            return out

        async for _, ev in gen.events():
            if isinstance(ev, TokenEvent):
                clock.token()
                lps = [_logprob_entry(serving, ev, k)] if want_lp else None
                for chunk in emit(splitter.feed(ev.text), lps):
                    yield chunk
            else:
                fin = ev
                for chunk in emit(splitter.feed(ev.text) + splitter.finish()):
                    yield chunk
        final = {"model": model, "created_at": _now(), "message": message("")}
        final.update(clock.final(fin, len(tokens), _done_reason(fin)))
        yield _line(final)

    async def collect() -> dict[str, Any]:
        splitter = _Splitter(serving, setup)
        pieces: list[Any] = []
        lps: list[dict] = []
        fin: FinishEvent | None = None
        async for _, ev in gen.events():
            if isinstance(ev, TokenEvent):
                clock.token()
                if want_lp:
                    lps.append(_logprob_entry(serving, ev, k))
                pieces += splitter.feed(ev.text)
            else:
                fin = ev
                pieces += splitter.feed(ev.text) + splitter.finish()
        text = "".join(p for p in pieces if isinstance(p, str))
        calls = [_call_json(p, i)
                 for i, p in enumerate(q for q in pieces if not isinstance(q, str))]
        obj: dict[str, Any] = {"model": model, "created_at": _now(),
                               "message": message(text, calls)}
        if want_lp:
            obj["logprobs"] = lps
        obj.update(clock.final(fin, len(tokens), _done_reason(fin)))
        return obj

    return await _respond(request, gen, body.stream is not False, stream, collect)


# ------------------------------------------------------------------------------------------------
# /api/generate
# ------------------------------------------------------------------------------------------------


def _generate_tokens(serving: Serving, body: GenerateBody) -> list[int]:
    tok = serving.tokenizer
    prompt = body.prompt or ""
    if body.raw:
        ids = [int(t) for t in tok.encode(prompt)] if prompt else []
    else:
        messages = []
        if body.system:
            messages.append({"role": "system", "content": body.system})
        messages.append({"role": "user", "content": prompt})
        ids = render_chat(tok, messages, param="prompt")
    if body.context:
        ctx = check_token_ids(tok, list(body.context), param="context")
        if body.raw or not ids:
            ids = ctx + ids
        else:  # the template may start with BOS again: keep one
            bos = getattr(tok, "bos_token_id", None)
            if bos is not None and ids and ids[0] == bos and ctx and ctx[0] == bos:
                ids = ids[1:]
            ids = ctx + ids
    if not ids:
        ids = encode_text(tok, prompt)
    return ids


@router.post("/api/generate")
async def generate(request: Request, body: GenerateBody):
    clock = _Clock()
    serving = _serving(request)
    model = _resolve(serving, body.model)
    _check_common(serving, body)
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
    grammar = _format_grammar(serving, body.format)
    tokens = await serving.run_sync(_generate_tokens, serving, body)
    params = _params(serving, body, len(tokens), grammar)
    gen = await serving.submit([(tokens, params)], new_id("ollama-gen"), prompt_param="prompt")
    clock.submitted = time.perf_counter_ns()
    k = params.top_logprobs
    want_lp = params.logprobs

    def final(fin: FinishEvent | None, generated: list[int]) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": model, "created_at": _now(), "response": ""}
        obj.update(clock.final(fin, len(tokens), _done_reason(fin)))
        obj["context"] = tokens + generated
        return obj

    async def stream() -> AsyncIterator[bytes]:
        generated: list[int] = []
        fin: FinishEvent | None = None
        async for _, ev in gen.events():
            if isinstance(ev, TokenEvent):
                clock.token()
                generated.append(int(ev.token))
                lps = [_logprob_entry(serving, ev, k)] if want_lp else None
                if ev.text or lps:
                    obj: dict[str, Any] = {"model": model, "created_at": _now(),
                                           "response": ev.text, "done": False}
                    if lps:
                        obj["logprobs"] = lps
                    yield _line(obj)
            else:
                fin = ev
                if ev.text:
                    yield _line({"model": model, "created_at": _now(), "response": ev.text,
                                 "done": False})
        yield _line(final(fin, generated))

    async def collect() -> dict[str, Any]:
        generated: list[int] = []
        text = ""
        lps: list[dict] = []
        fin: FinishEvent | None = None
        async for _, ev in gen.events():
            if isinstance(ev, TokenEvent):
                clock.token()
                generated.append(int(ev.token))
                text += ev.text
                if want_lp:
                    lps.append(_logprob_entry(serving, ev, k))
            else:
                fin = ev
                text += ev.text
        obj = final(fin, generated)
        obj["response"] = text
        if want_lp:
            obj["logprobs"] = lps
        return obj

    return await _respond(request, gen, body.stream is not False, stream, collect)


# ------------------------------------------------------------------------------------------------
# Model information: /api/tags, /api/show, /api/ps, /api/version, /
# ------------------------------------------------------------------------------------------------


def _human(n: int) -> str:
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.2f}K"
    return str(n)


def _safetensors_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return {}
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return {}


@functools.lru_cache(maxsize=8)
def _model_facts(path_str: str, mtime: float) -> dict[str, Any]:
    """Size on disk, digest, parameter count and dtype of a model directory (cached per mtime)."""
    path = Path(path_str)
    size = 0
    files: list[tuple[str, int]] = []
    for root, _, names in os.walk(path):
        for name in names:
            p = Path(root) / name
            try:
                st = p.stat()
            except OSError:
                continue
            size += st.st_size
            files.append((str(p.relative_to(path)), st.st_size))
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    params = 0
    dtype = None
    for st in sorted(path.glob("*.safetensors")):
        header = _safetensors_header(st)
        names = set(header)
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            if name.endswith((".scales", ".biases")) and \
                    name.rsplit(".", 1)[0] + ".weight" in names:
                continue
            numel = 1
            for d in info.get("shape", []):
                numel *= int(d)
            if info.get("dtype") == "U32" and bits and \
                    name.rsplit(".", 1)[0] + ".scales" in names:
                numel = numel * 32 // int(bits)
            elif dtype is None and info.get("dtype") in ("F32", "F16", "BF16"):
                dtype = info["dtype"]
            params += numel
    h = hashlib.sha256()
    for rel, n in sorted(files):
        h.update(f"{rel}\0{n}\n".encode())
    h.update((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
    if bits:
        level = f"Q{bits}"
    else:
        level = dtype or str(config.get("torch_dtype") or "unknown").upper().replace(
            "BFLOAT16", "BF16").replace("FLOAT16", "F16").replace("FLOAT32", "F32")
    return {"size": size, "digest": h.hexdigest(), "params": params, "level": level,
            "config": config}


def _facts(serving: Serving) -> dict[str, Any]:
    path = getattr(serving.engine, "model_path", None)
    if path is None or not Path(path).is_dir():
        return {"size": 0, "digest": hashlib.sha256(serving.model_id.encode()).hexdigest(),
                "params": 0, "level": "unknown", "config": {}, "mtime": 0.0}
    try:
        mtime = Path(path).stat().st_mtime
    except OSError:
        mtime = 0.0
    return {**_model_facts(str(path), mtime), "mtime": mtime}


def _details(facts: dict[str, Any]) -> dict[str, Any]:
    family = str(facts["config"].get("model_type") or "unknown")
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": _human(facts["params"]) if facts["params"] else "unknown",
            "quantization_level": facts["level"]}


def _modified(facts: dict[str, Any]) -> str:
    ts = facts.get("mtime") or time.time()
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _model_entry(serving: Serving) -> dict[str, Any]:
    facts = _facts(serving)
    name = _listed_name(serving)
    return {"name": name, "model": name, "modified_at": _modified(facts), "size": facts["size"],
            "digest": facts["digest"], "details": _details(facts)}


def _chat_template(serving: Serving) -> str:
    tok = serving.tokenizer
    tpl = getattr(tok, "chat_template", None)
    if tpl is None:
        tpl = getattr(getattr(tok, "_tokenizer", None), "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default") or next(iter(tpl.values()), "")
    if isinstance(tpl, list):  # [{"name", "template"}]
        tpl = next((t.get("template") for t in tpl if isinstance(t, dict)), "")
    return tpl if isinstance(tpl, str) else ""


@router.get("/api/tags")
async def tags(request: Request):
    serving = _serving(request)
    return {"models": [_model_entry(serving)]}


@router.post("/api/show")
async def show(request: Request, body: ShowBody):
    serving = _serving(request)
    name = body.model or body.name
    if not name:
        raise bad_request("model: required", "model")
    _resolve(serving, name)
    facts = _facts(serving)
    config = facts["config"]
    arch = str(config.get("model_type") or "unknown")
    template = _chat_template(serving)
    ctx = int(serving.engine.context_length)
    tok = serving.tokenizer
    stops = []
    for t in sorted(getattr(tok, "eos_token_ids", None) or []):
        try:
            s = tok.convert_ids_to_tokens(int(t))
        except Exception:
            s = None
        if isinstance(s, str) and s:
            stops.append(s)
    parameters = "\n".join([f"num_ctx {ctx}"] + [f"stop {json.dumps(s)}" for s in stops])
    path = getattr(serving.engine, "model_path", None) or serving.model_id
    modelfile = (f"# Modelfile generated by exolaunch\nFROM {path}\n"
                 f'TEMPLATE """{template}"""\n' + "".join(f"PARAMETER {p}\n"
                                                         for p in parameters.splitlines()))
    info: dict[str, Any] = {"general.architecture": arch,
                            "general.parameter_count": facts["params"],
                            "general.basename": serving.model_id,
                            f"{arch}.context_length": ctx}
    for key, cfg in (("embedding_length", "hidden_size"), ("block_count", "num_hidden_layers"),
                     ("feed_forward_length", "intermediate_size"),
                     ("attention.head_count", "num_attention_heads"),
                     ("attention.head_count_kv", "num_key_value_heads"),
                     ("vocab_size", "vocab_size"), ("rope.freq_base", "rope_theta")):
        if isinstance(config.get(cfg), (int, float)):
            info[f"{arch}.{key}"] = config[cfg]
    capabilities = ["completion"]
    if "tools" in template:
        capabilities.append("tools")
    return {"license": "", "modelfile": modelfile, "parameters": parameters,
            "template": template, "details": _details(facts), "model_info": info,
            "capabilities": capabilities, "modified_at": _modified(facts)}


@router.get("/api/ps")
async def ps(request: Request):
    serving = _serving(request)
    entry = _model_entry(serving)
    del entry["modified_at"]
    entry.update({"expires_at": EXPIRES_AT, "size_vram": entry["size"],
                  "context_length": int(serving.engine.context_length)})
    return {"models": [entry]}


@router.get("/api/version")
async def version():
    return {"version": VERSION}


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root():
    return PlainTextResponse("Ollama is running")
