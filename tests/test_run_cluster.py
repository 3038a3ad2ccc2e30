"""`exolaunch run`: a model sharded over ranks reached by real SSH, used through the OpenAI SDK.

Correctness: float32 greedy output of TP-2, TP-4 (and pipeline-2 where mlx-lm supports it)
is identical, token for token, to one rank, for the llama, qwen3 and kimi_k2 demo models.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.launch_helpers import ServingCluster, yaml_hostfile

pytestmark = pytest.mark.slow

PROMPTS = ["The cluster of Macs", "def fibonacci(n):", '{"name": "exolaunch", "ranks": ']


def greedy_outputs(base_url: str, model: str) -> list[tuple[str, list]]:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
    outs = []
    for p in PROMPTS:
        r = client.completions.create(model=model, prompt=p, max_tokens=24, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"
        outs.append((r.choices[0].text, r.choices[0].logprobs.tokens))
    return outs


@pytest.mark.parametrize("name,layouts", [
    ("demo-llama", [("tensor", {"h1": 1, "h2": 1}), ("tensor", {"h1": 2, "h2": 2})]),
    ("demo-qwen3", [("tensor", {"h1": 1, "h2": 1}), ("tensor", {"h1": 1, "h2": 1, "h3": 1, "h4": 1})]),
    ("demo-kimi", [("tensor", {"h1": 1, "h2": 1}), ("tensor", {"h1": 2, "h2": 2}), ("pipeline", {"h1": 1, "h2": 1})]),
])
def test_sharded_greedy_equals_one_rank(ssh_cluster, tmp_path, model_cache, name, layouts):
    model = f"{name}:tiny"
    with ServingCluster(model, "-n", "1", cache=model_cache) as one:
        reference = greedy_outputs(one.base_url, model)
        one.stop()
    for sharding, slots in layouts:
        hf = yaml_hostfile(tmp_path / f"{sharding}-{len(slots)}.yaml", ssh_cluster, slots)
        # 4 ranks on this machine's 2 cores: ring's collectives spin while they wait (42 s for
        # kimi's); on mpi, whose agents see 2 ranks on 2 cores per "host" and tell them to yield
        # (launcher/oversubscription.py), 12 s
        oversubscribed = ["--backend", "mpi"] if sum(slots.values()) > 2 else []
        with ServingCluster(model, "--sharding", sharding, *oversubscribed, hostfile=hf, cache=model_cache) as c:
            got = greedy_outputs(c.base_url, model)
            c.stop()
        n = sum(slots.values())
        assert got == reference, f"{sharding}-{n} differs from 1 rank for {name}"


def test_kill_one_rank_mid_stream(ssh_cluster, tmp_path, model_cache):
    hf = yaml_hostfile(tmp_path / "h.yaml", ssh_cluster, {"h1": 1, "h2": 1})
    model = "demo-llama:tiny"
    with ServingCluster(model, hostfile=hf, cache=model_cache) as c:
        client = openai.OpenAI(base_url=c.base_url, api_key="none", max_retries=0, timeout=30)
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "count"}], max_tokens=1000, stream=True)
        got, error = 0, None
        t_kill = None
        try:
            for chunk in stream:
                got += 1
                if got == 5:
                    victim = [p for p in c.rank_pids() if psutil.Process(p).environ().get("EXOLAUNCH_RANK") == "1"]
                    assert victim
                    os.kill(victim[0], signal.SIGKILL)
                    t_kill = time.monotonic()
        except (openai.APIError, httpx.HTTPError) as e:
            error = e
        took = time.monotonic() - t_kill
        assert error is not None, f"the stream ended without an error after a rank died ({got} chunks)"
        assert took < 10, f"the client waited {took:.1f} s for the error"
        code = c.proc.wait(timeout=30)
        assert code == 128 + signal.SIGKILL, "".join(c.err)
        assert "rank 1 on h2 was killed by SIGKILL" in "".join(c.err)
        c.stop(expect=None)  # asserts no rank left


def test_disconnect_then_normal_request_two_ranks(model_cache):
    model = "demo-llama:tiny"
    with ServingCluster(model, cache=model_cache) as c:
        for seed in (None, 7):  # mlx_lm.server deadlocks the cluster on a cancelled seeded stream
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500,
                    "stream": True, "temperature": 0.8}
            if seed is not None:
                body["seed"] = seed
            with httpx.stream("POST", f"{c.base_url}/chat/completions", json=body, timeout=30) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i > 4:
                        break  # leaving the block closes the connection mid-stream
        client = openai.OpenAI(base_url=c.base_url, api_key="none", max_retries=0, timeout=30)
        t = time.monotonic()
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert r.usage.completion_tokens == 8
        assert time.monotonic() - t < 10
        c.stop()


def test_concurrent_streams_two_ranks(model_cache):
    model = "demo-llama:tiny"
    with ServingCluster(model, cache=model_cache) as c:
        client = openai.OpenAI(base_url=c.base_url, api_key="none", max_retries=0, timeout=60)
        results, errors = [], []

        def one(i):
            try:
                text, n = "", 0
                for chunk in client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": f"stream {i}"}], max_tokens=32,
                        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
                    elif chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                results.append(n)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert results == [32] * 8
        c.stop()


def test_idle_ranks_do_not_spin(model_cache):
    with ServingCluster("demo-llama:tiny", cache=model_cache) as c:
        procs = [psutil.Process(p) for p in c.rank_pids()]
        assert len(procs) == 2
        before = [p.cpu_times() for p in procs]
        time.sleep(3)
        after = [p.cpu_times() for p in procs]
        for b, a in zip(before, after):
            busy = (a.user + a.system - b.user - b.system) / 3
            assert busy < 0.05, f"an idle rank used {busy:.0%} of a core"
        c.stop()


def test_bad_sharding_is_refused_with_numbers(model_cache):
    # demo-llama tiny has 8 heads and 4 KV heads: 3 ranks split them unevenly, 5 cannot.
    with pytest.raises(AssertionError) as e:
        ServingCluster("demo-llama:tiny", "-n", "5", cache=model_cache, ready_timeout=120)
    out = str(e.value)
    assert "tensor parallelism over 5 ranks needs at least one whole KV head per rank" in out
    assert "num_attention_heads=8" in out and "num_key_value_heads=4" in out
