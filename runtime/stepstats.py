"""What each rank measures about its own steps, for rank 0's /metrics (runtime/api/metrics.py).

The engine adds to a `StepStats` on every rank (a bisect and three adds per step: the step loop
gets nothing else); a follower sends `snapshot()` to rank 0 over the control channel every
second (runtime/control.py), rank 0 reads its own. Plain data, stdlib only.

Time in the step is the wall time of `BatchGenerator.next()`: this rank's forward *including*
its tensor-parallel all-reduces, which mlx runs inside one lazy graph (there is no point in
between to read a clock without adding a sync to every layer). `wait_seconds` is what a
follower spends, while requests run, waiting for rank 0's next decision and applying it: the
lock-step overhead rank 0's Python adds to every step.
"""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass, field

from runtime.contract import ENV_HOST

# Upper bounds (seconds) of the step-time histogram: a decode step is ms; a long prefill chunk, s.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.5, 5.0, 10.0)


@dataclass
class StepStats:
    steps: int = 0
    step_seconds: float = 0.0
    wait_seconds: float = 0.0
    last_step_seconds: float = 0.0
    prefix_queries: int | None = None  # rank 0, with a prefix cache: prompt tokens looked up
    prefix_hits: int = 0  # ... and found cached
    buckets: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS) + 1))  # last: +Inf

    def step(self, seconds: float, waited: float = 0.0) -> None:
        self.buckets[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
        self.steps += 1
        self.step_seconds += seconds
        self.wait_seconds += waited
        self.last_step_seconds = seconds

    def prefix_lookup(self, tokens: int, cached: int, enabled: bool = True) -> None:
        if enabled:
            self.prefix_queries = (self.prefix_queries or 0) + tokens
            self.prefix_hits += cached

    def snapshot(self) -> dict:
        """The numbers plus this process's memory (what rank 0 shows per rank)."""
        return {"steps": self.steps, "step_seconds": self.step_seconds, "wait_seconds": self.wait_seconds,
                "last_step_seconds": self.last_step_seconds, "buckets": list(self.buckets),
                "time": time.time(), **memory()}


def memory() -> dict:
    """This process's resident memory and mlx's own accounting (bytes; absent if unknown)."""
    out: dict = {"pid": os.getpid(), "host": os.environ.get(ENV_HOST, "")}
    try:
        import psutil

        out["rss_bytes"] = psutil.Process().memory_info().rss
    except Exception:  # noqa: BLE001 - memory is best effort; never fail a report for it
        pass
    try:
        import mlx.core as mx

        out["mlx_active_bytes"] = int(mx.get_active_memory())
        out["mlx_peak_bytes"] = int(mx.get_peak_memory())
    except Exception:  # noqa: BLE001
        pass
    return out
