"""OpenAI dialect: /v1/chat/completions, /v1/completions, /v1/models.

Wire request -> token ids (chat template / tokenizer) + SamplingParams -> `Serving.submit`
(one engine request per choice) -> events -> OpenAI JSON or SSE chunks.

Parameters: model, messages / prompt, max_tokens, max_completion_tokens (chat; wins over
max_tokens), temperature (0..2, default 1; 0 = greedy, else at least 1e-6), top_p (0..1; 0 =
greedy), top_k (extension; >= the vocabulary means off), ignore_eos (extension), seed (an
int64 or uint64; choice i gets seed+i), stop (a string or a list of up to 16, each at most 256
characters), n (1..16), stream, stream_options.include_usage, logprobs + top_logprobs (chat:
bool + 0..20), logprobs (completions: int 0..20), echo (completions, without logprobs).
Completions: at most 128 sequences (prompts x n) per request. Without max_tokens a request
may use the rest of the context; a max_tokens larger than the context leaves is clamped to it
(finish_reason "length"; `--strict-max-tokens`: a 400). presence_penalty / frequency_penalty
(-2..2, over the generated tokens), logit_bias (up to 1024 token ids of the vocabulary: -100..100),
and the extensions min_p (0..1) and repetition_penalty (0.01..100, over prompt and output; vLLM's) are
applied on every rank (runtime/sampling.py); unknown fields are accepted and ignored (user, ...).
The limits are runtime/api/limits.py.

Tools (chat): `tools` (function tools), `tool_choice` ("auto" default with tools, "none",
"required", {"type": "function", "function": {"name": ...}}). Tools go to the chat template;
generated calls are parsed with the model's tool parser (runtime/api/tools.py) into
`message.tool_calls` (streaming: `delta.tool_calls` with index, id, type, function.name, then
function.arguments), finish_reason "tool_calls". "required" / a named tool force exactly one
call by constrained decoding; "none" does not parse calls (text is shown as generated).
Assistant messages with `tool_calls` and `role: "tool"` results are accepted back.
`parallel_tool_calls` is accepted; a forced choice produces exactly one call.

Structured output (chat): `response_format` {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}} is enforced by constrained decoding (always, strict
or not); {"type": "text"} is none. A schema that cannot be enforced is a 400 saying why. With
finish_reason "length" the output is a truncated prefix of valid JSON. With a forced tool
choice the call wins over response_format (the output is the call; the OpenAI Agents SDK sends
both). Completions ignore response_format.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from pydantic import Field

from .. import constrain
from ..requests import FinishEvent, SamplingParams, TokenEvent
from . import limits
from .body import JSONRoute
from .core import (
    Seed, StopList, StopString, StrictBody, finite, output_budget, reply, request_grammar,
    sampling, seed_for, split_events, stop_or_length, stop_strings, token_logprob,
)
from .errors import bad_request
from .generation import Collected, Generation, Serving, new_id
from .prompt import check_token_ids, encode_text, normalize_messages, render_chat
from .sse import DONE, sse_data
from .tools import (
    Splitter, Tool, ToolCall, ToolSetup, checked_choice, function_tools, parse_tool_calls,
    template_tools,
)

router = APIRouter(route_class=JSONRoute)


# ------------------------------------------------------------------------------------------------
# Request bodies: unknown fields allowed, known ones strictly typed and range-checked.
# ------------------------------------------------------------------------------------------------


class StreamOptions(StrictBody):
    include_usage: bool | None = False


class ChatMessage(StrictBody):
    role: str
    content: str | list[dict[str, Any] | str] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Common(StrictBody):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1, le=limits.MAX_CHOICES)
    seed: Seed | None = None
    stop: StopString | StopList | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-limits.PENALTY_MAX, le=limits.PENALTY_MAX)
    frequency_penalty: float | None = Field(None, ge=-limits.PENALTY_MAX, le=limits.PENALTY_MAX)
    logit_bias: dict[str, float] | None = None  # checked in limits.checked (ids need the vocabulary)
    min_p: float | None = Field(None, ge=0, le=1)  # extension (vLLM's)
    repetition_penalty: float | None = Field(None, ge=limits.MIN_REPETITION_PENALTY,
                                             le=limits.MAX_REPETITION_PENALTY)  # extension (vLLM's)
    user: str | None = None
    ignore_eos: bool | None = False  # extension (vLLM's): always generate max_tokens


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=limits.MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=limits.MAX_CHOICES)


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def _params(request: Request, serving: Serving, body: _Common, max_tokens: int | None,
            prompt_len: int, logprobs: bool, top_logprobs: int, grammar: dict | None = None,
            param: str = "max_tokens") -> list[SamplingParams]:
    temperature, top_p = sampling(body.temperature, body.top_p)
    max_tokens = output_budget(request, serving, max_tokens, prompt_len, param)
    stops = stop_strings(body.stop, "stop")
    return [SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=body.top_k or 0,
        seed=seed_for(body.seed, i), stop=list(stops), logprobs=logprobs,
        top_logprobs=top_logprobs if logprobs else 0, ignore_eos=bool(body.ignore_eos),
        grammar=grammar, min_p=body.min_p or 0.0, logit_bias=body.logit_bias,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
    ) for i in range(body.n or 1)]


class _Usage:
    """Prompt tokens count once per prompt (not per choice); completion tokens per choice."""

    def __init__(self, prompt_lens: list[int], n: int):
        self.prompt = list(prompt_lens)
        self.cached = [0] * len(prompt_lens)  # of each prompt, tokens the prefix cache served
        self.n = n
        self.completion = 0
        self.drafted = self.accepted = 0  # speculative decoding's draft tokens

    def add(self, index: int, fin: FinishEvent) -> None:
        self.completion += fin.completion_tokens
        self.drafted += fin.draft_tokens
        self.accepted += fin.accepted_draft_tokens
        if index % self.n == 0 and fin.prompt_tokens:
            self.prompt[index // self.n] = fin.prompt_tokens
            self.cached[index // self.n] = fin.cached_tokens

    def body(self) -> dict[str, Any]:
        prompt = sum(self.prompt)
        out = {"prompt_tokens": prompt, "completion_tokens": self.completion,
               "total_tokens": prompt + self.completion,
               "prompt_tokens_details": {"cached_tokens": sum(self.cached)}}
        if self.drafted:  # OpenAI's fields for predicted tokens the model did or did not accept
            out["completion_tokens_details"] = {"accepted_prediction_tokens": self.accepted,
                                                "rejected_prediction_tokens": self.drafted - self.accepted}
        return out


def _chunker(rid: str, obj: str, created: int, model: str, body: _Common):
    """SSE chunks of one response; with include_usage every chunk has a "usage" key."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                               "system_fingerprint": None, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return sse_data(out)

    return chunk, include_usage


