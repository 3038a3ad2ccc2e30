"""OpenAI dialect end to end: the official `openai` SDK against a 1-rank in-process engine
(demo-llama tiny) served on a free loopback port. A small fake engine covers the failure paths
(an engine that fails mid-stream, or is not ready) without breaking the shared real one."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.fake_engine import FakeEngine
from runtime.api import start_server

MODEL = "demo-llama"
KEY = "sk-test-4f1c"
USER = [{"role": "user", "content": "Tell me about the river and the mountain."}]


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(engine):
    srv = start_server(engine, "127.0.0.1", 0, api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


def _wait_idle(engine, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.active_requests() == 0:
            return True
        time.sleep(0.02)
    return engine.active_requests() == 0


def _greedy_chat(client, max_tokens=24, **kw):
    return client.chat.completions.create(model=MODEL, messages=USER, max_tokens=max_tokens,
                                          temperature=0, **kw)


def _stop_from(text: str) -> str:
    """A piece of `text` from its middle that starts with a non-space character."""
    mid = len(text) // 2
    while mid < len(text) - 3 and text[mid].isspace():
        mid += 1
    stop = text[mid:mid + 3]
    assert len(stop) == 3 and stop.strip(), text
    return stop


# ------------------------------------------------------------------------------------------------
# health, readiness, models
# ------------------------------------------------------------------------------------------------


def test_health_ready_and_models(server, client):
    with httpx.Client(base_url=server.url) as h:
        r = h.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = h.get("/ready")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        assert h.head("/ready").status_code == 200
        assert h.head("/health").status_code == 200
        r = h.get("/nowhere")
        assert r.status_code == 404 and "error" in r.json()

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    m = models.data[0]
    assert m.object == "model" and m.owned_by == "exolaunch" and m.created > 0
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# ------------------------------------------------------------------------------------------------
# chat completions
# ------------------------------------------------------------------------------------------------


def test_chat_non_streaming_usage(client, tok):
    r = _greedy_chat(client, max_tokens=7)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant" and c.message.content
    assert c.finish_reason == "length"
    expected_prompt = len(tok.apply_chat_template(USER, add_generation_prompt=True))
    assert r.usage.prompt_tokens == expected_prompt
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == expected_prompt + 7


def test_chat_content_parts_and_system(client, tok):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Tell me "},
                                         {"type": "text", "text": "a story."}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, temperature=0)
    flat = [msgs[0], {"role": "user", "content": "Tell me a story."}]
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(flat, add_generation_prompt=True))
    assert r.usage.completion_tokens == 3


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=3,
                                       temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_chat_streaming_matches_non_streaming(client, tok):
    full = _greedy_chat(client, max_tokens=12).choices[0].message.content
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == len(tok.apply_chat_template(USER, add_generation_prompt=True))
    assert all(ch.usage is None for ch in chunks[:-1])


def test_streaming_without_include_usage_has_no_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3,
                                                 temperature=0, stream=True))
    assert chunks and all(ch.usage is None and ch.choices for ch in chunks)


def test_greedy_is_deterministic(client):
    a = _greedy_chat(client, max_tokens=16).choices[0].message.content
    b = _greedy_chat(client, max_tokens=16).choices[0].message.content
    assert a == b and a


def test_seed_determinism(client):
    def run(seed):
        return client.chat.completions.create(model=MODEL, messages=USER, max_tokens=16,
                                              temperature=1.0, seed=seed).choices[0].message.content

    a1, a2, b = run(1234), run(1234), run(98765)
    assert a1 == a2
    assert a1 != b  # 16 tokens sampled at temperature 1 from a 2048-token vocabulary


def test_n_choices_with_seed(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=1.0,
                                       n=2, seed=42)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" and c.message.content for c in r.choices)
    assert r.usage.completion_tokens == 16
    # choice i is the same as a single request seeded with seed + i
    for i in range(2):
        single = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8,
                                                temperature=1.0, seed=42 + i)
        assert single.choices[0].message.content == r.choices[i].message.content

    # streaming: every choice streams and finishes
    texts, finishes = {0: "", 1: ""}, {}
    usage = None
    for ch in client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8,
                                             temperature=1.0, n=2, seed=42, stream=True,
                                             stream_options={"include_usage": True}):
        usage = ch.usage or usage
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
    assert usage.completion_tokens == 16


@pytest.mark.parametrize("as_list", [False, True])
def test_chat_stop(client, as_list):
    full = _greedy_chat(client, max_tokens=24).choices[0].message.content
    stop = _stop_from(full)
    expected = full[:full.index(stop)]
    stop_arg = ["@@never-generated@@", stop] if as_list else stop
    r = _greedy_chat(client, max_tokens=24, stop=stop_arg)
    out = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert stop not in out
    assert out == expected
    assert r.usage.completion_tokens < 24

    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=24,
                                                 temperature=0, stop=stop_arg, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = _greedy_chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    c = r.choices[0]
    entries = c.logprobs.content
    assert len(entries) == r.usage.completion_tokens == 6
    for e in entries:
        assert isinstance(e.token, str) and e.logprob <= 0 and isinstance(e.bytes, list)
        assert len(e.top_logprobs) == 3
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # greedy: the chosen token is the most likely one
        assert e.logprob == pytest.approx(lps[0], abs=1e-5)
        assert e.top_logprobs[0].token == e.token
    # mlx-lm's BPE detokenizer drops the first token's leading space from the text
    joined = b"".join(bytes(e.bytes) for e in entries).decode()
    assert joined in (c.message.content, " " + c.message.content)

    plain = _greedy_chat(client, max_tokens=6)
    assert plain.choices[0].logprobs is None

    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6,
                                                 temperature=0, logprobs=True, top_logprobs=2,
                                                 stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert len(streamed) == 6 and all(len(e.top_logprobs) == 2 for e in streamed)


def test_eight_concurrent_streams(server, engine):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)

    def one(i: int):
        n_tok = 6 + i
        text, usage, finish = "", None, None
        for ch in c.chat.completions.create(
                model=MODEL, max_tokens=n_tok, temperature=0.7, seed=i, stream=True,
                messages=[{"role": "user", "content": f"Story number {i}"}],
                stream_options={"include_usage": True}):
            usage = ch.usage or usage
            for choice in ch.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return n_tok, text, usage, finish

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for n_tok, text, usage, finish in results:
        assert finish == "length" and text
        assert usage.completion_tokens == n_tok
    assert _wait_idle(engine)


# ------------------------------------------------------------------------------------------------
# completions
# ------------------------------------------------------------------------------------------------


def test_completions(client, tok):
    prompt = "The river and the mountain"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    c = r.choices[0]
    assert c.text and c.finish_reason == "length" and c.logprobs is None
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 9

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=9,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"

    # a list of one string, and token ids, give the same greedy text
    r2 = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=9, temperature=0)
    r3 = client.completions.create(model=MODEL, prompt=tok.encode(prompt), max_tokens=9,
                                   temperature=0)
    assert r2.choices[0].text == r3.choices[0].text == c.text

    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=9, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == prompt + c.text


def test_completions_stop_and_logprobs(client):
    prompt = "Once upon a time"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                     temperature=0).choices[0].text
    stop = _stop_from(full)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                  stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)] and stop not in r.choices[0].text

    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert len(lp.text_offset) == 5 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[0] == 0
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(d) <= 2 for d in lp.top_logprobs)
    assert "".join(lp.tokens) in (r.choices[0].text, " " + r.choices[0].text)


# ------------------------------------------------------------------------------------------------
# disconnects
# ------------------------------------------------------------------------------------------------


def test_disconnect_mid_stream_cancels(server, engine, client):
    body = {"model": MODEL, "messages": USER, "max_tokens": 3900, "temperature": 0,
            "stream": True}  # ~6 s of generation here if nothing cancelled it
    with httpx.Client(base_url=server.url, timeout=30) as h:
        with h.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 4:
                    break
            assert engine.active_requests() == 1
    closed = time.monotonic()  # leaving the block closed the connection mid-stream
    assert _wait_idle(engine, 2.0), "the engine still runs the abandoned request"
    assert time.monotonic() - closed < 2.0
    t0 = time.monotonic()
    r = _greedy_chat(client, max_tokens=4)
    assert r.usage.completion_tokens == 4 and time.monotonic() - t0 < 5


def test_disconnect_non_streaming_cancels(server, engine, client):
    body = {"model": MODEL, "messages": USER, "max_tokens": 3900, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30, read=0.5)) as h:
        with pytest.raises(httpx.ReadTimeout):
            h.post("/v1/chat/completions", json=body)
    assert _wait_idle(engine, 2.0), "the engine still runs the abandoned request"
    assert _greedy_chat(client, max_tokens=2).usage.completion_tokens == 2


def test_graceful_stop_ends_open_streams(engine):
    srv = start_server(engine, "127.0.0.1", 0, graceful_timeout=0.5)
    body = {"model": MODEL, "messages": USER, "max_tokens": 3900, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        with h.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            t0 = time.monotonic()
            stopper = threading.Thread(target=srv.stop)
            stopper.start()
            try:
                for _ in lines:
                    pass
            except httpx.HTTPError:
                pass  # the connection is cut once the grace period is over
            assert time.monotonic() - t0 < 5
            stopper.join(10)
            assert not stopper.is_alive()
    assert _wait_idle(engine, 2.0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health")


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-9", messages=USER, max_tokens=2)
    assert ei.value.status_code == 404 and ei.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)


def test_model_aliases_accepted(client):
    for name in ("default", f"some-org/{MODEL}"):
        r = client.chat.completions.create(model=name, messages=USER, max_tokens=1)
        assert r.model == MODEL


@pytest.mark.parametrize("kw, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
    ({"stop": 5}, "stop"),
])
def test_bad_parameters_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=USER, **kw)
    assert ei.value.status_code == 400
    assert ei.value.param == param and param in ei.value.message


def test_bad_bodies_400_not_422(server):
    with httpx.Client(base_url=server.url) as h:
        cases = [
            {"model": MODEL, "messages": USER, "max_tokens": "10"},  # strict: no str -> int
            {"model": MODEL, "messages": USER, "stream": "yes"},
            {"model": MODEL, "messages": []},
            {"model": MODEL},
            {"model": MODEL, "messages": [{"content": "no role"}]},
            {"model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
        ]
        for body in cases:
            r = h.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "invalid_request_error" and err["message"]
            assert "Traceback" not in r.text
        r = h.post("/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        # unknown fields are fine
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": USER,
                                                  "max_tokens": 1, "some_future_field": {"a": 1},
                                                  "presence_penalty": 0.5})
        assert r.status_code == 200, r.text


def test_prompt_too_long_400(client, engine):
    long_text = "river mountain " * (engine.context_length // 2)
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": long_text}])
    assert ei.value.code == "context_length_exceeded"
    assert str(engine.context_length) in ei.value.message


def test_auth(auth_server):
    url = auth_server.url
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    assert [m.id for m in good.models.list().data] == [MODEL]
    assert good.chat.completions.create(model=MODEL, messages=USER,
                                        max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    with httpx.Client(base_url=url) as h:
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert h.get("/v1/models").status_code == 401
        assert h.get("/ready").status_code == 401
        r = h.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert h.get("/ready", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# ------------------------------------------------------------------------------------------------
# failure paths, with a fake engine that keeps the Engine contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("push_error", [True, False])
def test_engine_failure_mid_stream(push_error):
    eng = FakeEngine(push_error=push_error)
    srv = start_server(eng, "127.0.0.1", 0)
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=10)
        got = ""
        t0 = time.monotonic()
        with pytest.raises(openai.APIError) as ei:
            for ch in c.chat.completions.create(model="fake", messages=USER, max_tokens=5,
                                                stream=True):
                got += ch.choices[0].delta.content or ""
        assert time.monotonic() - t0 < 5
        assert got == "t0 t1 "
        assert "rank 1 stopped" in str(ei.value.message)

        # the raw stream: error object as the last data event, no [DONE]
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            r = h.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "failed"
            assert "rank 1" in r.json()["reason"]
            eng.failed = None  # fail again, for the raw stream
            with h.stream("POST", "/v1/chat/completions",
                          json={"model": "fake", "messages": USER, "stream": True}) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] != "[DONE]"
            err = json.loads(events[-1])["error"]
            assert set(err) == {"message", "type", "param", "code"}

            # now failed: new requests get 503 at once, streaming or not
            for stream in (False, True):
                r = h.post("/v1/chat/completions",
                           json={"model": "fake", "messages": USER, "stream": stream})
                assert r.status_code == 503 and "rank 1" in r.json()["error"]["message"]
            assert h.get("/health").status_code == 200

            # non-streaming request when the engine fails during it: 5xx, not a hang
            eng.failed = None
            r = h.post("/v1/chat/completions", json={"model": "fake", "messages": USER})
            assert r.status_code == 503 and "rank 1" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_not_ready():
    eng = FakeEngine()
    eng.ready = False
    srv = start_server(eng, "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            assert h.get("/health").status_code == 200
            r = h.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            assert h.head("/ready").status_code == 503
            r = h.post("/v1/chat/completions", json={"model": "fake", "messages": USER})
            assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    finally:
        srv.stop()


def test_port_in_use_raises():
    eng = FakeEngine()
    srv = start_server(eng, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            start_server(eng, "127.0.0.1", srv.port)
    finally:
        srv.stop()


class BrokenEngine(FakeEngine):
    def submit(self, req, loop=None):
        raise RuntimeError("secret internal detail")


def test_unexpected_error_is_500_without_details():
    srv = start_server(BrokenEngine(), "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            for stream in (False, True):
                r = h.post("/v1/chat/completions",
                           json={"model": "fake", "messages": USER, "stream": stream})
                assert r.status_code == 500
                assert r.json()["error"]["type"] == "server_error"
                assert "secret" not in r.text and "Traceback" not in r.text
    finally:
        srv.stop()


def test_ready_while_loading_is_503_logged_at_debug(caplog):
    """The front door polls /ready while the ranks load: its 503 is an answer, not an error."""
    import logging

    caplog.set_level(logging.DEBUG, logger="exolaunch.api.access")
    srv = start_server(FakeEngine(ready=False), "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as h:
            assert h.get("/ready").status_code == 503
            assert h.get("/v1/nothing-here").status_code == 404
    finally:
        srv.stop()
    lines = [r for r in caplog.records if r.name == "exolaunch.api.access"]
    ready = next(r for r in lines if '"GET /ready"' in r.getMessage())
    assert ready.levelno == logging.DEBUG
    assert next(r for r in lines if "/v1/nothing-here" in r.getMessage()).levelno == logging.WARNING


def test_any_seed_is_accepted(client):
    for seed in (-5, 2**62):
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2,
                                           temperature=1.0, seed=seed)
        assert r.usage.completion_tokens == 2
