"""A hostile corpus against one real 2-rank cluster (issue 10): every request below is answered
with a clear status in the client's own dialect (a 4xx for the bad ones, never a 5xx or a
traceback), none of them reaches a rank in a shape that can fail it, and afterwards the same
ranks (same pids) still serve every dialect.

The cluster runs with --max-num-seqs 2 --max-queue 2 so that admission control (429 with
Retry-After) can be shown too; the limits themselves are runtime/api/limits.py."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.launch_helpers import ServingCluster

pytestmark = pytest.mark.slow

MODEL = "demo-llama:tiny"
HI = [{"role": "user", "content": "hi"}]
BIG = 9_000_000  # bytes: over the default --max-body-mb of 8


@pytest.fixture(scope="module")
def cluster(model_cache):
    with ServingCluster(MODEL, "--max-num-seqs", "2", "--max-queue", "2", cache=model_cache) as c:
        c.pids = sorted(c.rank_pids())
        assert len(c.pids) == 2, c.pids
        c.http = httpx.Client(base_url=c.base_url.removesuffix("/v1"), timeout=60)
        yield c
        c.http.close()
        c.stop()


# ------------------------------------------------------------------------------------------------
# the corpus
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    path: str
    body: Any = None  # sent as JSON
    raw: bytes | None = None  # sent as is (Content-Type application/json unless headers say)
    status: int = 400
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    says: str | None = None  # the error message (or the answer) contains this


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 3, **kw}


def completion(**kw) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 3, **kw}


def anthropic(**kw) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 3, **kw}


def responses(**kw) -> dict:
    return {"model": MODEL, "input": "hi", "max_output_tokens": 3, **kw}


def generate(options: dict | None = None, **kw) -> dict:
    return {"model": MODEL, "prompt": "hi", "stream": False,
            "options": {"num_predict": 3, **(options or {})}, **kw}


def ochat(options: dict | None = None, **kw) -> dict:
    return {"model": MODEL, "messages": HI, "stream": False,
            "options": {"num_predict": 3, **(options or {})}, **kw}


def raw_json(template: str, **parts: str) -> bytes:
    """JSON text Python's json.dumps would not write (NaN, lone surrogates, 1e999)."""
    return template.format(**parts).encode()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MSGS = "/v1/messages"
RESP = "/v1/responses"
GEN = "/api/generate"
OCHAT = "/api/chat"

