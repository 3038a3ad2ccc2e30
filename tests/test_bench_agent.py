"""`exolaunch bench --trace agent` (launcher/bench/agent.py): the trace against a real in-process
server: growing conversations whose later turns the prefix cache serves, and the report."""

from __future__ import annotations

from launcher.bench import agent


def test_the_agent_trace_grows_conversations_that_the_prefix_cache_serves(engine, server):
    url = f"http://127.0.0.1:{server.port}/v1"
    hits = engine.index.hits
    trace = agent.Trace(system=200, turns=3, conversations=2, user=10, answer=6)
    rows = agent.run_trace(url, "demo-llama", engine.tokenizer, trace, suppress={"ignore_eos": True})
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert all(r["ttft_p50_s"] > 0 for r in rows)
    prompts = [r["prompt_tokens"] for r in rows]
    assert prompts[0] >= 2 * 200 and prompts[0] < prompts[1] < prompts[2]  # each turn resends more
    assert engine.index.hits - hits >= 4  # turns 2 and 3 of both conversations reused a prefix
    rec = {"model": "m", "ranks": 1, "backend": "ring", "sharding": "tensor", "ok": True, "turns": rows,
           "later_ttft_s": agent.later_ttft(rows)}
    md = agent.report([{**rec, "server": "exolaunch"}, {**rec, "server": "exolaunch-nocache"}])
    assert "| exolaunch-nocache |" in md and "(exolaunch: 1.00x)" in md
    md = agent.report([{**rec, "server": "exolaunch", "blas": "openblas",
                        "blas_library": "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so"}])
    assert ", blas openblas" in md and "| exolaunch (libopenblasp-r0.3.21.so) |" in md
