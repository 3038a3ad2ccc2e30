"""Structured output: response_format json_object / json_schema enforced by constrained decoding
(runtime/constrain.py), through the official `openai` SDK against a 1-rank in-process engine
(demo-llama tiny, random weights). The model's weights are random, so everything that parses
here parses because of the grammar mask.

Schemas bound their strings, numbers and arrays (maxLength, maximum, maxItems): a random model
given an unbounded string rarely closes it within a test's token budget."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import openai
import pytest

from runtime import constrain

MODEL = "demo-llama"
USER = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _fmt(schema: dict, name: str = "out") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}
ENUM = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]},
                   "size": {"type": "string", "enum": ["S", "M", "L"]}},
    "required": ["color", "size"],
    "additionalProperties": False,
}
ARRAY = {
    "type": "object",
    "properties": {"items": {
        "type": "array", "minItems": 2, "maxItems": 3,
        "items": {"type": "object",
                  "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                 "tag": {"type": "string", "maxLength": 6}},
                  "required": ["id", "tag"], "additionalProperties": False}}},
    "required": ["items"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {"type": "object",
                 "properties": {"name": {"type": "string", "maxLength": 8},
                                "address": {"type": "object",
                                            "properties": {"city": {"type": "string", "maxLength": 8},
                                                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                            "required": ["city", "zip"],
                                            "additionalProperties": False}},
                 "required": ["name", "address"], "additionalProperties": False},
        "ok": {"type": "boolean"},
    },
    "required": ["user", "ok"],
    "additionalProperties": False,
}
ANYOF_CONST = {
    "type": "object",
    "properties": {
        "kind": {"const": "shape"},
        "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                            {"type": "string", "maxLength": 4},
                            {"type": "null"}]},
    },
    "required": ["kind", "value"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "enum": ENUM, "array": ARRAY, "nested": NESTED, "anyof_const": ANYOF_CONST}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_validates(client, name, temperature):
    schema = SCHEMAS[name]
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=300,
                                       temperature=temperature, seed=7,
                                       response_format=_fmt(schema, name))
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    data = json.loads(c.message.content)
    jsonschema.validate(data, schema)
    if name == "anyof_const":
        assert data["kind"] == "shape"


def test_json_schema_streaming_matches(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=300, temperature=0,
              response_format=_fmt(PERSON))
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts, finish = [], None
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert finish == "stop"
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), PERSON)


def test_json_object(client):
    """Any JSON object: keys and strings are unbounded, so a random model may run out of tokens;
    every output that finished must be an object, and some seed must finish."""
    finished = 0
    for seed in range(8):
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=200,
                                           temperature=1.0, seed=seed,
                                           response_format={"type": "json_object"})
        c = r.choices[0]
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
            finished += 1
    assert finished >= 1


def test_text_format_is_unconstrained(client):
    a = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0,
                                       response_format={"type": "text"})
    b = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_length_gives_truncated_json(client):
    """max_tokens too small to finish: finish_reason "length", and the text is then only a
    prefix of valid JSON (documented in runtime/constrain.py)."""
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, temperature=0,
                                       response_format=_fmt(PERSON))
    c = r.choices[0]
    assert c.finish_reason == "length"
    assert c.message.content.startswith("{")
    with pytest.raises(ValueError):
        json.loads(c.message.content)


@pytest.mark.parametrize("schema, reason", [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "strng"}, "strng"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
])
def test_unsupported_schema_is_400_with_reason(client, schema, reason):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8,
                                       response_format=_fmt(schema))
    msg = ei.value.body["message"] if isinstance(ei.value.body, dict) else str(ei.value)
    assert "response_format" in msg and reason in msg, msg
    assert "cannot be enforced" in msg


@pytest.mark.parametrize("fmt, needle", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}}, "must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "str"}}, "must be a JSON schema object"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "yaml"}, "yaml"),
])
def test_malformed_response_format_is_400(client, fmt, needle):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, response_format=fmt)
    assert needle in str(ei.value)


def test_completions_ignore_response_format(client):
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "length"


# ------------------------------------------------------------------------------------------------
# the processor itself
# ------------------------------------------------------------------------------------------------


def _masks(proc, tokens: list[int], vocab: int) -> list[np.ndarray]:
    """Drive a processor as mlx-lm does: first call with the prompt, then one token at a time."""
    ctx = [1, 2, 3]
    logits = mx.zeros((1, vocab))
    out = []
    for t in [None] + tokens:
        if t is not None:
            ctx.append(t)
        masked = proc(mx.array(ctx), logits)
        out.append(np.array(mx.isfinite(masked)[0]))
    return out


def test_processor_determinism_and_eos(engine):
    tok = engine.tokenizer
    vocab = engine.model.args.vocab_size
    g = constrain.json_schema(PERSON)
    text = '{"name": "Ann", "age": 31, "member": true}'
    ids = list(tok.encode(text))
    a = _masks(constrain.logits_processor(g, tok), ids, vocab)
    b = _masks(constrain.logits_processor(json.loads(json.dumps(g)), tok), ids, vocab)
    assert len(a) == len(ids) + 1
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    for t, m in zip(ids, a):  # every token of a valid output was allowed
        assert m[t]
    eos = sorted(tok.eos_token_ids)
    assert [int(i) for i in np.flatnonzero(a[-1])] == eos  # complete: only EOS
    assert not a[0][eos].any()  # nothing generated yet: EOS not allowed


def test_validate_and_helpers(engine):
    tok = engine.tokenizer
    assert constrain.json_schema({"type": "object"}) == {"type": "json_schema", "schema": {"type": "object"}}
    assert constrain.json_object() == {"type": "json_object"}
    constrain.validate({"type": "regex", "pattern": "[0-9]{3}"}, tok)
    constrain.validate({"type": "lark", "grammar": 'start: "yes" | "no"'}, tok)
    for bad in [{"type": "json_schema", "schema": [1]}, {"type": "nope"}, "not a dict",
                {"type": "lark", "grammar": "start: undefined_rule"}]:
        with pytest.raises(constrain.UnsupportedGrammar):
            constrain.validate(bad, tok)


def test_regex_and_lark_in_engine(engine):
    from runtime.requests import FinishEvent, GenerationRequest, SamplingParams

    tok = engine.tokenizer
    prompt = list(tok.encode("hello"))
    for grammar, check in [
        ({"type": "regex", "pattern": "[0-9]{3}-[a-c]{2}"}, lambda s: len(s) == 6 and s[3] == "-"),
        ({"type": "lark", "grammar": 'start: "yes" | "no"'}, lambda s: s in ("yes", "no")),
    ]:
        for ignore_eos in (False,):
            h = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=40, temperature=1.0,
                                                                       seed=3, grammar=grammar,
                                                                       ignore_eos=ignore_eos)))
            text, fin = "", None
            for ev in h.iter_sync(60):
                text += ev.text
                if isinstance(ev, FinishEvent):
                    fin = ev
            assert fin.reason == "stop" and check(text), (text, fin)