CASES = [
    # 1. sampling values that reach every rank: top_k >= the vocabulary is clamped (off) ...
    Case("topk-huge-chat", CHAT, chat(top_k=1_000_000, temperature=1.0), status=200),
    Case("topk-huge-completions", CMPL, completion(top_k=10**30, temperature=0.7), status=200),
    Case("topk-huge-anthropic", MSGS, anthropic(top_k=1_000_000), status=200),
    Case("topk-huge-responses", RESP, responses(top_k=2048, temperature=1.0), status=200),
    Case("topk-huge-ollama", GEN, generate({"top_k": 1_000_000, "temperature": 1.0}), status=200),
    Case("topk-huge-stream", CHAT, chat(top_k=1_000_000, temperature=1.0, stream=True), status=200),
    Case("topk-negative", CHAT, chat(top_k=-5), says="top_k"),
    # 2. ... temperatures below float32's reach, NaN and infinities are refused
    Case("temp-tiny-chat", CHAT, chat(temperature=1e-39), says="temperature"),
    Case("temp-tiny-completions", CMPL, completion(temperature=1e-300), says="temperature"),
    Case("temp-tiny-anthropic", MSGS, anthropic(temperature=1e-39), says="temperature"),
    Case("temp-tiny-responses", RESP, responses(temperature=1e-39), says="temperature"),
    Case("temp-tiny-ollama", GEN, generate({"temperature": 1e-39}), says="temperature"),
    Case("temp-nan-chat", CHAT, raw=raw_json('{{"messages": {m}, "temperature": NaN}}',
                                             m=json.dumps(HI)), says="temperature"),
    Case("temp-nan-ollama", GEN, raw=b'{"prompt": "hi", "options": {"temperature": NaN}}',
         says="temperature"),
    Case("temp-inf-ollama", OCHAT, raw=raw_json('{{"messages": {m}, "options": {{"temperature": '
                                                'Infinity}}}}', m=json.dumps(HI)),
         says="temperature"),
    Case("temp-huge-ollama", GEN, generate({"temperature": 1e300}), says="temperature"),
    Case("nan-in-echoed-metadata", RESP, raw=b'{"input": "hi", "metadata": {"a": NaN}}',
         says="metadata.a"),
    Case("infinity-in-tool-schema", CHAT, raw=raw_json(
        '{{"messages": {m}, "tools": [{{"type": "function", "function": {{"name": "f", '
        '"parameters": {{"type": "object", "properties": {{"x": {{"type": "number", '
        '"maximum": Infinity}}}}}}}}}}]}}', m=json.dumps(HI)), says="maximum"),
    Case("top-p-nan-ollama", GEN, raw=b'{"prompt": "hi", "options": {"top_p": NaN}}',
         says="top_p"),
    Case("top-p-1e999-chat", CHAT, raw=raw_json('{{"messages": {m}, "top_p": 1e999}}',
                                                m=json.dumps(HI)), says="top_p"),
    Case("top-p-over-anthropic", MSGS, anthropic(top_p=1.5), says="top_p"),
    Case("min-p-chat", CHAT, chat(min_p=2.0), says="min_p"),
    Case("min-p-nan-ollama", GEN, raw=b'{"prompt": "hi", "options": {"min_p": NaN}}',
         says="min_p"),
    Case("presence-penalty-chat", CHAT, chat(presence_penalty=3), says="presence_penalty"),
    Case("frequency-penalty-inf-ollama", GEN,
         raw=b'{"prompt": "hi", "options": {"frequency_penalty": -Infinity}}',
         says="frequency_penalty"),
    Case("repeat-penalty-ollama", GEN, generate({"repeat_penalty": -1}), says="repeat_penalty"),
    Case("repetition-penalty-chat", CHAT, chat(repetition_penalty=0), says="repetition_penalty"),
    # a divisor near 0 turned the logits into inf, then NaN, inside every rank's step
    Case("repetition-penalty-tiny-chat", CHAT, chat(repetition_penalty=1e-40), says="repetition_penalty"),
    Case("repeat-penalty-tiny-ollama", GEN, generate({"repeat_penalty": 1e-9}), says="repeat_penalty"),
    Case("penalties-applied-ok", CHAT, chat(repetition_penalty=0.01, presence_penalty=-2, frequency_penalty=2,
                                            min_p=1.0, temperature=1.0), status=200),
    Case("penalties-applied-ok-ollama", GEN, generate({"repeat_penalty": 100, "repeat_last_n": -1, "min_p": 0.5,
                                                      "presence_penalty": 2}), status=200),
    Case("seed-huge-chat", CHAT, chat(seed=2**70), says="seed"),
    Case("seed-huge-ollama", GEN, generate({"seed": 1e30}), says="seed"),
    Case("seed-negative-responses", RESP, responses(seed=-(2**64)), says="seed"),
    Case("seed-extremes-ok", CHAT, chat(seed=2**64 - 1, temperature=1.0, n=2), status=200),
    Case("logit-bias-id", CHAT, chat(logit_bias={"99999999": 5}), says="logit_bias"),
    Case("logit-bias-key", CHAT, chat(logit_bias={"abc": 5}), says="logit_bias"),
    Case("logit-bias-value", CHAT, chat(logit_bias={"5": 1000}), says="logit_bias"),
    Case("logit-bias-too-many", CHAT, chat(logit_bias={str(i): 1 for i in range(2000)}), says="logit_bias"),
    Case("logit-bias-extremes-ok", CHAT, chat(logit_bias={"5": 100, "6": -100}), status=200),
    Case("top-logprobs-huge", CHAT, chat(logprobs=True, top_logprobs=10**30),
         says="top_logprobs"),
    Case("max-tokens-huge", CHAT, chat(max_tokens=10**30), says="context"),
    Case("max-tokens-float", CHAT, chat(max_tokens=1e308), says="max_tokens"),
    Case("n-huge", CHAT, chat(n=10**20), says="n"),
    Case("num-predict-huge-ollama", GEN, generate({"num_predict": 10**30, "num_ctx": 40}),
         status=200, says='"done_reason":"length"'),
    Case("num-ctx-huge-ollama", GEN, generate({"num_ctx": 10**30}), status=200),
    Case("options-not-object-ollama", GEN, generate() | {"options": "x"}, says="options"),
    Case("options-wrong-type-ollama", GEN, generate({"top_k": "many"}), says="top_k"),
    # 3. lone surrogates, wherever text would reach the tokenizer (or any JSON encoder)
    Case("surrogate-completions", CMPL, raw=b'{"prompt": "a\\ud800b", "max_tokens": 3}',
         says="surrogate"),
    Case("surrogate-completions-list", CMPL, raw=b'{"prompt": ["ok", "\\udfff"]}',
         says="surrogate"),
    Case("surrogate-ollama-raw", GEN, raw=b'{"prompt": "a\\ud800", "raw": true}',
         says="surrogate"),
    Case("surrogate-ollama-system", GEN, raw=b'{"prompt": "a", "system": "\\ud800"}',
         says="surrogate"),
    Case("surrogate-chat", CHAT, raw=b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
         says="surrogate"),
    Case("surrogate-model-name", CHAT,
         raw=b'{"model": "\\ud800", "messages": [{"role": "user", "content": "a"}]}',
         says="surrogate"),
    Case("surrogate-stop", CHAT, raw=raw_json('{{"messages": {m}, "stop": ["\\udc00"]}}',
                                              m=json.dumps(HI)), says="surrogate"),
    Case("surrogate-key", RESP, raw=b'{"input": "hi", "metadata": {"\\ud800": 1}}',
         says="surrogate"),
    Case("surrogate-anthropic", MSGS, raw=raw_json(
        '{{"model": "m", "max_tokens": 3, "messages": {m}, "system": "\\ud83d"}}',
        m=json.dumps(HI)), says="surrogate"),
    Case("surrogate-pair-ok", CHAT, raw=raw_json('{{"messages": [{{"role": "user", "content": '
                                                 '"\\ud83d\\ude00"}}], "max_tokens": 2}}'),
         status=200),
    Case("surrogate-raw-bytes", CHAT,
         raw=b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', says="UTF-8"),
    Case("bad-utf8", CHAT, raw=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
         says="UTF-8"),
    Case("bad-utf8-ollama", GEN, raw=b'{"prompt": "\xc3\x28"}', says="UTF-8"),
    # 4. stop strings: at most 16, of at most 256 characters
    Case("stop-long-chat", CHAT, chat(stop=["x" * 100_000]), says="stop"),
    Case("stop-long-string", CMPL, completion(stop="y" * 257), says="stop"),
    Case("stop-many-anthropic", MSGS, anthropic(stop_sequences=[str(i) for i in range(17)]),
         says="stop_sequences"),
    Case("stop-long-ollama", GEN, generate({"stop": ["z" * 200_000] * 16}), says="stop"),
    Case("stop-wrong-type-ollama", GEN, generate({"stop": [1, 2]}), says="stop"),
    Case("stop-max-ok", CHAT, chat(stop=["q" * 256] * 16), status=200),
    # 6. prompts x n
    Case("prompts-times-n", CMPL, completion(prompt=["a"] * 100_000, n=16), says="128"),
    Case("prompts-over-cap", CMPL, completion(prompt=[[1, 2]] * 129), says="128"),
    Case("prompts-at-cap-refused-by-n", CMPL, completion(prompt=["a"] * 9, n=16), says="128"),
    # 7. admission: body size, prompts too long to tokenize
    Case("body-too-large-openai", CMPL, raw=b'{"prompt": "' + b"a" * BIG + b'"}', status=413,
         says="MB"),
    Case("body-too-large-anthropic", MSGS, raw=b'{"x": "' + b"a" * BIG + b'"}', status=413),
    Case("body-too-large-ollama", GEN, raw=b'{"prompt": "' + b"a" * BIG + b'"}', status=413),
    Case("body-too-large-on-get", "/v1/models", raw=b"a" * BIG, method="GET", status=413),
    Case("prompt-chars-completions", CMPL, completion(prompt="word " * 400_000),
         says="characters"),
    Case("prompt-chars-chat", CHAT, chat(messages=[{"role": "user", "content": "x" * 2_000_000}]),
         says="characters"),
    Case("prompt-chars-anthropic", MSGS, anthropic(messages=[{"role": "user",
                                                              "content": "x" * 2_000_000}]),
         says="characters"),
    Case("prompt-chars-ollama-raw", GEN, generate(prompt="x" * 2_000_000, raw=True),
         says="characters"),
    Case("prompt-chars-count-tokens", MSGS + "/count_tokens",
         {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2_000_000}]},
         says="characters"),
    Case("many-messages", CHAT, chat(messages=HI * 100_000), says="characters"),
    Case("many-tools", CHAT, chat(tools=[{"type": "function", "function": {
        "name": f"f{i}", "description": "d" * 20, "parameters": {"type": "object"}}}
        for i in range(10_000)]), says="characters"),
    # 13. Ollama takes JSON whatever the Content-Type; the others say what they need
    Case("ollama-form-content-type", GEN, raw=json.dumps(generate()).encode(), status=200,
         headers={"content-type": "application/x-www-form-urlencoded"}),
    Case("ollama-no-content-type", OCHAT, raw=json.dumps(ochat()).encode(), status=200,
         headers={"content-type": ""}),
    Case("ollama-show-text-plain", "/api/show", raw=b'{"model": "demo-llama:tiny"}', status=200,
         headers={"content-type": "text/plain"}),
    Case("openai-form-content-type", CHAT, raw=json.dumps(chat()).encode(), status=415,
         headers={"content-type": "application/x-www-form-urlencoded"}, says="Content-Type"),
    Case("anthropic-text-plain", MSGS, raw=json.dumps(anthropic()).encode(), status=415,
         headers={"content-type": "text/plain"}, says="Content-Type"),
    Case("openai-no-content-type", CHAT, raw=json.dumps(chat()).encode(), status=200,
         headers={"content-type": ""}),
    # wrong types, empty and huge arrays, deep nesting, odd bodies, unknown fields
    Case("messages-string", CHAT, chat(messages="hi"), says="messages"),
    Case("messages-empty", CHAT, chat(messages=[]), says="messages"),
    Case("messages-empty-anthropic", MSGS, anthropic(messages=[]), says="messages"),
    Case("input-empty-responses", RESP, responses(input=[]), says="input"),
    Case("input-number-responses", RESP, responses(input=5), says="input"),
    Case("prompt-empty-list", CMPL, completion(prompt=[]), says="prompt"),
    Case("prompt-ids-out-of-vocab", CMPL, completion(prompt=[1, 10**12]), says="token id"),
    Case("prompt-ids-negative", CMPL, completion(prompt=[[3, -1]]), says="token id"),
    Case("ollama-context-out-of-vocab", GEN, generate(context=[1, 99_999_999]), says="context"),
    Case("ollama-messages-empty", OCHAT, ochat(messages=[]), status=200),  # Ollama's load probe
    Case("role-unknown-anthropic", MSGS, anthropic(messages=[{"role": "robot", "content": "x"}]),
         says="role"),
    Case("max-tokens-string", CHAT, chat(max_tokens="5"), says="max_tokens"),
    Case("max-tokens-missing-anthropic", MSGS, {"model": MODEL, "messages": HI},
         says="max_tokens"),
    Case("stream-string", CHAT, chat(stream="yes"), says="stream"),
    Case("deep-nesting-chat", CHAT, raw=b'{"messages": ' + nested(100_000) + b"}",
         says="nested"),
    Case("deep-nesting-anthropic", MSGS, raw=nested(100_000), says="nested"),
    Case("deep-nesting-ollama", OCHAT, raw=b'{"options": ' + b'{"a": ' * 100_000
         + b"1" + b"}" * 100_001, says="nested"),
    Case("deep-nesting-responses", RESP, raw=b'{"input": "hi", "metadata": ' + nested(500)
         + b"}", says="nested"),
    Case("deep-schema", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "deep", "schema": json.loads('{"type": "array", "items": ' * 30
                                             + '{"type": "string"}' + "}" * 30)}}), status=200),
    Case("invalid-json", CHAT, raw=b'{"messages": [', says="JSON"),
    Case("empty-body", CHAT, raw=b"", says="body"),
    Case("body-a-list", CHAT, raw=b"[1, 2, 3]"),
    Case("body-a-string-ollama", GEN, raw=b'"hello"'),
    Case("int-5000-digits", CHAT, raw=b'{"seed": ' + b"9" * 5000 + b"}", says="JSON"),
    Case("unknown-fields", CHAT, chat(foo={"bar": [1, {"baz": None}]}, logit_bias={"5": -3},
                                      presence_penalty=1.5, user="u"), status=200),
    Case("unknown-fields-ollama", GEN, generate({"mirostat": 2, "num_gpu": 99}, extra=[1]),
         status=200),
    Case("unknown-route", "/v1/nope", chat(), status=404),
    Case("unknown-route-ollama", "/api/pull", {"model": MODEL}, status=404),
    Case("model-path-surrogate", "/v1/models/%ED%A0%80", method="GET", status=404),
    Case("responses-get-unknown", "/v1/responses/resp_1", method="GET", status=404),
]


