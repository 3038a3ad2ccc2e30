"""`run --restart N` (torchrun's --max-restarts): relaunch a served cluster after a rank dies,
hangs or its host drops.

After a failure: back off (1, 2, 4 … at most 30 s), run the doctor's checks on every host
again, and relaunch. A host the checks cannot reach is gone: the planner is asked for a layout
on the hosts that remain and, if the model fits there, the cluster relaunches on them (one
line says so); if it does not fit, one line says which memory is missing and the loop keeps
retrying the full cluster. Every relaunch attempt counts as one restart, up to N; each is one
line starting "exolaunch: restart K/N". Ctrl-C (or SIGTERM) ends the loop at any point.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from launcher.frontdoor import ClusterState

INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)


@dataclass
class Policy:
    max_restarts: int = 0
    backoff: float = 1.0        # the first wait; doubled for each restart after it
    backoff_max: float = 30.0

    def delay(self, restart: int) -> float:
        return min(self.backoff_max, self.backoff * 2 ** max(0, restart - 1))


@dataclass
class Attempt:
    """One launch: the hosts it uses (`np` of them, as with -n), and the plan for them."""
    hostfile: object
    np: int | None
    plan: object | None


def without(hostfile, gone: list[str]):
    return dataclasses.replace(hostfile, hosts=[h for h in hostfile.hosts if h.name not in gone])


def missing_memory(plan) -> str:
    """Why a plan does not fit, in one clause: the ranks short of memory, or the layout's problem."""
    short = [r for r in plan.ranks if not r.fits]
    if short:
        return "; ".join(f"{r.host} needs {r.need_gb:.2f} GB for rank {r.rank}, has "
                         f"{'?' if r.usable_gb is None else f'{r.usable_gb:.2f}'} GB usable" for r in short)
    return "; ".join(plan.layout.problems) or "the layout cannot run"


class Restarter:
    """Runs `launch(attempt) -> exit status` until it ends well, is interrupted, or N restarts
    are spent. `check(hostfile)` is the doctor (None with --skip-doctor); `replan(hostfile)` the
    planner for a set of hosts (None when the model is unknown to it)."""

    def __init__(self, policy: Policy, state: ClusterState, *, launch: Callable[[Attempt], int],
                 check: Callable | None, replan: Callable, say: Callable[[str], None],
                 on_change: Callable[[ClusterState], None] | None = None):
        self.policy, self.state = policy, state
        self.launch, self.check, self.replan, self.say = launch, check, replan, say
        self.on_change = on_change or (lambda st: None)
        self.stop = threading.Event()
        self.signal: int | None = None
        self.failed_at: float | None = None

    def _interrupt(self, signum, frame) -> None:
        self.signal = signum
        self.stop.set()

    def run(self, first: Attempt) -> int:
        prev = {}
        if threading.current_thread() is threading.main_thread():
            # The supervisor installs its own handlers while ranks run and restores these after.
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                prev[s] = signal.signal(s, self._interrupt)
        try:
            return self._loop(first)
        finally:
            for s, h in prev.items():
                signal.signal(s, h)

    def _loop(self, attempt: Attempt) -> int:
        full = attempt
        while True:
            status = self.launch(attempt)
            if status == 0 or status in INTERRUPTED or self.stop.is_set():
                return status if not self.signal else 128 + self.signal
            self.failed_at = self.failed_at or time.monotonic()
            why = self.state.last_failure or f"the cluster exited with status {status}"
            nxt = self._next_attempt(full, why)
            if nxt is None:
                return status if not self.signal else 128 + self.signal
            attempt = nxt

    def _next_attempt(self, full: Attempt, why: str) -> Attempt | None:
        """Back off and check until there is something to launch (each pass is one restart);
        None: the restarts are spent or we were interrupted."""
        st, p = self.state, self.policy
        while True:
            if st.restarts >= p.max_restarts:
                if p.max_restarts:
                    self.say(f"giving up after {st.restarts} restart(s) (--restart {p.max_restarts}): {why}")
                return None
            st.restarts += 1
            delay = p.delay(st.restarts)
            st.last_failure = why
            st.expected_ready = time.monotonic() + delay + st.load_seconds
            st.set("restarting", f"restart {st.restarts}/{p.max_restarts} after: {why}")
            self.on_change(st)
            self.say(f"restart {st.restarts}/{p.max_restarts} in {delay:g} s: {why}")
            if self.stop.wait(delay):
                return None
            if self.check is None:
                return full
            report = self.check(full.hostfile, full.np)
            if self.stop.is_set():
                return None
            gone = [h for h in report.hosts if not h.reachable]
            if not gone:
                if report.ok:
                    return Attempt(full.hostfile, full.np, self.replan(full.hostfile, full.np) or full.plan)
                why = "the checks failed: " + "; ".join(x.line() for x in report.errors)
                continue
            names = [h.name for h in gone]
            detail = "; ".join(f"{h.name}: {(h.error or 'unreachable').strip().splitlines()[-1]}" for h in gone)
            from launcher.backends import first_slots

            used = first_slots(full.hostfile, full.np) if full.np else full.hostfile
            remaining = without(used, names)
            if not remaining.hosts:
                why = f"every host is unreachable ({detail})"
                continue
            plan = self.replan(remaining, None)
            model = st.model
            if plan is not None and not plan.fits:
                why = (f"{', '.join(names)} gone ({detail}) and {model} does not fit on "
                       f"{', '.join(h.name for h in remaining.hosts)}: {missing_memory(plan)}; "
                       "retrying the full cluster")
                self.say(why)
                continue
            layout = (f"{plan.sharding} over {len(plan.ranks)} rank(s)" if plan is not None
                      else f"{sum(h.slots for h in remaining.hosts)} slot(s), unplanned")
            self.say(f"{', '.join(names)} gone ({detail}): re-planned {model} on "
                     f"{', '.join(h.name for h in remaining.hosts)}: {layout}")
            return Attempt(remaining, None, plan)
