"""All four API dialects against one 2-rank cluster (tensor parallel), each through its official
SDK: plain generation, structured output and a forced tool call. The per-dialect details are
tested in tests/test_api_*.py against an in-process engine."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import ollama
import openai
import pytest

from tests.launch_helpers import ServingCluster

pytestmark = pytest.mark.slow

MODEL = "demo-llama:tiny"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "mode": {"enum": ["train", "plane"]},
    },
    "required": ["city", "days", "mode"],
    "additionalProperties": False,
}
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                   "required": ["city"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ServingCluster(MODEL, cache=tmp_path_factory.mktemp("models")) as c:
        yield c
        c.stop()


def test_openai_chat_schema_and_tool(cluster):
    client = openai.OpenAI(base_url=cluster.base_url, api_key="none", max_retries=0, timeout=60)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "plan a trip"}], max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], max_tokens=60,
        tools=[{"type": "function", "function": WEATHER}], tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["parameters"])


def test_anthropic_messages(cluster):
    client = anthropic.Anthropic(base_url=cluster.base_url.removesuffix("/v1"), api_key="none", max_retries=0)
    m = client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 8
    m = client.messages.create(
        model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "weather?"}],
        tools=[{"name": WEATHER["name"], "description": WEATHER["description"],
                "input_schema": WEATHER["parameters"]}],
        tool_choice={"type": "tool", "name": "get_weather"})
    use = next(b for b in m.content if b.type == "tool_use")
    assert m.stop_reason == "tool_use"
    jsonschema.validate(use.input, WEATHER["parameters"])


def test_responses(cluster):
    client = openai.OpenAI(base_url=cluster.base_url, api_key="none", max_retries=0, timeout=60)
    r = client.responses.create(model=MODEL, input="plan a trip", max_output_tokens=60,
                                text={"format": {"type": "json_schema", "name": "trip", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.output_text), SCHEMA)


def test_ollama(cluster):
    client = ollama.Client(host=cluster.base_url.removesuffix("/v1"))
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "plan a trip"}], format=SCHEMA,
                    options={"num_predict": 60})
    jsonschema.validate(json.loads(r.message.content), SCHEMA)
    g = client.generate(model=MODEL, prompt="hello", options={"num_predict": 5, "seed": 3})
    assert g.done and g.eval_count == 5 and g.done_reason == "length"
    assert any(m.model == MODEL or m.model.startswith("demo-llama") for m in client.list().models)