async def _respond(request: Request, gen: Generation, body: _Common, stream_fn, collect_fn):
    """A stream fails with an error chunk and no [DONE]."""

    async def collect():
        return collect_fn(await gen.collect())

    return await reply(request, gen, bool(body.stream), stream_fn, collect,
                       lambda e: [sse_data(e.body())])


# ------------------------------------------------------------------------------------------------
# Chat completions
# ------------------------------------------------------------------------------------------------


def _tool_choice(raw: Any, tools: list[Tool]) -> Any:
    """"auto" | "none" | "required" | {"name": ...}."""
    if raw is None:
        return "auto" if tools else "none"
    if isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise bad_request(f"tool_choice: expected \"auto\", \"none\", \"required\" or a "
                              f"function, got {raw!r}", "tool_choice")
        return raw
    fn = raw.get("function") if isinstance(raw, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise bad_request("tool_choice: expected {\"type\": \"function\", \"function\": {\"name\": ...}}",
                          "tool_choice")
    return {"name": name}


def _response_format(raw: dict[str, Any] | None) -> dict | None:
    if raw is None:
        return None
    kind = raw.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return constrain.json_object()
    if kind == "json_schema":
        js = raw.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("response_format.json_schema: required (an object with name and schema)",
                              "response_format.json_schema")
        if "schema" not in js or js["schema"] is None:
            return constrain.json_object()
        schema = js["schema"]
        if not isinstance(schema, (dict, bool)):
            raise bad_request(f"response_format.json_schema.schema: must be a JSON schema object, got "
                              f"{type(schema).__name__}", "response_format.json_schema.schema")
        return constrain.json_schema(schema)
    raise bad_request(f"response_format.type: expected \"text\", \"json_object\" or \"json_schema\", "
                      f"got {kind!r}", "response_format.type")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest):
    serving, model = Serving.admit(request, body.model)
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs: requires logprobs to be true", "top_logprobs")
    messages = normalize_messages([m.model_dump() for m in body.messages])
    tools = function_tools(body.tools)
    setup = ToolSetup(tools, checked_choice(tools, _tool_choice(body.tool_choice, tools)))
    fmt = _response_format(body.response_format)
    tok = serving.tokenizer
    grammar = await serving.run_sync(request_grammar, tok, setup, fmt, "response_format")
    tokens = await serving.run_sync(render_chat, tok, messages,
                                    tools=template_tools(tools) if tools else None,
                                    context_length=serving.context_length,
                                    calls_allowed=setup.active)
    want_lp = bool(body.logprobs)
    k = body.top_logprobs or 0
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    params = _params(request, serving, body, max_tokens, len(tokens), want_lp, k, grammar=grammar,
                     param="max_completion_tokens" if body.max_completion_tokens is not None
                     else "max_tokens")
    rid = new_id("chatcmpl")
    gen = await serving.submit([(tokens, p) for p in params], rid, prompt_param="messages",
                               names={"max_tokens": "max_completion_tokens"
                                      if body.max_completion_tokens is not None
                                      else "max_tokens"})
    created = int(time.time())
    n = len(params)
    chunk, include_usage = _chunker(rid, "chat.completion.chunk", created, model, body)

    def piece(i: int, delta: dict, lp: dict | None = None, finish: str | None = None) -> dict:
        return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def finish_reason(ev: FinishEvent | None, calls: int) -> str:
        r = stop_or_length(ev)
        return "tool_calls" if calls and r == "stop" else r

    async def stream() -> AsyncIterator[bytes]:
        usage = _Usage([len(tokens)], n)
        ncalls = [0] * n

        def render(i: int, items: list, lp: dict | None) -> list[bytes]:
            out = []
            for it in items:
                if isinstance(it, ToolCall):
                    idx = ncalls[i]
                    ncalls[i] += 1
                    out.append(chunk([piece(i, {"tool_calls": [{
                        "index": idx, "id": it.id, "type": "function",
                        "function": {"name": it.name, "arguments": ""}}]})]))
                    out.append(chunk([piece(i, {"tool_calls": [{
                        "index": idx, "function": {"arguments": it.arguments}}]})]))
                elif it or lp:
                    out.append(chunk([piece(i, {"content": it}, lp)]))
                    lp = None
            if lp:  # logprobs of a token whose text is held back or inside a call
                out.append(chunk([piece(i, {"content": ""}, lp)]))
            return out

        for i in range(n):
            yield chunk([piece(i, {"role": "assistant", "content": ""})])
        async for i, ev, items in split_events(gen, [Splitter(tok, setup) for _ in range(n)]):
            if isinstance(ev, TokenEvent):
                lp = {"content": [token_logprob(serving.token_text, ev, k)]} if want_lp else None
                for c in render(i, items, lp):  # content, or tool-call deltas
                    yield c
            else:
                usage.add(i, ev)
                for c in render(i, items, None):
                    yield c
                yield chunk([piece(i, {}, None, finish_reason(ev, ncalls[i]))])
        if include_usage:
            yield chunk([], usage.body())
        yield DONE

    def collect(results: list[Collected]) -> dict:
        usage = _Usage([len(tokens)], n)
        choices = []
        for i, c in enumerate(results):
            if c.finish is not None:
                usage.add(i, c.finish)
            message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
            calls: list[ToolCall] = []
            if setup.active:
                text, calls = parse_tool_calls(tok, tools, c.text)
                if calls:
                    message["content"] = text if text.strip() else None
                    message["tool_calls"] = [x.openai() for x in calls]
                else:
                    message["content"] = text
            choices.append({
                "index": i,
                "message": message,
                "logprobs": {"content": [token_logprob(serving.token_text, t, k) for t in c.tokens],
                             "refusal": None} if want_lp else None,
                "finish_reason": finish_reason(c.finish, len(calls)),
            })
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": None, "choices": choices, "usage": usage.body()}

    return await _respond(request, gen, body, stream, collect)


