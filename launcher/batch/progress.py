"""Batch progress on stderr: a rich bar on a terminal, a plain line every few seconds otherwise
(CI logs and pipes get readable lines, not cursor codes)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

PLAIN_INTERVAL_S = 5.0


def _eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class BatchProgress:
    """done/total requests, generated tokens/s over this run, ETA."""

    def __init__(self, total: int, already: int, stream: TextIO = sys.stderr, tty: Optional[bool] = None):
        self.total = total          # valid requests in the input
        self.done = already         # answered (ok, or failed after retries) including earlier runs
        self.to_do = total - already
        self.finished_now = 0       # answered by this run
        self.failed = 0
        self.tokens = 0             # completion tokens this run
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self._last_plain = self.t0
        self._rich = None
        self._task = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.t0 = self._last_plain = time.monotonic()
        if not self.tty:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._rich = Progress(
            TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[tok_s]:.1f} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(file=self.stream), transient=False)
        self._rich.start()
        self._task = self._rich.add_task("batch", total=self.total, completed=self.done, failed=0, tok_s=0.0)

    def stop(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    # -- updates --------------------------------------------------------------------------------
    def advance(self, ok: bool, completion_tokens: Optional[int]) -> None:
        self.done += 1
        self.finished_now += 1
        self.failed += 0 if ok else 1
        self.tokens += completion_tokens or 0
        if self._rich is not None:
            self._rich.update(self._task, advance=1, failed=self.failed, tok_s=self.tok_s())

    def tick(self) -> None:
        """Called a few times a second: keeps tok/s fresh, prints the plain line when due."""
        if self._rich is not None:
            self._rich.update(self._task, tok_s=self.tok_s())
        elif time.monotonic() - self._last_plain >= PLAIN_INTERVAL_S:
            self._last_plain = time.monotonic()
            self.log(self.line())

    def log(self, text: str) -> None:
        """Print a line without tearing the bar."""
        if self._rich is not None:
            self._rich.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    # -- numbers --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def tok_s(self) -> float:
        e = self.elapsed()
        return self.tokens / e if e > 0 else 0.0

    def eta(self) -> Optional[float]:
        left = self.total - self.done
        if self.finished_now == 0:
            return None
        return left * self.elapsed() / self.finished_now

    def line(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"exolaunch: batch: {self.done}/{self.total} done{failed}, {self.tok_s():.1f} tok/s, "
                f"ETA {_eta(self.eta())}")
