"""Measure every launcher failure path over real SSH on loopback: detection and teardown time.

    python scripts/failure_paths.py [--backend ring|mpi] [--repeats N]

Starts a throwaway sshd on 127.0.0.2/127.0.0.3 (tests/sshd.py), runs 2 ranks (one per host),
triggers each failure from outside at a known instant, and prints: time from the trigger to
exolaunch's exit (detection + teardown), the teardown part as exolaunch reports it, the exit
status, and how long until no rank process was left. Needs root (sshd), like the tests.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.launch_helpers import RANKPROG, exolaunch_argv, env_for_tests, token, yaml_hostfile  # noqa: E402
from tests.procs import find_processes  # noqa: E402
from tests.sshd import SshCluster  # noqa: E402


def rank_procs(tok: str) -> list[psutil.Process]:
    return [psutil.Process(pid) for pid, cmd in find_processes(tok)
            if cmd.startswith(sys.executable) and "rankprog" in cmd and "ssh" not in cmd.split()[0]]


def launch(hf: Path, tok: str, *extra: str, mode=("sleep",)):
    p = subprocess.Popen(exolaunch_argv("--hostfile", str(hf), "exec", *extra, "--", "python",
                                        RANKPROG, *mode, tok),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for_tests())
    return p


def wait_up(p, n=2):
    seen = 0
    while seen < n:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("exolaunch ended early: " + p.stderr.read())
        seen += " up" in line


def finish(p, t0: float, tok: str) -> dict:
    code = p.wait(timeout=60)
    t_exit = time.monotonic() - t0
    err = p.stderr.read()
    m = re.search(r"stopped, ([\d.]+) s after teardown began", err)
    while find_processes(tok) and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    return {"exit": code, "total": t_exit, "teardown": float(m.group(1)) if m else None,
            "clean": time.monotonic() - t0}


def scenario(name, cluster, hf, backend):
    tok = token()
    extra = ("--backend", backend)
    if name == "rank exits 7":
        p = launch(hf, tok, *extra, mode=("fail", "1", "7", "1.0"))
        wait_up(p, 1)
        t0 = time.monotonic() + 1.0  # the rank exits 1.0 s after printing 'up' (± a few ms)
        return finish(p, t0, tok)
    if name == "--timeout 3":
        t0 = time.monotonic() + 3.0
        return finish(launch(hf, tok, *extra, "--timeout", "3"), t0, tok)
    if name == "--ready-timeout 3":
        t0 = time.monotonic() + 3.0
        return finish(launch(hf, tok, *extra, "--ready-timeout", "3", mode=("ready-except", "1")), t0, tok)
    p = launch(hf, tok, *extra)
    wait_up(p)
    t0 = time.monotonic()
    if name == "rank SIGKILLed":
        rank_procs(tok)[-1].kill()
    elif name == "SIGINT to exolaunch":
        p.send_signal(signal.SIGINT)
    elif name == "SIGTERM to exolaunch":
        p.send_signal(signal.SIGTERM)
    elif name == "SIGKILL to exolaunch":
        p.kill()
    elif name == "rank SIGSTOPped":
        rank_procs(tok)[-1].suspend()
    elif name == "ssh session killed":
        for pid in cluster.session_pids():
            try:
                if any(tok in " ".join(c.cmdline()) for c in psutil.Process(pid).children(recursive=True)):
                    psutil.Process(pid).kill()
                    break
            except psutil.NoSuchProcess:
                pass
    elif name == "remote host frozen":
        frozen = []
        for pid in cluster.session_pids():
            try:
                kids = psutil.Process(pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            if any(tok in " ".join(c.cmdline()) for c in kids):
                frozen = kids
                break
        for k in frozen:
            k.suspend()
        code = p.wait(timeout=60)
        total = time.monotonic() - t0
        for k in frozen:
            try:
                k.resume()
            except psutil.NoSuchProcess:
                pass
        r = {"exit": code, "total": total, "teardown": None}
        while find_processes(tok) and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        r["clean"] = time.monotonic() - t0
        return r
    return finish(p, t0, tok)


SCENARIOS = ["rank exits 7", "rank SIGKILLed", "SIGINT to exolaunch", "SIGTERM to exolaunch",
             "SIGKILL to exolaunch", "ssh session killed", "rank SIGSTOPped", "remote host frozen",
             "--timeout 3", "--ready-timeout 3"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="ring", choices=["ring", "mpi"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with SshCluster(n_hosts=2) as cluster, tempfile.TemporaryDirectory() as d:
        hf = yaml_hostfile(Path(d) / "hosts.yaml", cluster, {"h1": 1, "h2": 1})
        print(f"backend {args.backend}, 2 ranks on 2 sshd hosts (loopback), heartbeat timeout 5 s, "
              f"grace 5 s, median of {args.repeats}")
        print(f"{'failure':24} {'exit':>5} {'trigger->exit s':>16} {'teardown s':>11} {'no process left s':>18}")
        for name in SCENARIOS:
            if args.backend == "mpi" and name in ("ssh session killed", "remote host frozen"):
                continue  # mpirun owns those connections; covered by its own daemons
            runs = [scenario(name, cluster, hf, args.backend) for _ in range(args.repeats)]
            med = lambda k: statistics.median(r[k] for r in runs if r[k] is not None) \
                if any(r[k] is not None for r in runs) else float("nan")  # noqa: E731
            print(f"{name:24} {runs[0]['exit']:>5} {med('total'):>16.2f} {med('teardown'):>11.2f} {med('clean'):>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
