"""Anthropic Messages dialect end to end: the official `anthropic` SDK (and raw httpx for the
wire details) against a 1-rank in-process engine (demo-llama tiny) served on a free loopback
port. A small fake engine covers the failure paths (mid-stream failure, not ready)."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import pytest

anthropic = pytest.importorskip("anthropic")

from tests.fake_engine import FakeEngine
from runtime.api import start_server  # noqa: E402

MODEL = "demo-llama"
KEY = "sk-ant-test-9d2e"
USER = [{"role": "user", "content": "Tell me about the river and the mountain."}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
}
# This SDK version no longer lists temperature / top_p / top_k among create()'s arguments
# (the wire protocol still has them): they travel in extra_body.
GREEDY = {"temperature": 0}
TIME = {"name": "get_time", "description": "Local time somewhere.",
        "input_schema": {"type": "object", "properties": {"tz": {"type": "string",
                                                                 "enum": ["UTC", "CET"]}},
                         "required": ["tz"], "additionalProperties": False}}


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


def _greedy(client, max_tokens=24, messages=USER, **kw):
    return client.messages.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                  extra_body=GREEDY, **kw)


def _prompt(usage) -> int:
    """The whole prompt: Anthropic counts tokens read from the (prefix) cache apart."""
    return usage.input_tokens + usage.cache_read_input_tokens


def _text(msg) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def _stop_from(text: str) -> str:
    """A piece of `text` from its middle that starts with a non-space character."""
    mid = len(text) // 2
    while mid < len(text) - 3 and text[mid].isspace():
        mid += 1
    stop = text[mid:mid + 3]
    assert len(stop) == 3 and stop.strip(), text
    return stop


def _sse(lines) -> list[tuple[str, dict]]:
    """(event name, data) pairs of a raw SSE stream."""
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[len("data: "):])))
            name = None
    return out


def _count(client, **kw) -> int:
    return client.messages.count_tokens(model=MODEL, **kw).input_tokens


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------


def test_non_streaming_message_and_usage(client, tok):
    r = _greedy(client, max_tokens=7)
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL
    assert r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None
    assert r.usage.output_tokens == 7
    expected = len(tok.apply_chat_template(USER, add_generation_prompt=True))
    assert _prompt(r.usage) == expected == _count(client, messages=USER)


def test_system_string_and_blocks(client, tok):
    system = "You are terse. Answer briefly."
    as_blocks = [{"type": "text", "text": "You are terse. "},
                 {"type": "text", "text": "Answer briefly."}]
    a = _greedy(client, max_tokens=6, system=system)
    b = _greedy(client, max_tokens=6, system=as_blocks)
    internal = [{"role": "system", "content": system}] + USER
    n = len(tok.apply_chat_template(internal, add_generation_prompt=True))
    assert _prompt(a.usage) == _prompt(b.usage) == n
    assert _count(client, messages=USER, system=as_blocks) == n
    assert _text(a) == _text(b)
    # user content as text blocks is the same prompt as the string
    c = _greedy(client, max_tokens=6, system=system, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Tell me about the river "},
                                     {"type": "text", "text": "and the mountain."}]}])
    assert _prompt(c.usage) == n and _text(c) == _text(a)


def test_streaming_matches_non_streaming(client):
    full = _greedy(client, max_tokens=12)
    events = list(client.messages.create(model=MODEL, messages=USER, max_tokens=12,
                                         extra_body=GREEDY, stream=True))
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert types[1] == "content_block_start" and types[-3] == "content_block_stop"
    assert set(types[2:-3]) == {"content_block_delta"}
    start = events[0].message
    assert start.id.startswith("msg_") and start.content == [] and start.stop_reason is None
    assert start.usage.input_tokens == _prompt(full.usage)  # before the prefix cache has said what it reused
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == _text(full)
    delta = events[-2]
    assert delta.delta.stop_reason == "max_tokens" and delta.delta.stop_sequence is None
    assert delta.usage.output_tokens == 12

    # the SDK's accumulating helper rebuilds the same message
    with client.messages.stream(model=MODEL, messages=USER, max_tokens=12,
                                extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert _text(final) == _text(full) and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 12


def test_raw_stream_event_order(server):
    body = {"model": MODEL, "messages": USER, "max_tokens": 5, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as h:
        with h.stream("POST", "/v1/messages", json=body,
                      headers={"anthropic-version": "2023-06-01"}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r.iter_lines())
    names = [n for n, _ in events]
    assert all(n == d["type"] for n, d in events)  # every event is named after its type
    names = [n for n in names if n != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    start = dict(events)["content_block_start"]
    assert start == {"type": "content_block_start", "index": 0,
                     "content_block": {"type": "text", "text": ""}}
    for n, d in events:
        if n == "content_block_delta":
            assert d["index"] == 0 and d["delta"]["type"] == "text_delta"
    md = dict(events)["message_delta"]
    assert md["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert md["usage"]["output_tokens"] == 5


def test_stop_sequences(client):
    full = _text(_greedy(client, max_tokens=24))
    stop = _stop_from(full)
    expected = full[:full.index(stop)]
    r = _greedy(client, max_tokens=24, stop_sequences=["@@never-generated@@", stop])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert _text(r) == expected and stop not in _text(r)
    assert r.usage.output_tokens < 24

    events = list(client.messages.create(model=MODEL, messages=USER, max_tokens=24,
                                         extra_body=GREEDY, stream=True,
                                         stop_sequences=[stop]))
    streamed = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert streamed == expected
    md = [e for e in events if e.type == "message_delta"][0]
    assert md.delta.stop_reason == "stop_sequence" and md.delta.stop_sequence == stop


def test_max_tokens_and_sampling_params(client):
    for n in (1, 5):
        r = client.messages.create(model=MODEL, messages=USER, max_tokens=n,
                                   extra_body={"temperature": 0.7, "top_p": 0.9, "top_k": 20},
                                   metadata={"user_id": "u-1"})
        assert r.stop_reason == "max_tokens" and r.usage.output_tokens == n


def test_prefill_continues_the_assistant_turn(client, tok):
    msgs = USER + [{"role": "assistant", "content": "The river"}]
    base = len(tok.apply_chat_template(USER, add_generation_prompt=True))
    cont = tok.encode("The river", add_special_tokens=False)
    assert _count(client, messages=msgs) == base + len(cont)
    r = _greedy(client, max_tokens=4, messages=msgs)
    assert _prompt(r.usage) == base + len(cont) and r.usage.output_tokens == 4


def test_disconnect_mid_stream_cancels(server, engine, client):
    body = {"model": MODEL, "messages": USER, "max_tokens": 3900, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as h:
        with h.stream("POST", "/v1/messages", json=body) as r:
            deltas = 0
            for line in r.iter_lines():
                deltas += line == "event: content_block_delta"
                if deltas >= 3:
                    break
            assert engine.active_requests() == 1
    deadline = time.monotonic() + 2
    while engine.active_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active_requests() == 0, "the engine still runs the abandoned request"
    assert _greedy(client, max_tokens=2).usage.output_tokens == 2


def test_thinking_blocks_are_dropped(client):
    with_thinking = USER + [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm",
                                           "signature": "sig"},
                                          {"type": "text", "text": "The river is long."}]},
        {"role": "user", "content": "And the mountain?"}]
    plain = USER + [{"role": "assistant", "content": "The river is long."},
                    {"role": "user", "content": "And the mountain?"}]
    assert _count(client, messages=with_thinking) == _count(client, messages=plain)


# ------------------------------------------------------------------------------------------------
# tools
# ------------------------------------------------------------------------------------------------


def _tool_uses(msg):
    return [b for b in msg.content if b.type == "tool_use"]


def test_forced_tool_use_validates(client):
    r = client.messages.create(model=MODEL, messages=USER, max_tokens=200, extra_body=GREEDY,
                               tools=[WEATHER, TIME],
                               tool_choice={"type": "tool", "name": "get_weather"})
    uses = _tool_uses(r)
    assert len(uses) == 1, r.content
    use = uses[0]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    assert r.stop_reason == "tool_use"
    assert r.usage.output_tokens < 200

    # "any": some tool, valid for its own schema
    r = client.messages.create(model=MODEL, messages=USER, max_tokens=200,
                               extra_body={"temperature": 0.8}, tools=[WEATHER, TIME],
                               tool_choice={"type": "any"})
    uses = _tool_uses(r)
    assert uses and r.stop_reason == "tool_use"
    schemas = {"get_weather": WEATHER["input_schema"], "get_time": TIME["input_schema"]}
    for u in uses:
        jsonschema.validate(u.input, schemas[u.name])


def test_streaming_tool_use_reassembles(client, server):
    kw = dict(model=MODEL, messages=USER, max_tokens=200, extra_body=GREEDY, tools=[WEATHER],
              tool_choice={"type": "tool", "name": "get_weather"})
    full = _tool_uses(client.messages.create(**kw))[0]
    events = list(client.messages.create(stream=True, **kw))
    starts = [e for e in events if e.type == "content_block_start"
              and e.content_block.type == "tool_use"]
    assert len(starts) == 1
    idx = starts[0].index
    assert starts[0].content_block.name == "get_weather"
    assert starts[0].content_block.input == {}
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta"
                      and e.index == idx and e.delta.type == "input_json_delta")
    assert json.loads(partial) == full.input
    assert [e for e in events if e.type == "message_delta"][0].delta.stop_reason == "tool_use"
    # the SDK's helper accumulates the input_json_deltas into the same input
    with client.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert _tool_uses(final)[0].input == full.input and final.stop_reason == "tool_use"


def test_tool_result_round_trip(client, tok):
    first = client.messages.create(model=MODEL, messages=USER, max_tokens=200, extra_body=GREEDY,
                                   tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"})
    use = _tool_uses(first)[0]
    turn = USER + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                          for b in first.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id,
             "content": [{"type": "text", "text": "18 degrees and sunny"}]},
            {"type": "text", "text": "Thanks! And tomorrow?"}]},
    ]
    r = client.messages.create(model=MODEL, messages=turn, max_tokens=6, extra_body=GREEDY,
                               tools=[WEATHER])
    assert r.stop_reason in ("max_tokens", "end_turn", "tool_use")
    n = _count(client, messages=turn, tools=[WEATHER])
    assert _prompt(r.usage) == n
    # the prompt carries the call and its result through the chat template
    prompt = tok.decode(tok.apply_chat_template(
        [USER[0],
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": use.id, "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps(use.input)}}]},
         {"role": "tool", "tool_call_id": use.id, "content": "18 degrees and sunny"},
         {"role": "user", "content": "Thanks! And tomorrow?"}],
        tools=[{"type": "function", "function": {"name": WEATHER["name"],
                                                 "description": WEATHER["description"],
                                                 "parameters": WEATHER["input_schema"]}}],
        add_generation_prompt=True))
    assert "18 degrees and sunny" in prompt and "get_weather" in prompt
    assert n > _count(client, messages=USER, tools=[WEATHER])
    # is_error results and tool_choice none are accepted too
    turn[-1]["content"][0]["is_error"] = True
    r = client.messages.create(model=MODEL, messages=turn, max_tokens=3, tools=[WEATHER],
                               tool_choice={"type": "none"})
    assert r.usage.output_tokens == 3 and not _tool_uses(r)


def test_structured_output_format(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "score": {"type": "integer", "minimum": 0,
                                                         "maximum": 9}},
              "required": ["answer", "score"], "additionalProperties": False}
    r = client.messages.create(model=MODEL, messages=USER, max_tokens=100, extra_body=GREEDY,
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    assert r.stop_reason == "end_turn", r
    jsonschema.validate(json.loads(_text(r)), schema)


# ------------------------------------------------------------------------------------------------
# errors and auth
# ------------------------------------------------------------------------------------------------


def _assert_error(r: httpx.Response, status: int, typ: str):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == typ and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]["message"]


def test_errors_have_anthropic_shape(client, server):
    with httpx.Client(base_url=server.url, timeout=30) as h:
        msg = _assert_error(h.post("/v1/messages", json={"model": MODEL, "messages": USER}),
                            400, "invalid_request_error")
        assert "max_tokens" in msg
        msg = _assert_error(h.post("/v1/messages", json={"model": "claude-9", "messages": USER,
                                                         "max_tokens": 4}),
                            404, "not_found_error")
        assert "claude-9" in msg
        for bad in ({"temperature": 1.5}, {"temperature": -1}, {"top_p": 2}, {"max_tokens": 0},
                    {"messages": []}, {"messages": [{"role": "system", "content": "x"}]},
                    {"messages": [{"role": "user", "content": [
                        {"type": "image", "source": {"type": "base64", "data": "x"}}]}]},
                    {"tools": [{"name": "web_search", "type": "web_search_20250305"}]},
                    {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
                    {"tool_choice": {"type": "any"}},
                    {"stop_sequences": "x"}):
            body = {"model": MODEL, "messages": USER, "max_tokens": 4, **bad}
            _assert_error(h.post("/v1/messages", json=body), 400, "invalid_request_error")
        r = h.post("/v1/messages", content=b"{not json",
                   headers={"content-type": "application/json"})
        assert "JSON" in _assert_error(r, 400, "invalid_request_error")
        _assert_error(h.post("/v1/messages/nowhere", json={}), 404, "not_found_error")
        _assert_error(h.post("/v1/messages/count_tokens", json={"model": MODEL}), 400,
                      "invalid_request_error")
        # prompt too long for the context: 400, as Anthropic says "prompt is too long"
        r = h.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "user", "content": "river mountain " * 4096}]})
        _assert_error(r, 400, "invalid_request_error")
        # unknown fields and the anthropic headers are fine
        r = h.post("/v1/messages", json={"model": MODEL, "messages": USER, "max_tokens": 1,
                                         "some_future_field": {"a": 1},
                                         "thinking": {"type": "disabled"}},
                   headers={"anthropic-version": "2023-06-01", "anthropic-beta": "x"})
        assert r.status_code == 200, r.text

    # the SDK maps them to its exception types
    with pytest.raises(anthropic.NotFoundError) as ei:
        client.messages.create(model="claude-9", messages=USER, max_tokens=2)
    assert ei.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as ei:
        client.messages.create(model=MODEL, messages=USER, max_tokens=2,
                               extra_body={"temperature": 3})
    assert ei.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in ei.value.body["error"]["message"]


def test_auth(engine):
    srv = start_server(engine, "127.0.0.1", 0, api_key=KEY)
    try:
        good = anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0)
        bad = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0)
        r = good.messages.create(model=MODEL, messages=USER, max_tokens=2)
        assert r.usage.output_tokens == 2
        assert good.messages.count_tokens(model=MODEL, messages=USER).input_tokens > 0
        with pytest.raises(anthropic.AuthenticationError) as ei:
            bad.messages.create(model=MODEL, messages=USER, max_tokens=2)
        assert ei.value.body["error"]["type"] == "authentication_error"
        with httpx.Client(base_url=srv.url) as h:
            r = h.post("/v1/messages", json={"model": MODEL, "messages": USER,
                                             "max_tokens": 2})
            assert "x-api-key" in _assert_error(r, 401, "authentication_error")
            r = h.post("/v1/messages", json={"model": MODEL, "messages": USER, "max_tokens": 2},
                       headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
            assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 2
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------
# failure paths, with a fake engine that keeps the Engine contract
# ------------------------------------------------------------------------------------------------


def test_engine_failure_mid_stream_and_not_ready():
    eng = FakeEngine()
    srv = start_server(eng, "127.0.0.1", 0)
    try:
        c = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=10)
        got = ""
        with pytest.raises(anthropic.APIError) as ei:
            for e in c.messages.create(model="fake", messages=USER, max_tokens=5, stream=True):
                if e.type == "content_block_delta":
                    got += e.delta.text
        assert got == "t0 t1 " and "rank 1 stopped" in str(ei.value)

        eng.failed = None
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            with h.stream("POST", "/v1/messages", json={"model": "fake", "messages": USER,
                                                        "max_tokens": 5, "stream": True}) as r:
                events = _sse(r.iter_lines())
            name, data = events[-1]
            assert name == "error" and data["type"] == "error"
            assert data["error"]["type"] == "api_error"
            assert "rank 1 stopped" in data["error"]["message"]
            assert "message_stop" not in [n for n, _ in events]
            # failed now: 503 at once, api_error
            r = h.post("/v1/messages", json={"model": "fake", "messages": USER, "max_tokens": 5})
            _assert_error(r, 503, "api_error")
            eng.failed, eng.ready = None, False  # still loading: overloaded, retryable
            r = h.post("/v1/messages", json={"model": "fake", "messages": USER, "max_tokens": 5})
            _assert_error(r, 503, "overloaded_error")
    finally:
        srv.stop()
