"""Serving benchmark: the same ranks and model, in-process vs through the HTTP streaming API.

    python scripts/bench_serving.py [--model demo-llama:100m] [-n 2] [--backend ring|mpi]
                                    [--gen-tokens 128] [--prompt-tokens 32] [--repeats 3]

Prints, for one configuration: decode tok/s of the engine driven in-process on rank 0
(`python -m runtime bench` under `exolaunch exec`), decode tok/s of the same through the
OpenAI streaming API (`exolaunch run` + httpx), their ratio, TTFT, and idle CPU per rank
(a served cluster with no requests, over 5 s). Decode tok/s = (tokens - 1) / (last - first
token arrival), single stream, greedy, the full length generated every time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.launch_helpers import ServingCluster  # noqa: E402


def launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


def inprocess(a) -> dict:
    g = ["--hostfile", a.hostfile] if a.hostfile else []
    out = subprocess.run(
        launcher(*g, "exec", "-n", str(a.n), "--backend", a.backend, "-x", "EXOLAUNCH_CACHE", "--no-tag-output", "--",
                 "python", "-m", "runtime", "bench", "--model", a.model, "--prompt-tokens", str(a.prompt_tokens),
                 "--gen-tokens", str(a.gen_tokens), "--repeats", str(a.repeats)),
        capture_output=True, text=True, timeout=1800, cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"in-process run failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return json.loads(line[6:])


def http_stream(base: str, model: str, prompt: list[int], gen: int) -> dict:
    body = {"model": model, "prompt": prompt,  # the very token ids the in-process run used
            "max_tokens": gen, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    with httpx.stream("POST", f"{base}/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices"):
                now = time.perf_counter()
                first = first or now
                last = now
    n = usage["completion_tokens"]
    return {"ttft": first - t0, "decode_tok_s": (n - 1) / (last - first), "tokens": n}


def idle_cpu(pids: list[int], seconds: float = 5.0) -> list[float]:
    procs = [psutil.Process(p) for p in pids]
    before = [p.cpu_times() for p in procs]
    time.sleep(seconds)
    after = [p.cpu_times() for p in procs]
    return [100 * (x.user + x.system - y.user - y.system) / seconds for y, x in zip(before, after)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo-llama:100m")
    ap.add_argument("--hostfile")
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--backend", default="ring", choices=["ring", "mpi"])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("EXOLAUNCH_CACHE", str(Path.home() / ".cache" / "exolaunch"))

    from mlx_lm.utils import load_tokenizer

    from runtime.bench import exact_prompt
    from runtime.contract import resolve_model

    ip = inprocess(a)
    prompt = exact_prompt(load_tokenizer(resolve_model(a.model)[0]), a.prompt_tokens)
    extra = ["-n", str(a.n), "--backend", a.backend]
    with ServingCluster(a.model, *extra, hostfile=a.hostfile, cache=os.environ["EXOLAUNCH_CACHE"],
                        ready_timeout=900) as c:
        pids = c.rank_pids()
        time.sleep(1.0)
        idle = idle_cpu(pids)
        http_stream(c.base_url, a.model, prompt, 8)  # warm-up
        runs = [http_stream(c.base_url, a.model, prompt, a.gen_tokens) for _ in range(a.repeats)]
        c.stop()
    http = {k: statistics.median(r[k] for r in runs) for k in ("ttft", "decode_tok_s")}
    print(f"model {a.model}, {a.n} ranks, backend {a.backend}, prompt {a.prompt_tokens} tok, "
          f"generate {a.gen_tokens} tok, greedy, median of {a.repeats}; {os.cpu_count()} cores")
    print(f"{'path':12} {'decode tok/s':>13} {'TTFT ms':>9}")
    print(f"{'in-process':12} {ip['decode_tok_s']:>13.2f} {ip['ttft'] * 1e3:>9.1f}")
    print(f"{'HTTP stream':12} {http['decode_tok_s']:>13.2f} {http['ttft'] * 1e3:>9.1f}")
    print(f"HTTP / in-process: {http['decode_tok_s'] / ip['decode_tok_s']:.1%} (goal >= 95%)")
    print("idle CPU per rank (% of a core, 5 s, served cluster, no requests): "
          + ", ".join(f"{x:.2f}" for x in idle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
