"""A per-step timeline of one rank, for profiling the lock-step loop (off unless asked for).

With EXOLAUNCH_STEP_TRACE=DIR set in the ranks' environment, every rank appends one JSON line per
step to DIR/rank-N.jsonl: how long each phase of its loop took, in seconds. Rank 0: `decide`
(choosing the next step), `send` (the decision to every rank), `apply` (keeps, removals,
inserts), `build` (Python building the step's mlx graph), `wait` (the rest of the step: waiting
for the forward and its all-reduces to finish), `dispatch` (detokenizing and handing tokens to the
API). A follower: `recv` (waiting for rank 0's decision), `apply`, `build`, `wait`.
scripts/profile_steps.py starts a cluster with it and prints medians per phase.

`build` is timed by wrapping the model's __call__ in this process: mlx runs the forward and its
collectives inside one lazy graph, so there is no clock to read between them without adding a
sync to every layer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV_STEP_TRACE = "EXOLAUNCH_STEP_TRACE"


class StepTrace:
    """Phase timer for one rank's step loop. `mark(name)` closes the phase that began at the
    previous mark; `end()` writes the step's line. Disabled: every call returns at once."""

    def __init__(self, rank: int, model=None, directory: str | None = None):
        directory = directory if directory is not None else os.environ.get(ENV_STEP_TRACE)
        self.enabled = bool(directory)
        self._phases: dict[str, float] = {}
        self._t = time.perf_counter()
        self._build = 0.0
        if not self.enabled:
            return
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(directory) / f"rank-{rank}.jsonl", "a", buffering=1)  # noqa: SIM115
        self._rank, self._step = rank, 0
        if model is not None:
            self._wrap(model)

    def _wrap(self, model) -> None:
        cls = type(model)
        call = cls.__call__
        trace = self

        def timed(self_, *a, **kw):
            t = time.perf_counter()
            try:
                return call(self_, *a, **kw)
            finally:
                trace._build += time.perf_counter() - t

        cls.__call__ = timed  # this rank's process only: tracing is a diagnostic mode

    def start(self) -> None:
        if self.enabled:
            self._t = time.perf_counter()
            self._phases = {}
            self._build = 0.0

    def mark(self, name: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        spent = now - self._t
        if name == "step":  # split the generator's call into graph building and waiting
            self._phases["build"] = self._phases.get("build", 0.0) + self._build
            self._phases["wait"] = self._phases.get("wait", 0.0) + spent - self._build
            self._build = 0.0
        else:
            self._phases[name] = self._phases.get(name, 0.0) + spent
        self._t = now

    def end(self, **extra) -> None:
        if not self.enabled:
            return
        self._step += 1
        line = {"rank": self._rank, "step": self._step, **{k: round(v, 6) for k, v in self._phases.items()}, **extra}
        self._file.write(json.dumps(line) + "\n")
        self._phases = {}
