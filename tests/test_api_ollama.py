"""Ollama dialect end to end: the official `ollama` Python SDK (and raw NDJSON over httpx)
against a 1-rank in-process engine (demo-llama tiny) on a free loopback port. A fake engine
covers a failure mid-stream."""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import pytest

from tests.fake_engine import FakeEngine
from runtime.api import start_server

MODEL = "demo-llama"
KEY = "sk-test-ollama-51c0"
USER = [{"role": "user", "content": "Tell me about the river and the mountain."}]
GREEDY = {"temperature": 0}
FINAL_INTS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
              "eval_count", "eval_duration")
# The SDK keeps only type / items / description / enum of each property (no maxLength, no
# additionalProperties): enums keep a random model's arguments short.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "enum": ["Oslo", "Paris", "Rome"]},
                                  "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        yield h


def _final_ok(r, n_predict: int | None = None) -> None:
    assert r.done is True and r.done_reason in ("stop", "length")
    for k in FINAL_INTS:
        v = getattr(r, k)
        assert isinstance(v, int) and v >= (0 if k == "eval_count" else 1), (k, v)
    assert r.total_duration >= r.prompt_eval_duration
    if n_predict is not None:
        assert r.done_reason == "length" and r.eval_count == n_predict


def _ndjson(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def _stop_from(text: str) -> str:
    mid = len(text) // 2
    while mid < len(text) - 3 and text[mid].isspace():
        mid += 1
    stop = text[mid:mid + 3]
    assert len(stop) == 3 and stop.strip(), text
    return stop


# ------------------------------------------------------------------------------------------------
# model information
# ------------------------------------------------------------------------------------------------


def test_root_version_tags_show_ps(server, client, http, engine):
    r = http.get("/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert http.head("/").status_code == 200
    v = http.get("/api/version").json()["version"]
    assert [int(x) for x in v.split(".")] >= [0, 5, 0]

    models = client.list().models
    assert len(models) == 1
    m = models[0]
    assert m.model == f"{MODEL}:latest" and m.modified_at is not None
    on_disk = sum(p.stat().st_size for p in engine.model_path.rglob("*") if p.is_file())
    assert m.size == on_disk and len(m.digest) == 64
    assert m.details.format == "safetensors" and m.details.family == "llama"
    assert m.details.parameter_size.endswith(("K", "M", "B"))
    assert m.details.quantization_level == "F32"

    for name in (MODEL, f"{MODEL}:latest"):
        s = client.show(name)
        assert "<|im_start|>" in s.template and s.template in s.modelfile
        assert "num_ctx" in s.parameters
        assert s.details.family == "llama"
        assert s.modelinfo["general.architecture"] == "llama"
        assert s.modelinfo["general.parameter_count"] > 0
        assert s.modelinfo["llama.context_length"] == engine.context_length
        assert "completion" in s.capabilities and "tools" in s.capabilities

    p = client.ps().models
    assert len(p) == 1 and p[0].model == f"{MODEL}:latest" and p[0].size == on_disk
    assert p[0].expires_at.year > 2100
    assert p[0].context_length == engine.context_length


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------


def test_chat_non_streaming_and_streaming(client):
    r = client.chat(model=MODEL, messages=USER, options={**GREEDY, "num_predict": 12})
    assert r.message.role == "assistant" and r.message.content
    _final_ok(r, 12)
    assert r.prompt_eval_count > 5

    chunks = list(client.chat(model=MODEL, messages=USER, stream=True,
                              options={**GREEDY, "num_predict": 12}))
    assert all(not c.done for c in chunks[:-1]) and len(chunks) > 2
    assert "".join(c.message.content or "" for c in chunks) == r.message.content
    _final_ok(chunks[-1], 12)
    assert chunks[-1].prompt_eval_count == r.prompt_eval_count


def test_stream_is_the_default_and_ndjson(http):
    lines = _ndjson(http, "/api/chat", {"model": MODEL, "messages": USER,
                                        "options": {"num_predict": 5, "seed": 1}})
    assert len(lines) >= 2 and lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
    for obj in lines[:-1]:
        assert obj["done"] is False and obj["model"] == f"{MODEL}:latest"
        assert obj["message"]["role"] == "assistant" and obj["created_at"].endswith("Z")
    assert lines[-1]["eval_count"] == 5
    lines = _ndjson(http, "/api/generate", {"model": MODEL, "prompt": "Hello there",
                                            "options": {"num_predict": 4}})
    assert all("response" in o for o in lines) and lines[-1]["eval_count"] == 4


def test_generate(client):
    r = client.generate(model=MODEL, prompt="Once upon a time", options={**GREEDY,
                                                                        "num_predict": 10})
    assert r.response
    _final_ok(r, 10)
    assert len(r.context) == r.prompt_eval_count + 10
    chunks = list(client.generate(model=MODEL, prompt="Once upon a time", stream=True,
                                  options={**GREEDY, "num_predict": 10}))
    assert "".join(c.response for c in chunks) == r.response
    _final_ok(chunks[-1], 10)
    assert chunks[-1].context == r.context

    # context continues the conversation: its tokens come first
    r2 = client.generate(model=MODEL, prompt="And then?", context=r.context,
                         options={**GREEDY, "num_predict": 3})
    assert r2.context[:len(r.context)] == r.context
    assert r2.prompt_eval_count > len(r.context)

    # raw: the prompt as is, without the chat template (fewer tokens, no system)
    raw = client.generate(model=MODEL, prompt="Once upon a time", raw=True,
                          options={**GREEDY, "num_predict": 2})
    assert raw.prompt_eval_count < r.prompt_eval_count
    sys_ = client.generate(model=MODEL, prompt="Once upon a time", system="Be brief.",
                           options={**GREEDY, "num_predict": 2})
    assert sys_.prompt_eval_count > r.prompt_eval_count


def test_stop(client):
    base = client.chat(model=MODEL, messages=USER, options={**GREEDY, "num_predict": 24})
    text = base.message.content
    stop = _stop_from(text)
    r = client.chat(model=MODEL, messages=USER, options={**GREEDY, "num_predict": 24,
                                                         "stop": [stop]})
    assert r.done_reason == "stop" and stop not in r.message.content
    assert text.startswith(r.message.content)
    g = client.generate(model=MODEL, prompt="Once upon a time", options={**GREEDY,
                                                                        "num_predict": 24})
    stop = _stop_from(g.response)
    g2 = list(client.generate(model=MODEL, prompt="Once upon a time", stream=True,
                              options={**GREEDY, "num_predict": 24, "stop": [stop]}))
    out = "".join(c.response for c in g2)
    assert g2[-1].done_reason == "stop" and g.response.startswith(out) and stop not in out


def test_seed_determinism(client):
    def run(seed):
        return client.chat(model=MODEL, messages=USER,
                           options={"temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                    "seed": seed, "num_predict": 16}).message.content

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c


def test_num_ctx(client, http):
    p = client.chat(model=MODEL, messages=USER, options={**GREEDY, "num_predict": 1})
    n = p.prompt_eval_count
    # num_ctx leaves room for 3 tokens: num_predict is capped, done_reason "length"
    r = client.chat(model=MODEL, messages=USER, options={**GREEDY, "num_predict": 50,
                                                         "num_ctx": n + 3})
    assert r.done_reason == "length" and r.eval_count == 3
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model=MODEL, messages=USER, options={"num_ctx": n})
    assert ei.value.status_code == 400 and "num_ctx" in ei.value.error


def test_load_probe(client, http):
    r = client.chat(model=MODEL, messages=[])
    assert r.done and r.done_reason == "load"
    r = client.generate(model=MODEL)
    assert r.done and r.done_reason == "load" and r.response == ""
    r = http.post("/api/generate", json={"model": MODEL, "keep_alive": 0})
    assert r.json()["done_reason"] == "unload"


def test_logprobs(http):
    r = http.post("/api/chat", json={"model": MODEL, "messages": USER, "stream": False,
                                     "logprobs": True, "top_logprobs": 2,
                                     "options": {**GREEDY, "num_predict": 4}}).json()
    assert len(r["logprobs"]) == 4
    for e in r["logprobs"]:
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]


# ------------------------------------------------------------------------------------------------
# structured output
# ------------------------------------------------------------------------------------------------


SCHEMAS = [
    {"type": "object",
     "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                    "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
     "required": ["answer", "confidence"], "additionalProperties": False},
    {"type": "object",
     "properties": {"ok": {"type": "boolean"},
                    "place": {"type": "object",
                              "properties": {"name": {"type": "string", "maxLength": 8},
                                             "kind": {"enum": ["river", "mountain"]}},
                              "required": ["name", "kind"], "additionalProperties": False},
                    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]},
                             "maxItems": 3}},
     "required": ["ok", "place", "tags"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["enum-int", "nested-array-enum"])
def test_format_schema(client, schema):
    r = client.chat(model=MODEL, messages=USER, format=schema,
                    options={**GREEDY, "num_predict": 200})
    assert r.done_reason == "stop", r.message.content
    jsonschema.validate(json.loads(r.message.content), schema)
    chunks = list(client.generate(model=MODEL, prompt="Describe a place.", format=schema,
                                  stream=True, options={"seed": 3, "num_predict": 200}))
    jsonschema.validate(json.loads("".join(c.response for c in chunks)), schema)


def test_format_json(client):
    """Any JSON: the random model may write one string forever, so sample a few seeds
    (deterministic) and check every finished one parses."""
    finished = 0
    for seed in range(6):
        r = client.chat(model=MODEL, messages=USER, format="json",
                        options={"seed": seed, "num_predict": 300, "temperature": 1.0})
        assert r.message.content.lstrip().startswith("{"), r.message.content
        if r.done_reason == "stop":
            json.loads(r.message.content)
            finished += 1
    assert finished >= 1


def test_format_errors(client, http):
    with pytest.raises(ollama.ResponseError) as ei:
        client.chat(model=MODEL, messages=USER, format={"type": "object", "properties": {
            "x": {"type": "string", "pattern": "(?<=a)b"}}})
    assert ei.value.status_code == 400 and "format" in ei.value.error
    r = http.post("/api/chat", json={"model": MODEL, "messages": USER, "format": "yaml"})
    assert r.status_code == 400 and set(r.json()) == {"error"}


# ------------------------------------------------------------------------------------------------
# tools
# ------------------------------------------------------------------------------------------------


def test_tools_round_trip(client, http):
    # tool_choice is an exolaunch extension (Ollama has none); the SDK passes it in options
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                    tools=[WEATHER], options={**GREEDY, "num_predict": 120,
                                              "tool_choice": "required"})
    assert r.done_reason == "stop", r.message.content
    assert len(r.message.tool_calls) == 1
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])

    # streamed: the call arrives in a chunk's message.tool_calls
    chunks = list(client.chat(model=MODEL, messages=[{"role": "user", "content": "Oslo?"}],
                              tools=[WEATHER], stream=True,
                              options={"seed": 5, "num_predict": 120,
                                       "tool_choice": "get_weather"}))
    calls = [tc for c in chunks for tc in (c.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert chunks[-1].done_reason == "stop"

    # round trip: the assistant's call and the tool's result go back in (as the SDK sends them)
    history = [{"role": "user", "content": "Weather in Oslo?"}, r.message,
               {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"}]
    r2 = client.chat(model=MODEL, messages=history, tools=[WEATHER],
                     options={**GREEDY, "num_predict": 8})
    _final_ok(r2)
    assert r2.prompt_eval_count > r.prompt_eval_count  # the call and the result were rendered

    # raw HTTP, top-level tool_choice, arguments as an object in the history
    body = {"model": MODEL, "stream": False, "tools": [WEATHER], "tool_choice": "required",
            "messages": history[:1], "options": {**GREEDY, "num_predict": 120}}
    out = http.post("/api/chat", json=body).json()
    fn = out["message"]["tool_calls"][0]["function"]
    assert fn["name"] == "get_weather" and isinstance(fn["arguments"], dict)

    bad = http.post("/api/chat", json={**body, "tool_choice": "nope"})
    assert bad.status_code == 400 and "tool_choice" in bad.json()["error"]


# ------------------------------------------------------------------------------------------------
# errors and auth
# ------------------------------------------------------------------------------------------------


def test_errors(client, http):
    for call in (lambda: client.chat(model="no-such-model", messages=USER),
                 lambda: client.generate(model="no-such-model", prompt="hi"),
                 lambda: client.show("no-such-model")):
        with pytest.raises(ollama.ResponseError) as ei:
            call()
        assert ei.value.status_code == 404 and "not found" in ei.value.error

    cases = [
        ("/api/generate", {"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "images": ["aGk="]}, "images"),
        ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x",
                                                     "images": ["aGk="]}]}, "images"),
        ("/api/chat", {"model": MODEL, "messages": USER, "options": {"temperature": "hot"}},
         "temperature"),
        ("/api/chat", {"model": MODEL, "messages": USER, "options": {"num_predict": 0}},
         "num_predict"),
        ("/api/chat", {"model": MODEL, "messages": USER, "think": True}, "thinking"),
        ("/api/chat", {"model": MODEL, "messages": "hi"}, "messages"),
    ]
    for path, body, word in cases:
        r = http.post(path, json=body)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()) == {"error"} and word in r.json()["error"], r.text
    r = http.post("/api/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = http.post("/api/pull", json={"model": MODEL})
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_auth(engine):
    srv = start_server(engine, "127.0.0.1", 0, api_key=KEY)
    try:
        good = ollama.Client(host=srv.url, headers={"Authorization": f"Bearer {KEY}"})
        assert good.list().models[0].model == f"{MODEL}:latest"
        assert good.chat(model=MODEL, messages=USER, options={"num_predict": 2}).eval_count == 2
        with pytest.raises(ollama.ResponseError) as ei:
            ollama.Client(host=srv.url).chat(model=MODEL, messages=USER)
        assert ei.value.status_code == 401 and "API key" in ei.value.error
        with httpx.Client(base_url=srv.url) as h:
            r = h.get("/api/tags")
            assert r.status_code == 401 and set(r.json()) == {"error"}
            assert h.get("/").status_code == 401
            assert h.get("/", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
            assert h.get("/health").status_code == 200
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------
# an engine that fails mid-stream
# ------------------------------------------------------------------------------------------------


def test_engine_failure_mid_stream():
    eng = FakeEngine()
    srv = start_server(eng, "127.0.0.1", 0)
    try:
        c = ollama.Client(host=srv.url, timeout=10)
        got = ""
        with pytest.raises(ollama.ResponseError) as ei:
            for ch in c.chat(model="fake", messages=USER, stream=True):
                got += ch.message.content
        assert got == "t0 t1 " and "rank 1 stopped" in ei.value.error
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            eng.failed = None
            lines = _ndjson(h, "/api/generate", {"model": "fake", "prompt": "hi"})
            assert [set(o) for o in lines[-1:]] == [{"error"}]
            assert all(not o.get("done") for o in lines)
            # failed now: 503 at once
            r = h.post("/api/chat", json={"model": "fake", "messages": USER})
            assert r.status_code == 503 and "rank 1" in r.json()["error"]
            # tags work without a model directory
            assert h.get("/api/tags").json()["models"][0]["name"] == "fake:latest"
    finally:
        srv.stop()
