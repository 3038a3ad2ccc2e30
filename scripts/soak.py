"""Soak a served cluster on loopback: many concurrent streams, clients that leave mid-stream, and a
queue kept overfull, then check that nothing admitted was lost and nothing was left behind.

    python scripts/soak.py [--model demo-llama:tiny] [-n 2] [--streams 64] [--seconds 60]
                           [--disconnects 16] [--max-num-seqs 8] [--max-queue 16]

Starts `exolaunch run` (launcher.served, as batch and bench do) with small admission limits so
that `--streams` concurrent clients overfill the queue. Each client loops until the time is up:
a streaming chat completion of 16-64 tokens (half of them with logit_bias, penalties and min_p
at random, extremes included); `--disconnects` of them close their connection
after a few chunks, once. Prints (and exits 1 unless all hold):
- admitted streams: completed / dropped or corrupted (an error event, a bad chunk, no [DONE]);
- refusals: 429 with Retry-After / anything else (5xx, connection errors);
- requests left in the engine once the clients are gone (/ready's running + waiting);
- each rank's RSS before and after, and its growth.
Traffic goes only to 127.0.0.1. This is a benchmark-style script, not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launcher.ports import free_port  # noqa: E402
from launcher.served import RunOptions, ServedCluster  # noqa: E402


def rank_processes(cluster: ServedCluster) -> list[psutil.Process]:
    root = psutil.Process(cluster.proc.pid)
    return [p for p in root.children(recursive=True)
            if "runtime" in p.cmdline() and "serve" in p.cmdline()]


def rss_mb(procs: list[psutil.Process]) -> list[float]:
    return [p.memory_info().rss / 2**20 for p in procs]


async def one_stream(client: httpx.AsyncClient, url: str, leave_after: int | None, stats: Counter,
                     rng: random.Random) -> float:
    """One request; returns how long to wait before the next (Retry-After on a 429)."""
    body = {"model": "default", "stream": True, "max_tokens": rng.randint(16, 64), "temperature": 0.7,
            "messages": [{"role": "user", "content": f"soak {rng.random()}"}]}
    if rng.random() < 0.5:  # half the streams sample with bias, penalties and min_p (runtime/sampling.py)
        body.update(presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2),
                    repetition_penalty=rng.choice([0.01, 1.3, 100.0]), min_p=rng.choice([0.0, 0.1, 1.0]),
                    logit_bias={str(rng.randrange(1, 64)): rng.uniform(-100, 100) for _ in range(rng.randint(0, 8))})
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code == 429:
                retry = r.headers.get("retry-after")
                stats["refused_429_retry_after" if retry else "refused_429_without_retry_after"] += 1
                await r.aread()
                return min(float(retry or 1), 2.0)
            if r.status_code != 200:
                stats[f"status_{r.status_code}"] += 1
                await r.aread()
                return 0.5
            stats["admitted"] += 1
            chunks, done, finish, bad = 0, False, None, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    bad = True
                    break
                if "error" in obj:
                    bad = True
                    break
                chunks += 1
                for ch in obj.get("choices", []):
                    finish = ch.get("finish_reason") or finish
                if leave_after is not None and chunks >= leave_after:
                    stats["left_mid_stream"] += 1
                    return 0.0  # closing the response drops the connection
            if done and finish and not bad:
                stats["completed"] += 1
            else:
                stats["dropped_or_corrupted"] += 1
    except httpx.HTTPError as e:
        stats[f"client_error_{type(e).__name__}"] += 1
        return 0.5
    return 0.0


async def client_loop(url: str, deadline: float, leave_after: int | None, stats: Counter, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as client:
        while time.monotonic() < deadline:
            wait = await one_stream(client, url, leave_after, stats, rng)
            leave_after = None  # each leaver leaves once, then behaves
            if wait:
                await asyncio.sleep(wait)


async def drive(base: str, streams: int, seconds: float, disconnects: int) -> Counter:
    stats: Counter = Counter()
    deadline = time.monotonic() + seconds
    url = base + "/chat/completions"
    await asyncio.gather(*(client_loop(url, deadline, 3 + i % 5 if i < disconnects else None, stats, i)
                           for i in range(streams)))
    return stats


def left_in_engine(root: str, timeout: float = 15.0) -> dict:
    """/ready's running + waiting, once they reach 0 or the timeout passes."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        last = httpx.get(root + "/ready", timeout=10).json()
        if last.get("running", 0) + last.get("waiting", 0) == 0:
            break
        time.sleep(0.5)
    return last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo-llama:tiny")
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--disconnects", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=16)
    a = ap.parse_args()

    opts = RunOptions(np=a.n, backend=a.backend, port=free_port(),
                      extra=("--skip-doctor", "--max-num-seqs", str(a.max_num_seqs), "--max-queue", str(a.max_queue)))
    with ServedCluster(a.model, opts) as cluster:
        base = cluster.base_url
        root = base.rsplit("/v1", 1)[0]
        procs = rank_processes(cluster)
        before = rss_mb(procs)
        t0 = time.monotonic()
        stats = asyncio.run(drive(base, a.streams, a.seconds, a.disconnects))
        elapsed = time.monotonic() - t0
        left = left_in_engine(root)
        after = rss_mb(procs)
        alive = all(p.is_running() for p in procs)
        # The same cluster still answers a normal request.
        normal = httpx.post(base + "/chat/completions", timeout=60, json={
            "model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": "still there?"}]})
    print(f"soak: {a.model} on {a.n} rank(s), {a.streams} streams for {elapsed:.0f} s, {a.disconnects} leave "
          f"mid-stream, --max-num-seqs {a.max_num_seqs} --max-queue {a.max_queue}")
    for k in sorted(stats):
        print(f"  {k:36s} {stats[k]}")
    print(f"  left in the engine afterwards       running {left.get('running')} waiting {left.get('waiting')}")
    for i, (b, c) in enumerate(zip(before, after)):
        print(f"  rank {i} RSS                          {b:.0f} -> {c:.0f} MB ({c - b:+.0f} MB)")
    print(f"  ranks alive after the soak          {alive}; a normal request then: HTTP {normal.status_code}")
    bad = (stats["dropped_or_corrupted"] + stats["refused_429_without_retry_after"]
           + sum(v for k, v in stats.items() if k.startswith(("status_", "client_error_"))))
    ok = (bad == 0 and stats["completed"] > 0 and alive and normal.status_code == 200
          and left.get("running", 0) + left.get("waiting", 0) == 0)
    print("soak: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