# ------------------------------------------------------------------------------------------------
# Completions (legacy)
# ------------------------------------------------------------------------------------------------


def _prompt_count(prompt: Any) -> int:
    """How many prompts: a string or a list of token ids is one."""
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


def _prompts(serving: Serving, prompt: Any) -> list[tuple[list[int], str | None]]:
    """Each prompt as token ids, with its text when given as text (for echo)."""
    tok, ctx, vocab = serving.tokenizer, serving.context_length, serving.vocab_size
    if isinstance(prompt, str):
        return [(encode_text(tok, prompt, context_length=ctx), prompt)]
    if not prompt:
        raise bad_request("prompt: must not be empty", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [(encode_text(tok, p, param=f"prompt[{i}]", context_length=ctx), p)
                for i, p in enumerate(prompt)]
    if all(isinstance(p, int) for p in prompt):
        return [(check_token_ids(list(prompt), vocab), None)]
    return [(check_token_ids(list(p), vocab, param=f"prompt[{i}]"), None)
            for i, p in enumerate(prompt)]


class _CompletionLogprobs:
    """Legacy logprobs object {tokens, token_logprobs, top_logprobs, text_offset}."""

    def __init__(self, serving: Serving, k: int):
        self.tt = serving.token_text
        self.k = k

    def entry(self, evs: list[TokenEvent], offsets: list[int]) -> dict[str, Any]:
        return {
            "tokens": [self.tt.text(e.token) for e in evs],
            "token_logprobs": [finite(e.logprob) for e in evs],
            "top_logprobs": [{self.tt.text(t): finite(lp) for t, lp in (e.top_logprobs or [])[:self.k]}
                             for e in evs],
            "text_offset": offsets,
        }


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest):
    serving, model = Serving.admit(request, body.model)
    if body.suffix:
        raise bad_request("suffix: not supported", "suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise bad_request("best_of: only best_of == n is supported", "best_of")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs is not supported (no prompt logprobs)", "echo")
    n = body.n or 1
    limits.check_sequences(_prompt_count(body.prompt), n)  # before tokenizing any of them
    prompts = await serving.run_sync(_prompts, serving, body.prompt)
    want_lp = body.logprobs is not None
    k = body.logprobs or 0
    jobs = []
    for tokens, _ in prompts:
        for p in _params(request, serving, body, body.max_tokens, len(tokens), want_lp, k):
            jobs.append((tokens, p))
    if body.echo:
        echoes = [text if text is not None else
                  await serving.run_sync(serving.tokenizer.decode, tokens)
                  for tokens, text in prompts]
    else:
        echoes = ["" for _ in prompts]
    rid = new_id("cmpl")
    gen = await serving.submit(jobs, rid, prompt_param="prompt",
                               names={"top_logprobs": "logprobs"})
    created = int(time.time())
    chunk, include_usage = _chunker(rid, "text_completion", created, model, body)
    lps = _CompletionLogprobs(serving, k)
    prompt_lens = [len(t) for t, _ in prompts]

    def piece(i: int, text: str, lp: dict | None = None, finish: str | None = None) -> dict:
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

    async def stream() -> AsyncIterator[bytes]:
        usage = _Usage(prompt_lens, n)
        offsets = [len(echoes[i // n]) for i in range(len(jobs))]
        if body.echo:
            for i in range(len(jobs)):
                if echoes[i // n]:
                    yield chunk([piece(i, echoes[i // n])])
        async for i, ev in gen.events():
            if isinstance(ev, TokenEvent):
                lp = lps.entry([ev], [offsets[i]]) if want_lp else None
                offsets[i] += len(ev.text)
                if ev.text or lp:
                    yield chunk([piece(i, ev.text, lp)])
            else:
                usage.add(i, ev)
                if ev.text:
                    yield chunk([piece(i, ev.text)])
                yield chunk([piece(i, "", None, stop_or_length(ev))])
        if include_usage:
            yield chunk([], usage.body())
        yield DONE

    def collect(results: list[Collected]) -> dict:
        usage = _Usage(prompt_lens, n)
        choices = []
        for i, c in enumerate(results):
            if c.finish is not None:
                usage.add(i, c.finish)
            lp = None
            if want_lp:
                offsets, off = [], len(echoes[i // n])
                for t in c.tokens:
                    offsets.append(off)
                    off += len(t.text)
                lp = lps.entry(c.tokens, offsets)
            choices.append({"index": i, "text": echoes[i // n] + c.text, "logprobs": lp,
                            "finish_reason": stop_or_length(c.finish)})
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": None, "choices": choices, "usage": usage.body()}

    return await _respond(request, gen, body, stream, collect)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def _model_card(serving: Serving) -> dict[str, Any]:
    return {"id": serving.model_id, "object": "model", "created": serving.created,
            "owned_by": "exolaunch"}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(Serving.of(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    serving = Serving.of(request)
    serving.resolve_model(model_id, param="model")
    return _model_card(serving)
