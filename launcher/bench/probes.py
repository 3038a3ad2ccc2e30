"""What the bench measures on the hosts themselves: rank processes' CPU time and peak memory,
and each host's memory bandwidth. Each probe is a launcher.remote snippet that answers once
("result").

Rank processes are found by an env marker (EXOLAUNCH_BENCH_TAG=<token>, set on every rank of
both servers) plus a command-line substring, so the same probe serves exolaunch and the anchor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from launcher import remote, ssh

TAG_VAR = "EXOLAUNCH_BENCH_TAG"

# Linux: /proc gives the environment, CPU ticks and the peak RSS (VmHWM) of every process.
# macOS: `ps -E` appends the environment to the command; there is no peak RSS, so the bench
# keeps the largest RSS it sampled.
_RANK_STATS = r"""
import os, subprocess
tag, marker = PARAMS["tag"], PARAMS["marker"]
_NOT_RANKS = ("launcher.agent", "mpirun", "prterun", "orted", "mlx.launch", "launcher.bench.anchor")
out = []

def blas_of(pid):
    # The BLAS mlx's matmuls bind to: a preloaded one (LD_PRELOAD wins symbol lookup), else the
    # one mlx brought (mlx_cpu.libs), else the first mapped one that is not an ILP64 build with
    # renamed symbols (numpy's scipy_openblas64_, mapped in every rank, serves only numpy).
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        pre = {os.path.realpath(p) for p in env.get(b"LD_PRELOAD", b"").decode().replace(" ", ":").split(":") if p}
        libs = []
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) == 6 else ""
                if path.startswith("/") and "blas" in os.path.basename(path).lower() and path not in libs:
                    libs.append(path)
    except (OSError, ValueError):
        return None
    return next((l for l in libs if l in pre), None) or next((l for l in libs if "mlx" in l), None) \
        or next((l for l in libs if "64_" not in os.path.basename(l)), None)

if os.path.isdir("/proc/self"):
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag.encode() not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            if marker not in cmd or any(x in cmd for x in _NOT_RANKS):
                continue
            with open(f"/proc/{pid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            status = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status") if ":" in l)
            out.append({"pid": int(pid), "cpu_s": (int(st[11]) + int(st[12])) / tick,
                        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
                        "peak_mb": int(status.get("VmHWM", status["VmRSS"]).split()[0]) / 1024})
            if PARAMS.get("blas"):
                out[-1]["blas"] = blas_of(pid)
        except (OSError, ValueError, KeyError, IndexError):
            continue
