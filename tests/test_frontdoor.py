"""The front door (launcher/frontdoor.py) in front of a real rank-0 API server on loopback.

The "cluster" is the in-process engine served by the real API server (conftest `server`); the
front door is the real proxy `run` starts, driven through its ClusterState as the restart loop
drives it. Clients are the official SDKs.
"""

from __future__ import annotations

import json
import socket
import time

import anthropic
import httpx
import ollama
import openai
import pytest

from launcher.frontdoor import ClusterState, FrontDoor
from tests.conftest import API_MODEL


@pytest.fixture(scope="module")
def door(server):
    state = ClusterState(model=API_MODEL, max_restarts=2)
    d = FrontDoor(state, "127.0.0.1", 0).start()
    state.set("ready", upstream=server.url)
    yield d
    d.stop()


@pytest.fixture
def ready(door, server):
    """The door, with the cluster serving (tests below take it down and must put it back)."""
    door.state.set("ready", upstream=server.url)
    yield door
    door.state.set("ready", upstream=server.url)


def url(d: FrontDoor) -> str:
    return f"http://127.0.0.1:{d.port}"


def test_chat_streams_through_unbuffered_and_says_who_served(ready, server):
    msgs = [{"role": "user", "content": "count to ten"}]
    direct = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    proxied = openai.OpenAI(base_url=url(ready) + "/v1", api_key="x", max_retries=0, timeout=60)
    want = direct.chat.completions.create(model=API_MODEL, messages=msgs, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})
    with proxied.chat.completions.with_streaming_response.create(
            model=API_MODEL, messages=msgs, max_tokens=40, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) as resp:
        assert resp.headers["x-exolaunch-served-by"] == "cluster"
        assert resp.headers["content-type"].startswith("text/event-stream")
        arrivals, text = [], ""
        for chunk in resp.parse():
            arrivals.append(time.monotonic())
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    assert text == want.choices[0].message.content
    # Unbuffered: the chunks arrived spread over the generation, not in one burst at its end.
    assert len(arrivals) >= 40 and arrivals[len(arrivals) // 2] < arrivals[-1] - 0.01, arrivals
    got = proxied.completions.with_raw_response.create(model=API_MODEL, prompt="a b c", max_tokens=3)
    assert got.headers["x-exolaunch-served-by"] == "cluster" and got.parse().usage.completion_tokens == 3


def test_ollama_ndjson_and_anthropic_pass_through(ready):
    parts = list(ollama.Client(host=url(ready), timeout=60).chat(
        model=API_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        options={"num_predict": 5, "temperature": 0}))
    assert parts[-1].done and sum(1 for p in parts if p.message.content) >= 1
    msg = anthropic.Anthropic(base_url=url(ready), api_key="x", max_retries=0, timeout=60).messages.create(
        model=API_MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert msg.usage.output_tokens == 4
    # Rank 0's own errors come back untouched (already in the dialect's shape).
    r = httpx.post(url(ready) + "/api/chat", json={"model": "nope", "messages": []}, timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"error"}


@pytest.mark.parametrize("phase", ["starting", "restarting"])
def test_down_answers_503_retry_after_in_each_dialect(ready, phase):
    st = ready.state
    st.expected_ready = time.monotonic() + 30.2
    st.set(phase, "rank 1 on h2 was killed by SIGKILL")
    base = url(ready)
    oa = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=10)
    for call in (lambda: oa.chat.completions.create(model=API_MODEL, messages=[{"role": "user", "content": "x"}]),
                 lambda: oa.completions.create(model=API_MODEL, prompt="x"),
                 lambda: oa.responses.create(model=API_MODEL, input="x")):
        with pytest.raises(openai.APIStatusError) as e:
            call()
        assert e.value.status_code == 503
        assert 20 <= int(e.value.response.headers["retry-after"]) <= 31
        err = e.value.response.json()["error"]
        assert err["type"] == "service_unavailable_error" and "rank 1 on h2" in err["message"]
    with pytest.raises(anthropic.APIStatusError) as e:
        anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=10).messages.create(
            model=API_MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and 20 <= int(e.value.response.headers["retry-after"]) <= 31
    assert e.value.response.json()["type"] == "error"
    assert e.value.response.json()["error"]["type"] == "overloaded_error"
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=base, timeout=10).chat(model=API_MODEL, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503 and phase in e.value.error
    for path in ("/health", "/ready"):
        r = httpx.get(base + path, timeout=10)
        assert r.status_code == 503 and r.json()["status"] == phase and 20 <= int(r.headers["retry-after"]) <= 31
    status = httpx.get(base + "/exolaunch/status", timeout=10).json()
    assert status["state"] == phase and status["max_restarts"] == 2 and 20 <= status["retry_after"] <= 31


def test_rank0_gone_before_the_supervisor_noticed_is_503_not_refused(ready):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    ready.state.set("ready", upstream=f"http://127.0.0.1:{dead}")
    r = httpx.post(url(ready) + "/v1/chat/completions", timeout=10,
                   json={"model": API_MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert "rank 0 is not answering" in r.json()["error"]["message"]
    assert httpx.get(url(ready) + "/health", timeout=10).status_code == 503


def test_ready_health_and_status_while_serving(ready):
    base = url(ready)
    assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
    r = httpx.get(base + "/ready", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ready"
    s = httpx.get(base + "/exolaunch/status", timeout=10).json()
    assert s["state"] == "ready" and s["upstream"] == ready.state.upstream and s["served"]["cluster"] >= 1


def test_api_key_checked_at_the_door_status_open_on_loopback(server):
    state = ClusterState(model=API_MODEL)
    d = FrontDoor(state, "127.0.0.1", 0, api_key="door-key", max_body_mb=0.001).start()
    try:
        state.set("ready", upstream=server.url)
        base = url(d)
        r = httpx.post(base + "/v1/messages", json={}, timeout=10)
        assert r.status_code == 401 and r.json()["type"] == "error"
        assert httpx.get(base + "/exolaunch/status", timeout=10).status_code == 200  # loopback
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        big = {"model": API_MODEL, "prompt": "x" * 5000}
        r = httpx.post(base + "/api/generate", json=big, headers={"Authorization": "Bearer door-key"}, timeout=10)
        assert r.status_code == 413 and set(r.json()) == {"error"}
    finally:
        d.stop()


def test_port_in_use_is_one_clear_error():
    from launcher.errors import LaunchError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(LaunchError, match="cannot listen on 127.0.0.1") as e:
            FrontDoor(ClusterState(), "127.0.0.1", s.getsockname()[1]).bind()
        assert e.value.status == 5


def test_status_json_is_plain(door):
    json.dumps(door.state.to_dict())


def test_metrics_carry_rank0_series_and_the_doors_restarts_across_a_restart(ready):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        r = httpx.get(url(ready) + "/metrics", timeout=10)
        assert r.status_code == 200
        return {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples}

    ready.state.restarts = 3
    up = scrape()
    assert up["exolaunch:restarts_total"] == 3 and up["exolaunch:cluster_ready"] == 1
    assert "exolaunch:num_requests_running" in up  # rank 0's own series came through
    ready.state.set("restarting", "rank 1 died")
    down = scrape()  # still 200: what the door knows, while rank 0 is away
    assert down["exolaunch:restarts_total"] == 3 and down["exolaunch:cluster_ready"] == 0
    assert "exolaunch:num_requests_running" not in down
    ready.state.restarts = 0


def test_a_door_stopped_while_it_starts_never_serves():
    # run starts the door without waiting (its imports overlap the ranks' start); a run that
    # ends at once must still leave nothing listening and no server thread behind
    d = FrontDoor(ClusterState(model="m", url="", max_restarts=0), "127.0.0.1", 0)
    d.start(wait=False)
    port = d.port
    d.stop()
    assert d._thread is not None and not d._thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_binding_the_public_port_does_not_import_the_api_server():
    # the front door binds before the preflight and the ranks; FastAPI's import (~0.8 s) was
    # on that path when the socket helper lived in runtime.api.server
    import subprocess
    import sys

    code = ("import sys; from launcher.frontdoor import ClusterState, FrontDoor; "
            "FrontDoor(ClusterState(model='m', url='', max_restarts=0), '127.0.0.1', 0).bind(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'runtime.api.server') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_door_answers_every_dialect_without_the_api_stack():
    # The door runs in the launcher while the ranks import; it needs starlette, uvicorn and
    # httpx only. FastAPI, pydantic and the dialects' request models (numpy, mlx with them)
    # cost ~1 s of CPU that the ranks' start competed with.
    import subprocess
    import sys

    code = """
import json, sys, urllib.request, urllib.error
from launcher.frontdoor import ClusterState, FrontDoor
d = FrontDoor(ClusterState(model='m', url='', max_restarts=0), '127.0.0.1', 0).start()
out = {}
for path in ('/v1/messages', '/api/chat', '/v1/chat/completions'):
    req = urllib.request.Request(f'http://127.0.0.1:{d.port}{path}', data=b'{}', method='POST',
                                 headers={'content-type': 'application/json'})
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as e:
        out[path] = [e.code, json.loads(e.read())]
d.stop()
out['imported'] = sorted(m for m in ('fastapi', 'pydantic', 'numpy', 'mlx.core', 'transformers') if m in sys.modules)
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["imported"] == []
    status, body = out["/v1/messages"]
    assert status == 503 and body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    status, body = out["/api/chat"]
    assert status == 503 and isinstance(body["error"], str) and body["error"]
    status, body = out["/v1/chat/completions"]
    assert status == 503 and body["error"]["message"] and "type" in body["error"]
