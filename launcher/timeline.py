"""`run`'s one-line launch timeline, printed once the cluster serves:

    exolaunch: ready in 8.1 s: plan 0.6, preflight 1.1, ranks up 4.0, weights 7.0, warm 7.5, api 8.1

Seconds since the command started (interpreter start-up included, up to STARTUP_BOUND_S of it
before the launcher's first import: a process that ran something else before it exec'd Python,
as scripts/demo.sh installs first, is not charged for that), each from a real timestamp
taken in this process: the launcher's own steps as they end (plan, preflight), each runtime
phase when the last rank reports it (launcher.rankapi.phase, carried by the agent as an event:
ranks up = the mx.distributed group formed, weights = shard loaded, warm = runtime/warm.py done)
and api when the front door's readiness probe of rank 0 first succeeds. A phase no rank
reported (an older exolaunch on a host) is left out rather than guessed.
"""

from __future__ import annotations

import time

from launcher.rankapi import PHASE_PREFIX, PHASES

LABELS = {"up": "ranks up", "weights": "weights", "warm": "warm"}


STARTUP_BOUND_S = 0.5  # Python's start-up to our first import: ~0.05-0.1 s here, a cold cache more


def process_start() -> float:
    """This process's start on the time.monotonic() clock."""
    from launcher import IMPORTED_AT

    try:
        return max(time.monotonic() - _age(), IMPORTED_AT - STARTUP_BOUND_S)
    except Exception:  # no answer: count from the launcher's first import
        return IMPORTED_AT


def _age() -> float:
    """Seconds since this process started. Linux: its start tick against CLOCK_BOOTTIME, both
    counted from boot (psutil's create_time adds the boot time, which /proc rounds to the
    second, and was 0.6 s off here); elsewhere psutil's create_time (exact on macOS)."""
    import os

    if hasattr(time, "CLOCK_BOOTTIME") and os.path.exists("/proc/self/stat"):
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22, starttime; fields[0] is field 3
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


class Timeline:
    def __init__(self, start: float | None = None):
        self.start = process_start() if start is None else start
        self.marks: list[tuple[str, float]] = []  # the launcher's steps, in order
        self.reached: dict[str, float] = {}  # rank phase -> when its last rank reported it
        self._ranks: dict[str, set[int]] = {}
        self.world = 0

    def mark(self, name: str) -> None:
        self.marks.append((name, time.monotonic()))

    def launching(self, world: int) -> None:
        """A (re)launch of `world` ranks begins: forget the phases of an earlier one."""
        self.world, self.reached, self._ranks = world, {}, {}

    def on_event(self, name: str, st) -> None:
        """supervisor.Options.on_event: note phase events, per rank."""
        if not name.startswith(PHASE_PREFIX):
            return
        phase = name[len(PHASE_PREFIX):]
        ranks = self._ranks.setdefault(phase, set())
        ranks.add(st.spec.rank)
        if len(ranks) >= self.world and phase not in self.reached:
            self.reached[phase] = time.monotonic()

    def render(self, api_at: float | None = None) -> str:
        """The line (without the `exolaunch: ` prefix); api_at: when the API answered (now)."""
        api_at = time.monotonic() if api_at is None else api_at
        items = self.marks + [(LABELS[p], self.reached[p]) for p in PHASES if p in self.reached]
        items.append(("api", api_at))
        fields = ", ".join(f"{name} {t - self.start:.1f}" for name, t in items)
        return f"ready in {api_at - self.start:.1f} s: {fields}"