else:
    ps = subprocess.run(["ps", "-axww", "-E", "-o", "pid=,rss=,time=,command="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        if tag not in line.split() or marker not in line or line.split()[0] == str(os.getpid()) \
                or any(x in line.split(tag)[0] for x in _NOT_RANKS):
            continue
        pid, rss, cpu = line.split()[:3]
        parts = [float(x) for x in cpu.replace("-", ":").split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        out.append({"pid": int(pid), "cpu_s": secs, "rss_mb": int(rss) / 1024, "peak_mb": int(rss) / 1024})
say("result", out)
"""

# Decode streams the weights through memory, so the relevant figure is read bandwidth on the
# device that decodes: the GPU via mlx where there is one (Apple silicon), else all CPU cores
# summing their own large arrays (numpy releases the GIL).
_BANDWIDTH = r"""
import os, threading, time
mb = int(PARAMS["mb"])
res = {}
try:
    import mlx.core as mx
    gpu = mx.default_device() == mx.gpu
except Exception:
    gpu = False
if gpu:
    a = mx.ones((mb * 2**20 // 4,), dtype=mx.float32)
    mx.eval(a)
    best = 1e9
    for _ in range(10):
        t = time.perf_counter(); mx.eval(mx.sum(a)); best = min(best, time.perf_counter() - t)
    res = {"gbs": a.nbytes / best / 1e9, "method": f"mlx sum over {mb} MiB on the GPU, best of 10"}
else:
    import numpy as np
    n = os.cpu_count() or 1
    arrs = [np.ones(mb * 2**20 // 4 // n, dtype=np.float32) for _ in range(n)]
    best = 1e9
    for _ in range(10):
        ts = [threading.Thread(target=x.sum) for x in arrs]
        t = time.perf_counter()
        for th in ts: th.start()
        for th in ts: th.join()
        best = min(best, time.perf_counter() - t)
    res = {"gbs": sum(x.nbytes for x in arrs) / best / 1e9,
           "method": f"numpy sum over {mb} MiB on {n} CPU threads, best of 10"}
say("result", res)
"""


@dataclass
class ProbeError(Exception):
    host: str
    message: str

    def __str__(self):
        return f"probe on {self.host} failed: {self.message}"


def run_probe(host, code: str, params: dict, sopts: ssh.SshOptions, timeout: float = 60) -> object:
    """The probe's "result" answer; ProbeError names the host and why there is none."""
    try:
        r = remote.run(host, code, params, sopts, timeout=timeout)
    except OSError as e:
        raise ProbeError(host.name, str(e))
    if r.timed_out:
        raise ProbeError(host.name, f"no answer in {timeout:g} s")
    if r.rc != 0:
        raise ProbeError(host.name, ("\n".join(r.stderr).strip().splitlines() or [f"exit {r.rc}"])[-1])
    if "result" not in r.answers:
        other = "\n".join(r.other)
        raise ProbeError(host.name, f"unreadable output {other[-200:]!r}")
    return r.answers["result"]


def rank_stats(hosts, tag: str, marker: str, sopts: ssh.SshOptions, blas: bool = False) -> list[dict]:
    """Every rank process whose env has TAG_VAR=tag on these hosts: [{host, pid, cpu_s, rss_mb, peak_mb}],
    with blas: also the path of the BLAS library its matmuls use (Linux; None elsewhere)."""
    out = []
    for h in hosts:
        for r in run_probe(h, _RANK_STATS, {"tag": f"{TAG_VAR}={tag}", "marker": marker, "blas": blas}, sopts):
            out.append({"host": h.name, **r})
    return sorted(out, key=lambda r: (r["host"], r["pid"]))


class RankMonitor:
    """Idle CPU and peak memory of one cluster's ranks."""

    def __init__(self, hosts, tag: str, marker: str, sopts: ssh.SshOptions):
        self.hosts, self.tag, self.marker, self.sopts = hosts, tag, marker, sopts
        self.peak: dict[tuple, float] = {}

    def sample(self) -> list[dict]:
        stats = rank_stats(self.hosts, self.tag, self.marker, self.sopts)
        for r in stats:
            key = (r["host"], r["pid"])
            self.peak[key] = max(self.peak.get(key, 0.0), r["peak_mb"])
        return stats

    def blas(self) -> list:
        """Per rank (host, pid order), the BLAS library it runs: what a record reports."""
        return [r.get("blas") for r in rank_stats(self.hosts, self.tag, self.marker, self.sopts, blas=True)]

    def peak_mb(self) -> list[float]:
        self.sample()
        return [round(v, 1) for _, v in sorted(self.peak.items())]

    def idle_cpu(self, seconds: float) -> list[float]:
        """% of one core each rank used over `seconds` with no requests in flight."""
        before = {(r["host"], r["pid"]): r["cpu_s"] for r in self.sample()}
        t0 = time.perf_counter()
        time.sleep(seconds)
        after = self.sample()
        wall = time.perf_counter() - t0
        return [round(100 * (r["cpu_s"] - before[(r["host"], r["pid"])]) / wall, 2)
                for r in after if (r["host"], r["pid"]) in before]


def bandwidth(hosts, sopts: ssh.SshOptions, mb: int = 512) -> dict[str, dict]:
    """Measured memory read bandwidth per host: {host: {"gbs": float, "method": str}}."""
    return {h.name: run_probe(h, _BANDWIDTH, {"mb": mb}, sopts, timeout=120) for h in hosts}
