"""Cancel during prefill (issue 12 item 5): a client that disconnects while its long prompt is being
prefilled must not hold up the next request. Rank 0 sizes each prefill chunk (about
engine.PREFILL_CHUNK_SECONDS of work) and the cancel takes effect at the next chunk boundary, so
the next request's TTFT stays within 2 s of an idle server's. A real engine and HTTP server in
this process, a raw socket as the client that walks away."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.conftest import running_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    from runtime.api import start_server
    from runtime.demo_models import ensure

    path = ensure("demo-llama", cache_dir=tmp_path_factory.mktemp("models"), size="small")
    # Chunks of up to 2048 tokens: seconds each here, unless rank 0 sizes them to the time they take.
    with running_engine(path, prefix_cache_gb=0, prefill_step=2048) as eng:
        srv = start_server(eng, "127.0.0.1", 0)
        yield eng, f"http://127.0.0.1:{srv.port}"
        srv.stop()


def _ttft(base: str, prompt: list[int]) -> float:
    t = time.monotonic()
    with httpx.stream("POST", f"{base}/v1/completions", timeout=120, json={
            "model": "demo-llama", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                return time.monotonic() - t
    raise AssertionError("no token")


def test_a_client_gone_mid_prefill_does_not_delay_the_next_request(small_server):
    eng, base = small_server
    _ttft(base, [10, 11, 12])  # warm-up
    idle = min(_ttft(base, [20 + i, 21, 22, 23]) for i in range(2))
    long_prompt = [30 + (i * 13) % 3000 for i in range(6000)]  # tens of seconds of prefill here
    body = json.dumps({"model": "demo-llama", "prompt": long_prompt, "max_tokens": 4, "stream": True}).encode()
    host, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + 30
    while eng.load()[0] == 0 and time.monotonic() < deadline:  # admitted: prefilling
        time.sleep(0.02)
    time.sleep(1.5)
    assert eng.load()[0] == 1, "the long prompt should still be prefilling"
    s.close()  # the client walks away
    after = _ttft(base, [40, 41, 42, 43])
    assert after - idle < 2.0, f"TTFT {after:.2f} s after an abandoned prefill, {idle:.2f} s idle"
    deadline = time.monotonic() + 5  # and the abandoned prompt is gone, not just overtaken
    while eng.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert eng.load() == (0, 0)
