"""Helpers for launcher tests: run exolaunch as a user would, and find what it left behind."""

from __future__ import annotations

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
