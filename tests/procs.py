"""Process-table helpers for tests (e.g. proving no orphaned rank survives)."""

from __future__ import annotations

import os
import time

import psutil


def _excluded_pids() -> set[int]:
    """The current (pytest) process and all of its ancestors."""
    pids = {os.getpid()}
    try:
        for p in psutil.Process().parents():
            pids.add(p.pid)
    except psutil.Error:
        pass
    return pids


def find_processes(pattern: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of live processes whose command line contains ``pattern``.

    Zombies (already dead, just not reaped yet) are ignored, as are the
    current process and its ancestors.
    """
    excluded = _excluded_pids()
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["pid"] in excluded or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(p.info["cmdline"] or [])
            if pattern in cmdline:
                found.append((p.info["pid"], cmdline))
        except psutil.Error:
            continue
    return found


def wait_no_processes(pattern: str, timeout: float = 10.0, interval: float = 0.1) -> list[str]:
    """Poll until no process whose cmdline contains ``pattern`` is alive.

    Returns the command lines still alive when ``timeout`` elapsed; an empty
    list means clean. Excludes the current process and its ancestors.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = find_processes(pattern)
        if not alive or time.monotonic() >= deadline:
            return [f"[{pid}] {cmd}" for pid, cmd in alive]
        time.sleep(interval)
