"""Helpers for launcher tests: run exolaunch as a user would, and find what it left behind."""

from __future__ import annotations

import json
import re

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.procs import wait_no_processes

ROOT = Path(__file__).resolve().parent.parent
RANKPROG = str(ROOT / "tests" / "rankprog.py")


def token() -> str:
    """A unique word to put on rank command lines, so leftovers can be found by it."""
    return "tok" + uuid.uuid4().hex[:12]


def exolaunch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


def env_for_tests(**extra: str) -> dict:
    env = dict(os.environ)
    # Two "hosts" on one machine share a hostname, so OpenMPI's shared-memory transport would
    # collide between them; real hosts don't have that problem.
    env["OMPI_MCA_btl"] = "self,tcp"
    env.update(extra)
    return env


def rank_records(stdout: str) -> dict[int, dict]:
    """The JSON line each rank of a test rank program printed ({"rank": N, ...}), by rank."""
    ranks = {}
    for line in stdout.splitlines():
        m = re.search(r"(\{\"rank\".*)", line)
        if m:
            d = json.loads(m.group(1))
            ranks[d["rank"]] = d
    return ranks


def run(*args: str, timeout: float = 90, input: str | None = None, env: dict | None = None):
    return subprocess.run(exolaunch_argv(*args), capture_output=True, text=True, timeout=timeout,
                          input=input, env=env or env_for_tests(), cwd=ROOT)


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(exolaunch_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env or env_for_tests(), cwd=ROOT)


def wait_for_output(proc: subprocess.Popen, needle: str, count: int = 1, timeout: float = 30) -> str:
    """Read proc's stdout until `needle` was seen `count` times."""
    seen, out = 0, []
    deadline = time.monotonic() + timeout
    while seen < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {needle!r} x{count}; got {''.join(out)!r}")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"exolaunch ended before {needle!r} x{count}: {''.join(out)!r} "
                                 f"stderr={proc.stderr.read()!r}")
        out.append(line)
        seen += needle in line
    return "".join(out)


def assert_no_leftovers(tok: str, timeout: float = 10.0) -> None:
    left = wait_no_processes(tok, timeout=timeout)
    assert not left, f"processes left behind: {left}"


def yaml_hostfile(path: Path, cluster, slots: dict[str, int], backend: str | None = None,
                  extra_host: str = "") -> Path:
    """A hostfile for the test sshd: `slots` maps alias (h1..) to ranks on it."""
    lines = [f"ssh_config: {cluster.ssh_config}"]
    if backend:
        lines.append(f"backend: {backend}")
    lines.append("hosts:")
    by_alias = {h.alias: h for h in cluster.hosts}
    for alias, n in slots.items():
        h = by_alias[alias]
        lines.append(f"  - {{ssh: {alias}, ips: [{h.ip}], slots: {n}, python: {sys.executable}}}")
    if extra_host:
        lines.append(extra_host)
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServingCluster:
    """`exolaunch [--hostfile H] run MODEL` in the background, until it prints its URL.

    On exit: Ctrl-C (SIGINT), then check the exit status and that no rank is left."""

    def __init__(self, model: str, *args: str, hostfile=None, cache=None, ready_timeout: float = 180,
                 env: dict | None = None, data_port: int | str | None = "free"):
        """data_port: "free" (a free port picked here), None (no flag: run's own choice) or a port."""
        self.port = free_port()
        self.tok = token()
        g = ["--hostfile", str(hostfile)] if hostfile else []
        env = env_for_tests(**(env or {}), **({"EXOLAUNCH_CACHE": str(cache)} if cache else {}))
        if data_port == "free":
            from launcher.ports import free_data_port

            data_port = free_data_port(4)  # the control port below it and up to 4 ranks above are free
        dp = ["--data-port", str(data_port)] if data_port is not None else []
        # The token rides along as an env var on every rank, so leftover ranks can be found.
        self.proc = subprocess.Popen(
            exolaunch_argv(*g, "run", model, "--port", str(self.port), *dp,
                           "-x", "EXOLAUNCH_CACHE", "-x", f"EXOLAUNCH_TEST_TOKEN={self.tok}", *args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.err: list[str] = []
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import threading

        ready = threading.Event()

        def pump_err():
            for line in self.proc.stderr:
                self.err.append(line)
                if "exolaunch: serving" in line:
                    ready.set()

        def pump_out():
            for line in self.proc.stdout:
                self.err.append(line)

        threading.Thread(target=pump_err, daemon=True).start()
        threading.Thread(target=pump_out, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"cluster did not become ready (exit {self.proc.poll()}):\n{''.join(self.err)}")

    def rank_pids(self) -> list[int]:
        import psutil

        pids = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if "runtime serve" in cmd and "launcher.agent" not in cmd and \
                        p.environ().get("EXOLAUNCH_TEST_TOKEN") == self.tok:
                    pids.append(p.info["pid"])
            except (psutil.Error, OSError):
                continue
        return pids

    def stop(self, expect: int | None = 130) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
        code = self.proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while self.rank_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.rank_pids(), "rank processes left behind"
        if expect is not None:
            assert code == expect, f"exit {code}:\n{''.join(self.err)}"
        return code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop(expect=None)
