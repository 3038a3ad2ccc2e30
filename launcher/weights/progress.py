"""What `pull` shows while it works: one bar per host on a terminal, plain `host: ...` lines otherwise."""

from __future__ import annotations

import sys
import threading


class Progress:
    """One bar per host on a terminal (rich); plain `host: ...` lines otherwise."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.tasks: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.rich = None
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress as RP, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self.rich = RP(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(),
                           console=Console(file=self.stream), transient=False)
        self.enabled = enabled

    def __enter__(self):
        if self.rich:
            self.rich.start()
        return self

    def __exit__(self, *exc):
        if self.rich:
            self.rich.stop()

    def say(self, host: str, msg: str) -> None:
        if not self.enabled:
            return
        with self.lock:
            if self.rich:
                self.rich.console.print(f"{host}: {msg}", markup=False, highlight=False)
            else:
                print(f"{host}: {msg}", file=self.stream, flush=True)

    def start(self, host: str, total: int) -> None:
        if self.rich:
            with self.lock:
                self.totals[host] = max(total, 1)
                self.tasks[host] = self.rich.add_task(host, total=self.totals[host])

    def update(self, host: str, completed: int) -> None:
        if self.rich and host in self.tasks:
            with self.lock:
                self.rich.update(self.tasks[host], completed=min(completed, self.totals[host]))

    def finish(self, host: str) -> None:
        if self.rich and host in self.tasks:
            with self.lock:
                self.rich.update(self.tasks[host], completed=self.totals[host])
