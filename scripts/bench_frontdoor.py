"""What the front door's extra hop costs: decode tok/s through `run`'s public URL vs straight
to rank 0's private API, in the same run, requests interleaved (issue 16's goal: <= 3%).

    python scripts/bench_frontdoor.py [--model demo-llama:tiny] [-n 2] [--tokens 200] [--rounds 8]

Starts `exolaunch run` (launcher/served.py), reads rank 0's address from /exolaunch/status,
then alternates greedy streams of --tokens tokens (EOS ignored) through each path. Decode rate =
1 / the median gap between streamed tokens over all of a path's streams (robust to a load burst
on a shared machine); also prints the door's share of one core while it relayed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.ports import free_port  # noqa: E402
from launcher.served import RunOptions, ServedCluster  # noqa: E402


def gaps(base: str, model: str, tokens: int) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "count"}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    ts = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ts.append(time.perf_counter())
    return [b - a for a, b in zip(ts[1:], ts[2:])]  # from the second token on: decode only


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo-llama:tiny")
    ap.add_argument("-n", type=int, default=2, help="ranks (default 2)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    with ServedCluster(a.model, RunOptions(np=a.n, port=free_port())) as cluster:
        door = cluster.base_url.removesuffix("/v1")
        rank0 = httpx.get(door + "/exolaunch/status", timeout=10).json()["upstream"]
        pid = cluster.proc.pid
        res: dict[str, list[float]] = {"door": [], "rank0": []}
        gaps(door, a.model, a.tokens), gaps(rank0, a.model, a.tokens)  # warm both paths
        door_cpu = 0.0
        for i in range(a.rounds):
            order = [("door", door), ("rank0", rank0)]
            for name, base in order if i % 2 == 0 else order[::-1]:
                before = _cpu(pid)
                res[name] += gaps(base, a.model, a.tokens)
                if name == "door":
                    door_cpu += _cpu(pid) - before
        d, r = 1 / statistics.median(res["door"]), 1 / statistics.median(res["rank0"])
        relayed = len(res["door"]) + a.rounds
        print(f"{a.model} on {a.n} rank(s), {a.rounds} x {a.tokens} tokens per path: decode through the door "
              f"{d:.1f} tok/s, straight to rank 0 {r:.1f} tok/s: cost {100 * (r - d) / r:+.2f}%; "
              f"launcher CPU {1e3 * door_cpu / relayed:.3f} ms per relayed token")
    return 0


def _cpu(pid: int) -> float:
    """CPU seconds of the launcher process (the front door runs in it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