def dialect(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api"):
        return "ollama"
    return "openai"  # also /, /health, /ready: the default shape


def assert_error_shape(path: str, r: httpx.Response) -> str:
    """The error body is the dialect's own; returns its message."""
    body = r.json()
    kind = dialect(path)
    if kind == "anthropic":
        assert body["type"] == "error" and isinstance(body["error"]["type"], str), body
        return body["error"]["message"]
    if kind == "ollama":
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        return body["error"]
    assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str)
    return body["error"]["message"]


def send(http: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if case.raw is not None:
        headers.setdefault("content-type", "application/json")
        if headers["content-type"] == "":
            del headers["content-type"]
        return http.request(case.method, case.path, content=case.raw, headers=headers)
    return http.request(case.method, case.path, json=case.body, headers=headers)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(cluster, case):
    r = send(cluster.http, case)
    assert r.status_code == case.status, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        message = assert_error_shape(case.path, r)
        if case.says:
            assert case.says in message, message
        assert "Traceback" not in r.text
    elif case.says:
        assert case.says in r.text


def test_chunked_body_over_the_limit(cluster):
    """No Content-Length: the limit holds while the body streams in."""
    def chunks():
        for _ in range(BIG // 65536 + 1):
            yield b"a" * 65536

    for path in (CHAT, MSGS, GEN):
        r = cluster.http.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert_error_shape(path, r)


ROUTES = {  # path -> the methods it answers
    CHAT: {"POST"}, CMPL: {"POST"}, "/v1/models": {"GET", "HEAD"},
    "/v1/models/demo-llama": {"GET", "HEAD"}, RESP: {"POST"},
    "/v1/responses/resp_1": {"GET", "HEAD", "DELETE"}, MSGS: {"POST"}, MSGS + "/count_tokens": {"POST"},
    OCHAT: {"POST"}, GEN: {"POST"}, "/api/tags": {"GET", "HEAD"}, "/api/show": {"POST"},
    "/api/ps": {"GET", "HEAD"}, "/api/version": {"GET", "HEAD"}, "/": {"GET", "HEAD"},
    "/health": {"GET", "HEAD"}, "/ready": {"GET", "HEAD"}, "/openapi.json": {"GET", "HEAD"},
}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@pytest.mark.parametrize("path", list(ROUTES))
def test_every_route_every_method(cluster, path):
    for method in METHODS:
        r = cluster.http.request(method, path)
        assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
        if method not in ROUTES[path]:
            assert r.status_code == 405, (method, path, r.status_code)
            if method != "HEAD":
                assert "not allowed" in assert_error_shape(path, r)
        elif method == "POST":  # no body: a 400 naming what is missing
            assert r.status_code == 400, (path, r.text)
            assert_error_shape(path, r)


# ------------------------------------------------------------------------------------------------
# admission control: a full queue is a 429 with Retry-After in every dialect
# ------------------------------------------------------------------------------------------------

LONG = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000,
        "ignore_eos": True, "stream": True, "model": MODEL}
FULL_QUEUE_REQUESTS = [
    (CHAT, chat()), (CMPL, completion()), (RESP, responses()), (MSGS, anthropic()),
    (GEN, generate()), (OCHAT, ochat()),
]


def test_full_queue_is_429_with_retry_after(cluster):
    """2 running + 2 waiting fill --max-num-seqs 2 --max-queue 2; then every dialect says 429
    in its own shape with Retry-After, and the cluster serves again once they are gone."""
    streams, readers = [], []  # a line iterator that is garbage-collected closes its stream
    try:
        for i in range(4):
            resp = cluster.http.send(cluster.http.build_request("POST", CHAT, json=LONG), stream=True)
            assert resp.status_code == 200, resp.read()
            streams.append(resp)
            if i < 2:  # running: tokens arrive (the role chunk comes first either way)
                readers.append(resp.iter_lines())
                while '"content":"' not in next(readers[-1]).replace('"content":""', ""):
                    pass
        for path, body in FULL_QUEUE_REQUESTS:
            r = cluster.http.post(path, json=body)
            assert r.status_code == 429, (path, r.status_code, r.text[:300])
            assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) >= 1000
            assert "busy" in assert_error_shape(path, r)
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 30
    while True:  # the cancelled streams leave within a step or two
        r = cluster.http.post(CHAT, json=chat())
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------------
# afterwards: the same ranks serve every dialect
# ------------------------------------------------------------------------------------------------


def test_cluster_survived(cluster):
    http = cluster.http
    assert http.get("/ready").json()["status"] == "ready"
    r = http.post(CHAT, json=chat(max_tokens=4, temperature=0)).json()
    assert r["usage"]["completion_tokens"] == 4
    assert http.post(CMPL, json=completion()).json()["choices"][0]["finish_reason"] == "length"
    assert http.post(MSGS, json=anthropic()).json()["stop_reason"] == "max_tokens"
    assert http.post(RESP, json=responses()).json()["status"] == "incomplete"
    assert http.post(GEN, json=generate()).json()["eval_count"] == 3
    assert http.post(OCHAT, json=ochat()).json()["done_reason"] == "length"
    assert sorted(cluster.rank_pids()) == cluster.pids, "a rank restarted or died"
    assert cluster.proc.poll() is None
