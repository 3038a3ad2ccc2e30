"""`run --fallback URL` (and --fallback-anthropic, --fallback-ollama): while the cluster is down,
loading or full, requests go to a real second server on loopback that speaks their dialect
(another exolaunch API server with its own key), streamed through; every answer says who served
it; upstream errors come back in the client's dialect; the upstream down too is a clear 503.
"""

from __future__ import annotations

import socket
import threading
import time

import anthropic
import httpx
import openai
import pytest

from launcher.frontdoor import ClusterState, Fallback, FrontDoor
from tests.conftest import API_MODEL, running_engine
from tests.launch_helpers import run

UP_KEY = "upstream-secret"


@pytest.fixture(scope="module")
def upstream(engine):
    """The fallback provider: a real API server that requires its own key."""
    from runtime.api import start_server

    srv = start_server(engine, "127.0.0.1", 0, api_key=UP_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def door(upstream):
    state = ClusterState(model="local-llama")
    fb = Fallback(url=upstream.url + "/v1", key=UP_KEY, models={"local-llama": API_MODEL})
    d = FrontDoor(state, "127.0.0.1", 0, api_key="door-key", fallback=fb).start()
    state.set("restarting", "rank 1 on h2 was killed by SIGKILL")
    yield d
    d.stop()


def client(d: FrontDoor, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{d.port}/v1", api_key="door-key", max_retries=0,
                         timeout=60, **kw)


def test_down_cluster_streams_from_the_fallback(door):
    c = client(door)
    with c.chat.completions.with_streaming_response.create(
            model="local-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}) as resp:
        assert resp.headers["x-exolaunch-served-by"] == "fallback"
        chunks = list(resp.parse())
    assert len(chunks) > 3 and chunks[-1].usage.completion_tokens == 12
    assert chunks[0].model == API_MODEL  # the name was mapped for the upstream
    got = c.completions.with_raw_response.create(model="local-llama", prompt="a b", max_tokens=2)
    assert got.headers["x-exolaunch-served-by"] == "fallback" and got.parse().usage.completion_tokens == 2
    assert door.state.to_dict()["served"]["fallback"] >= 2


@pytest.fixture(scope="module")
def door_all(upstream):
    """A door with a fallback for every dialect: the same upstream speaks all three."""
    state = ClusterState(model="local-llama")
    fb = Fallback(url=upstream.url + "/v1", key=UP_KEY, models={"local-llama": API_MODEL},
                  anthropic_url=upstream.url, ollama_url=upstream.url)
    d = FrontDoor(state, "127.0.0.1", 0, api_key="door-key", fallback=fb).start()
    state.set("restarting", "rank 1 on h2 was killed by SIGKILL")
    yield d
    d.stop()


def test_anthropic_and_ollama_requests_reach_their_fallbacks(door_all):
    import ollama

    a = anthropic.Anthropic(base_url=f"http://127.0.0.1:{door_all.port}", api_key="door-key", max_retries=0,
                            timeout=60)
    raw = a.messages.with_raw_response.create(model="local-llama", max_tokens=6,
                                              messages=[{"role": "user", "content": "hi"}])
    msg = raw.parse()
    assert raw.headers["x-exolaunch-served-by"] == "fallback"
    assert msg.model == API_MODEL and msg.usage.output_tokens >= 1  # the name was mapped; x-api-key accepted
    with a.messages.stream(model="local-llama", max_tokens=6, messages=[{"role": "user", "content": "hi"}]) as st:
        final = st.get_final_message()
    assert final.usage.output_tokens >= 1
    with pytest.raises(anthropic.BadRequestError) as e:  # the upstream's 400, in Anthropic's shape
        a.messages.create(model="local-llama", max_tokens=4, extra_body={"temperature": 9},
                          messages=[{"role": "user", "content": "hi"}])
    body = e.value.response.json()
    assert body["type"] == "error" and "fallback" in body["error"]["message"]
    o = ollama.Client(host=f"http://127.0.0.1:{door_all.port}", timeout=60,
                      headers={"authorization": "Bearer door-key"})
    r = o.chat(model="local-llama", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 4})
    assert r.model.startswith(API_MODEL) and r.eval_count >= 1  # Ollama names carry a tag
    assert [m.model for m in o.list().models]  # /api/tags from the upstream
    assert door_all.state.to_dict()["served"]["fallback"] >= 5


def test_fallback_errors_in_the_clients_dialect(door):
    with pytest.raises(openai.BadRequestError) as e:
        client(door).chat.completions.create(model="local-llama", messages=[{"role": "user", "content": "x"}],
                                             temperature=9)
    assert e.value.response.headers["x-exolaunch-served-by"] == "fallback"
    err = e.value.response.json()["error"]
    assert err["param"] is None and "fallback" in err["message"] and "temperature" in err["message"]
    with pytest.raises(openai.NotFoundError):  # a name the upstream does not serve, passed as is
        client(door).chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "x"}])
    # Anthropic and Ollama are not sent to an OpenAI upstream: 503 in their own shape.
    with pytest.raises(anthropic.APIStatusError) as e:
        anthropic.Anthropic(base_url=f"http://127.0.0.1:{door.port}", api_key="door-key", max_retries=0,
                            timeout=10).messages.create(model="local-llama", max_tokens=4,
                                                        messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and e.value.response.json()["error"]["type"] == "overloaded_error"
    assert "retry-after" in e.value.response.headers


def test_without_the_door_key_nothing_reaches_the_fallback(door):
    r = httpx.post(f"http://127.0.0.1:{door.port}/v1/chat/completions", timeout=10,
                   json={"model": "local-llama", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and "x-exolaunch-served-by" not in r.headers


def test_fallback_down_too_is_a_clear_503():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    state = ClusterState()
    d = FrontDoor(state, "127.0.0.1", 0, fallback=Fallback(url=f"http://127.0.0.1:{dead}/v1")).start()
    try:
        state.set("restarting", "lost rank 1 on h2: the SSH connection was lost")
        with pytest.raises(openai.APIStatusError) as e:
            client(d).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
        msg = e.value.response.json()["error"]["message"]
        assert "lost rank 1 on h2" in msg and f"fallback http://127.0.0.1:{dead}/v1 is unreachable" in msg
    finally:
        d.stop()


def test_full_cluster_queue_overflows_to_the_fallback(demo_model_path, upstream):
    """A cluster that answers 429 (queue full) hands the request to the fallback instead."""
    from runtime.api import start_server

    with running_engine(demo_model_path, max_num_seqs=1, max_queue=0) as small:
        srv = start_server(small, "127.0.0.1", 0)
        state = ClusterState()
        d = FrontDoor(state, "127.0.0.1", 0, fallback=Fallback(url=upstream.url + "/v1", key=UP_KEY)).start()
        try:
            state.set("ready", upstream=srv.url)
            c = client(d)
            busy = threading.Thread(target=lambda: c.completions.create(
                model=API_MODEL, prompt="x", max_tokens=400, extra_body={"ignore_eos": True}))
            busy.start()
            deadline = time.monotonic() + 30
            while small.load()[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            got = c.completions.with_raw_response.create(model=API_MODEL, prompt="y", max_tokens=2)
            assert got.headers["x-exolaunch-served-by"] == "fallback"
            busy.join(60)
        finally:
            d.stop()
            srv.stop()


@pytest.mark.slow
def test_run_serves_from_the_fallback_while_loading(upstream, model_cache):
    """`exolaunch run --fallback`: requests made while the ranks load are served by the fallback,
    then by the cluster once it is ready."""
    env = {"UP_KEY": UP_KEY}
    fb = ["--fallback", upstream.url + "/v1", "--fallback-key-env", "UP_KEY", "--fallback-model", API_MODEL]
    import subprocess

    from tests.launch_helpers import env_for_tests, exolaunch_argv, free_port

    port = free_port()
    proc = subprocess.Popen(exolaunch_argv("run", "demo-llama:tiny", "-n", "1", "--port", str(port), *fb),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env_for_tests(EXOLAUNCH_CACHE=str(model_cache), **env))
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()

    def health():
        try:
            return httpx.get(base + "/health", timeout=5)
        except httpx.TransportError:
            assert proc.poll() is None, f"exolaunch run ended ({proc.returncode}):\n{''.join(err)}"
            return None

    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while (h := health()) is None:
            assert time.monotonic() < deadline, "the front door never answered"
            time.sleep(0.05)
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        if h.status_code == 503:  # still loading: the fallback answers
            r = c.chat.completions.with_raw_response.create(
                model="demo-llama:tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert r.headers["x-exolaunch-served-by"] == "fallback", h.json()
        while (r := health()) is None or r.status_code != 200:
            assert time.monotonic() < deadline, "".join(err)
            time.sleep(0.1)
        r = c.chat.completions.with_raw_response.create(
            model="demo-llama:tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.headers["x-exolaunch-served-by"] == "cluster"
        assert h.status_code == 503, "the cluster was ready before the door answered: nothing fell back"
    finally:
        proc.send_signal(2)
        assert proc.wait(60) == 130, "".join(err)


@pytest.mark.parametrize("args,needle", [
    (["--fallback", "openrouter.ai/api/v1"], "--fallback 'openrouter.ai/api/v1': expected an http:// or https://"),
    (["--fallback", "http://127.0.0.1:9/v1", "--fallback-key-env", "EXL_NOT_SET_ANYWHERE"],
     "--fallback-key-env EXL_NOT_SET_ANYWHERE: that environment variable is not set"),
    (["--fallback-model", "x"], "--fallback-model needs --fallback URL"),
    (["--fallback-anthropic", "api.moonshot.ai/anthropic"],
     "--fallback-anthropic 'api.moonshot.ai/anthropic': expected an http:// or https:// base URL"),
    (["--fallback-ollama", "ftp://127.0.0.1:11434"], "--fallback-ollama 'ftp://127.0.0.1:11434': expected an http://"),
    (["--fallback", "http://127.0.0.1:9/v1", "--fallback-model", "a=b", "--fallback-model", "=c"],
     "--fallback-model '=c': expected NAME or LOCAL=REMOTE"),
    (["--restart", "-1"], "--restart -1: expected a whole number of at least 0"),
])
def test_bad_flags_are_one_line_and_exit_2(args, needle):
    r = run("run", "demo-llama:tiny", "-n", "1", *args, timeout=60)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
