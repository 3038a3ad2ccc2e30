"""A served cluster as a building block: `exolaunch run MODEL` in a child process, up until its
URL is printed, torn down with Ctrl-C semantics. `batch` and `bench` start their clusters
through this, so they get exactly what a user gets from `run` (plan, doctor, readiness).

The child gets SIGTERM if this process dies (Linux), so a killed job never orphans its ranks.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.errors import LaunchError

READY = re.compile(r"exolaunch: serving .* on (\d+) rank\(s\): (http://\S+/v1)")


@dataclass
class RunOptions:
    """The `exolaunch run` flags a job needs; None means run's own default."""
    hostfile: Optional[Path] = None
    topology: Optional[Path] = None
    np: Optional[int] = None
    backend: Optional[str] = None
    sharding: Optional[str] = None
    port: Optional[int] = None
    data_port: Optional[int] = None
    blas: Optional[str] = None                # --blas: auto | openblas | bundled | PATH
    env: dict = field(default_factory=dict)  # set in the child and forwarded to every rank
    extra: tuple = ()                         # more `run` flags, verbatim
    ready_timeout: float = 900.0


def run_argv(model: str, o: RunOptions) -> list[str]:
    g = []
    if o.hostfile:
        g += ["--hostfile", str(o.hostfile)]
    if o.topology:
        g += ["--topology", str(o.topology)]
    argv = [sys.executable, "-m", "launcher", *g, "run", model, "--no-tag-output",
            "--ready-timeout", str(o.ready_timeout)]
    for flag, value in (("-n", o.np), ("--backend", o.backend), ("--sharding", o.sharding),
                        ("--port", o.port), ("--data-port", o.data_port), ("--blas", o.blas)):
        if value is not None:
            argv += [flag, str(value)]
    for name in o.env:
        argv += ["-x", name]
    return argv + list(o.extra)


def _child_setup() -> None:
    from launcher.agent import die_with_parent

    die_with_parent(signal.SIGTERM)  # SIGTERM: `run` then tears its ranks down in order


class ServedCluster:
    """Context manager: `with ServedCluster("demo-llama", RunOptions(np=2)) as c: c.base_url`."""

    def __init__(self, model: str, options: RunOptions | None = None, *, log: Optional[Path] = None,
                 echo=None):
        self.model = model
        self.options = options or RunOptions()
        self.log_path = log
        self.echo = echo          # callable(line) to show the child's output live, or None
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.proc: subprocess.Popen | None = None
        self.base_url: str | None = None
        self.world_size = 0
        self.started_at = 0.0     # time.perf_counter() when the child was spawned
        self.ready_at = 0.0

    def start(self) -> "ServedCluster":
        o = self.options
        env = {**os.environ, **{k: str(v) for k, v in o.env.items()}}
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            run_argv(self.model, o), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, env=env, preexec_fn=_child_setup if sys.platform == "linux" else None)
        ready = threading.Event()
        logf = open(self.log_path, "a") if self.log_path else None

        def pump():
            for line in self.proc.stdout:
                self.tail.append(line)
                if logf:
                    logf.write(line)
                    logf.flush()
                if self.echo:
                    self.echo(line.rstrip("\n"))
                m = READY.search(line)
                if m and not ready.is_set():
                    self.world_size, self.base_url = int(m.group(1)), m.group(2)
                    ready.set()
            if logf:
                logf.close()

        threading.Thread(target=pump, daemon=True, name="served-cluster-output").start()
        deadline = time.monotonic() + o.ready_timeout + 30
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.stop()
                raise LaunchError(f"the cluster for {self.model} did not come up (exolaunch run exited {code}); "
                                  f"its last output:\n{''.join(self.tail).rstrip()}", status=code or 1)
        self.ready_at = time.perf_counter()
        return self

    def stop(self, grace: float = 30.0) -> int:
        """Ctrl-C the cluster and wait for every rank to be gone; exolaunch run's exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
