"""OpenAI tool calling through the official `openai` SDK against a 1-rank in-process engine
(demo-llama tiny: random weights, ChatML template with Hermes/Qwen-style <tool_call> markup and
mlx-lm's json_tools parser). tool_choice "required" / named force a call by constrained decoding,
so even this random model emits a valid, parseable one; "auto" parses whatever it emits."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from runtime.api.prompt import render_chat
from runtime.api.tools import (
    Tool, ToolCall, ToolCallStream, forced_grammar, template_tools, tool_call_message,
    tool_result_message,
)

MODEL = "demo-llama"
USER = [{"role": "user", "content": "What is the weather in Paris, and what time is it?"}]

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object",
        "properties": {"tz": {"type": "string", "enum": ["UTC", "CET", "PST"]},
                       "hour24": {"type": "boolean"}},
        "required": ["tz", "hour24"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                      "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _check_call(call, names=("get_weather", "get_time")):
    assert call.type == "function" and call.id
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS[call.function.name])
    return args


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_gives_valid_call(client, temperature):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                       max_tokens=200, temperature=temperature, seed=5)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c.message
    assert c.message.content is None
    assert len(c.message.tool_calls) == 1
    _check_call(c.message.tool_calls[0])


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_choice(client, name):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=200,
                                       tool_choice={"type": "function", "function": {"name": name}},
                                       temperature=1.0, seed=11)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    (call,) = c.message.tool_calls
    assert call.function.name == name
    _check_call(call, (name,))


def test_streaming_deltas_reassemble(client):
    kw = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=200,
              temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    slot["id"] = d.id
                if d.function and d.function.name:
                    slot["name"] += d.function.name
                if d.function and d.function.arguments:
                    slot["arguments"] += d.function.arguments
            if c.finish_reason:
                finish = c.finish_reason
    assert finish == "tool_calls"
    assert content == ""  # the markup is never shown
    assert list(calls) == [0]
    got = calls[0]
    assert got["id"] and got["name"] == whole.function.name
    assert json.loads(got["arguments"]) == json.loads(whole.function.arguments)


def test_round_trip(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=200, temperature=0)
    msg = r.choices[0].message
    call = msg.tool_calls[0]
    history = USER + [
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                        max_tokens=8, temperature=0)
    c2 = r2.choices[0]
    assert c2.finish_reason in ("stop", "length") and not c2.message.tool_calls
    # the call and its result are in the prompt the template rendered
    ids = render_chat(engine.tokenizer, history, tools=TOOLS)
    text = engine.tokenizer.decode(ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {' in text
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in text
    assert r2.usage.prompt_tokens == len(ids)


def test_none_gives_no_tool_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none",
                                       max_tokens=24, temperature=0)
    c = r.choices[0]
    assert not c.message.tool_calls and c.finish_reason in ("stop", "length")
    assert isinstance(c.message.content, str)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_random_model_parses(client, stream):
    for seed in range(4):
        kw = dict(model=MODEL, messages=USER, tools=TOOLS, max_tokens=48, temperature=1.0, seed=seed)
        if not stream:
            c = client.chat.completions.create(**kw).choices[0]
            assert c.finish_reason in ("stop", "length", "tool_calls")
            if c.message.tool_calls:
                assert c.finish_reason in ("tool_calls", "length")
            else:
                assert isinstance(c.message.content, str)
        else:
            finish = None
            for ch in client.chat.completions.create(stream=True, **kw):
                for c in ch.choices:
                    if c.finish_reason:
                        finish = c.finish_reason
            assert finish in ("stop", "length", "tool_calls")


def test_bad_tool_requests_are_400(client):
    cases = [
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        dict(tools=TOOLS, tool_choice="sometimes"),
        dict(tools=[{"type": "retrieval"}]),
        dict(tools=[{"type": "function", "function": {"description": "no name"}}]),
        dict(tool_choice="required"),
        dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}],
             tool_choice="required"),
    ]
    for kw in cases:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, **kw)


# ------------------------------------------------------------------------------------------------
# runtime/api/tools.py directly
# ------------------------------------------------------------------------------------------------


def test_stream_parser_markers(engine):
    tools = [Tool("get_time", parameters=TIME)]
    s = ToolCallStream(engine.tokenizer, tools)
    text = 'Sure.<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC", "hour24": true}}\n</tool_call> bye'
    out = []
    for ch in text:  # one character at a time: markers split across feeds
        out += s.feed(ch)
    out += s.finish()
    shown = "".join(x for x in out if isinstance(x, str))
    calls = [x for x in out if isinstance(x, ToolCall)]
    assert shown == "Sure. bye"
    assert [c.name for c in calls] == ["get_time"]
    assert json.loads(calls[0].arguments) == {"tz": "UTC", "hour24": True}
    # a malformed call is shown as text, not dropped
    s = ToolCallStream(engine.tokenizer, tools)
    bad = "<tool_call>\nnot json\n</tool_call>"
    assert "".join(x for x in s.feed(bad) + s.finish() if isinstance(x, str)) == bad
    # "<" that does not begin a marker is released at the end
    s = ToolCallStream(engine.tokenizer, tools)
    assert "".join(s.feed("a <tool") + s.finish()) == "a <tool"


class _NoTools:
    has_tool_calling = False


def test_stream_parser_json_fallback():
    tools = [Tool("get_time", parameters=TIME)]
    s = ToolCallStream(_NoTools(), tools)
    out = s.feed(' {"name": "get_time", "argu') + s.feed('ments": {"tz": "CET", "hour24": false}}') + s.finish()
    assert len(out) == 1 and isinstance(out[0], ToolCall) and out[0].name == "get_time"
    s = ToolCallStream(_NoTools(), tools)
    assert "".join(s.feed("plain {text}") + s.finish()) == "plain {text}"
    s = ToolCallStream(_NoTools(), tools)
    assert "".join(s.feed('{"a": 1}') + s.finish()) == '{"a": 1}'
    g = forced_grammar(_NoTools(), tools, "required")
    assert g["type"] == "json_schema"
    assert forced_grammar(_NoTools(), tools, "auto") is None


def test_messages_helpers(engine):
    call = ToolCall("call_1", "get_time", '{"tz": "UTC", "hour24": true}')
    m = tool_call_message([call])
    assert m["role"] == "assistant" and m["tool_calls"][0]["function"]["name"] == "get_time"
    r = tool_result_message("call_1", "12:00", name="get_time")
    assert r == {"role": "tool", "tool_call_id": "call_1", "content": "12:00", "name": "get_time"}
    tools = [Tool("get_time", "Current time.", TIME)]
    ids = render_chat(engine.tokenizer, [USER[0], m, r], tools=template_tools(tools))
    text = engine.tokenizer.decode(ids)
    assert '"name": "get_time"' in text and "<tool_response>\n12:00\n</tool_response>" in text
    assert template_tools(tools)[0] == {"type": "function", "function": {
        "name": "get_time", "description": "Current time.", "parameters": TIME}}
