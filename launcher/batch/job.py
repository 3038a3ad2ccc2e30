"""One `exolaunch batch` run: input -> journal -> (cluster) -> requests -> output + summary.

Order matters for the user: the input and the journal are checked before anything starts (a bad
file or a journal from another input costs nothing); a cluster is started only if something is
left to do; the output is rewritten from the journal on every way out (done, failure, Ctrl-C).

Exit status: 0 every request answered successfully; 1 some request failed after its retries or a
line was malformed (or the cluster died mid-batch without a status of its own); 2 bad input or
flags; `exolaunch run`'s status when the cluster could not be started or died; 128+N on signal N
(130 for Ctrl-C).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.batch.inputfile import BatchInput, BatchRequest, parse_input
from launcher.batch.journal import Journal, default_path, export
from launcher.batch.progress import BatchProgress
from launcher.errors import ConfigError, LaunchError
from launcher.ports import free_port
from launcher.served import RunOptions, ServedCluster
from runtime.contract import ENV_API_KEY

EXIT_FAILED = 1
SHOW_FAILURES = 5       # failures listed in the summary; the output has them all
CLUSTER_TAIL = 25       # lines of `exolaunch run` output shown when it dies


@dataclass
class BatchOptions:
    model: str
    input: Path
    output: Path
    journal: Optional[Path] = None
    restart: bool = False
    concurrency: int = 8
    max_retries: int = 2
    request_timeout: float = 600.0
    url: Optional[str] = None                  # a running server; else start `cluster`
    api_key: Optional[str] = None
    cluster: RunOptions = dataclasses.field(default_factory=RunOptions)
    verbose: bool = False


def say(msg: str) -> None:
    print(f"exolaunch: batch: {msg}", file=sys.stderr, flush=True)


def normalize_url(url: str) -> str:
    """The server's OpenAI base URL (…/v1); a bare http://host:port gets /v1."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ConfigError(f"--url {url!r}: expected the server's base URL, e.g. http://127.0.0.1:52415/v1.")
    return urllib.parse.urlunsplit((u.scheme, u.netloc, u.path.rstrip("/") or "/v1", "", ""))


def check_paths(o: BatchOptions) -> Path:
    """The journal path; refuses paths that would overwrite each other."""
    journal = Path(o.journal) if o.journal else default_path(o.output)
    if Path(o.output).is_dir():
        raise ConfigError(f"--output {o.output}: is a directory. Fix: name the results file, e.g. "
                          f"{Path(o.output) / 'results.jsonl'}.")
    if not Path(o.output).resolve().parent.is_dir():
        raise ConfigError(f"--output {o.output}: the directory {Path(o.output).parent} does not exist. Fix: create "
                          "it, or write the output somewhere else.")
    named = {"--input": Path(o.input).resolve(), "--output": Path(o.output).resolve(), "--journal": journal.resolve()}
    for a, b in (("--input", "--output"), ("--input", "--journal"), ("--output", "--journal")):
        if named[a] == named[b]:
            raise ConfigError(f"{a} and {b} are the same file ({named[a]}). Fix: give them different paths.")
    return journal


class _Signals:
    """SIGINT/SIGTERM/SIGHUP: while requests run, ask the job to stop cleanly (journal consistent,
    cluster torn down); otherwise, or on a second signal, raise KeyboardInterrupt."""

    def __init__(self):
        self.got: Optional[int] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stop: Optional[asyncio.Event] = None
        self._prev: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._prev[s] = signal.signal(s, self._on)
        return self

    def __exit__(self, *exc):
        for s, h in self._prev.items():
            signal.signal(s, h)

    def _on(self, signum, frame):
        first = self.got is None
        if first:
            self.got = signum
        if first and self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        else:
            raise KeyboardInterrupt


class BatchJob:
    def __init__(self, o: BatchOptions, inp: BatchInput, journal: Journal):
        self.o = o
        self.inp = inp
        self.journal = journal
        self.progress = BatchProgress(total=len(inp.requests), already=journal.already_ok)
        self.cluster: Optional[ServedCluster] = None
        self.cluster_died: Optional[int] = None
        self.engine_failed: Optional[str] = None   # the server's word that it cannot serve any more
        self.signals = _Signals()
        self.t_start = time.monotonic()
        self.t_requests: Optional[float] = None   # when the first request went out
        self.ok = 0
        self.failures: list[tuple[str, str, str]] = []   # (custom_id, code, message)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> int:
        o, inp = self.o, self.inp
        states = self.journal.states()
        todo = [r for r in inp.requests if states.get(r.custom_id) != "ok"]
        if self.journal.discarded:
            say(f"--restart: discarded the earlier journal {self.journal.path}; every request is sent again")
        if self.journal.already_ok:
            say(f"resuming: {self.journal.already_ok} of {len(inp.requests)} requests already done on a previous "
                f"run (journal {self.journal.path}); {len(todo)} to do")
        lines = 0
        with self.signals:
            try:
                try:
                    if todo:
                        base_url = normalize_url(o.url) if o.url else self._start_cluster()
                        self._send(todo, base_url)
                except KeyboardInterrupt:
                    self.signals.got = self.signals.got or signal.SIGINT
                finally:
                    self.progress.stop()
                    lines = export(self.journal, o.output)
            finally:
                self._stop_cluster()
        return self._summary(todo, lines)

    def _start_cluster(self) -> str:
        opts = self.cluster_options()
        how = f"exolaunch run{f' -n {opts.np}' if opts.np else ''}"
        shown = "its output follows" if self.o.verbose else "-v shows its output"
        say(f"starting a cluster for {self.o.model} ({how}; {shown})")
        self.cluster = ServedCluster(self.o.model, opts, echo=self.progress.log if self.o.verbose else None)
        try:
            self.cluster.start()
        except LaunchError as e:
            if self.o.verbose:  # its output is already on the screen
                raise LaunchError(f"batch: the cluster for {self.o.model} did not come up (exolaunch run exited "
                                  f"{e.status}); its output is above.", e.status) from None
            raise LaunchError(f"batch: {e}", e.status) from None
        c = self.cluster
        say(f"cluster up in {c.ready_at - c.started_at:.1f} s: {c.base_url} ({c.world_size} rank(s))")
        return c.base_url

    def cluster_options(self) -> RunOptions:
        c = self.o.cluster
        env = dict(c.env)
        if self.o.api_key:  # `run` reads it from the environment: never on a command line
            env[ENV_API_KEY] = self.o.api_key
        return dataclasses.replace(c, port=c.port or free_port(), env=env)

    def _send(self, todo: list[BatchRequest], base_url: str) -> None:
        from launcher.batch.runner import Runner, Settings

        settings = Settings(base_url=base_url, api_key=self.o.api_key, concurrency=self.o.concurrency,
                            max_retries=self.o.max_retries, request_timeout=self.o.request_timeout,
                            trust_env=self.cluster is None)

        async def main():
            stop = asyncio.Event()
            self.signals.loop, self.signals.stop = asyncio.get_running_loop(), stop
            if self.signals.got is not None:  # a signal came before the loop could hear it
                stop.set()
            runner = Runner(settings, self._on_done, stop, on_fatal=self._on_fatal)
            ticker = asyncio.create_task(self._tick(stop))
            try:
                await runner.run(todo)
            finally:
                ticker.cancel()
                self.signals.loop = self.signals.stop = None

        self.t_requests = time.monotonic()
        self.progress.start()
        asyncio.run(main())

    async def _tick(self, stop: asyncio.Event) -> None:
        while True:
            self.progress.tick()
            c = self.cluster
            if c is not None and c.proc is not None and c.proc.poll() is not None and not stop.is_set():
                self.cluster_died = c.proc.returncode
                stop.set()
            await asyncio.sleep(0.25)

    def _on_done(self, out) -> None:
        self.journal.record(out.request.custom_id, out.ok, out.line, out.attempts,
                            out.prompt_tokens, out.completion_tokens)
        if out.ok:
            self.ok += 1
            self.prompt_tokens += out.prompt_tokens or 0
            self.completion_tokens += out.completion_tokens or 0
        else:
            err = out.line["error"]
            self.failures.append((out.request.custom_id, err["code"], err["message"]))
            if self.o.verbose:
                self.progress.log(f"exolaunch: batch: {out.request.custom_id} (line {out.request.line}) failed: "
                                  f"{err['code']}: {err['message']}")
        self.progress.advance(out.ok, out.completion_tokens)

    def _on_fatal(self, message: str) -> None:
        if self.engine_failed is None:
            self.engine_failed = message
            self.progress.log(f"exolaunch: batch: the server's engine failed ({message}); stopping")

    def _stop_cluster(self) -> None:
        c = self.cluster
        if c is None or c.proc is None:
            return
        if self.engine_failed and self.cluster_died is None:
            # `run` is already tearing down the ranks: let it finish, and report its status.
            try:
                self.cluster_died = c.proc.wait(timeout=30)
            except Exception:
                pass
        if c.proc.poll() is None and self.signals.got is not None:
            # Ctrl-C on a terminal reaches `exolaunch run` too, and it is already tearing down;
            # a second SIGINT from us would make it kill the ranks without their grace period.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not self._cluster_interrupted():
                time.sleep(0.05)
            if self._cluster_interrupted():
                try:
                    c.proc.wait(timeout=30)
                except Exception:
                    pass
        c.stop()

    def _cluster_interrupted(self) -> bool:
        return any("exolaunch: interrupted by" in line for line in list(self.cluster.tail))

    # -- the end --------------------------------------------------------------------------------
    def _summary(self, todo: list[BatchRequest], lines: int) -> int:
        left = len(todo) - self.progress.finished_now  # pending, or failed earlier and not retried yet
        failed, malformed = len(self.failures), len(self.inp.malformed)
        n_all = len(self.inp.requests) + malformed
        head = ("interrupted" if self.signals.got is not None else
                "cluster died" if self.cluster_died is not None else
                "server failed" if self.engine_failed else "done")
        bad_lines = ""
        if malformed:
            nums = ", ".join(str(m.line) for m in self.inp.malformed[:10]) + (", …" if malformed > 10 else "")
            bad_lines = f" (line{'s' if malformed > 1 else ''} {nums})"
        say(f"{head}: {self.ok} ok, {failed} failed, {malformed} malformed{bad_lines}, {self.journal.already_ok} "
            f"already done on a previous run ({n_all} request{'s' if n_all != 1 else ''})")
        # Failures grouped by their error: a dead server gives one line, not one per request.
        groups: dict[tuple[str, str], list[str]] = {}
        for cid, code, message in self.failures:
            groups.setdefault((code, message), []).append(cid)
        for (code, message), ids in list(groups.items())[:SHOW_FAILURES]:
            shown = ", ".join(ids[:3]) + (f", … ({len(ids)} requests)" if len(ids) > 3 else "")
            print(f"  {shown}: {code}: {message}", file=sys.stderr)
        if len(groups) > SHOW_FAILURES:
            print(f"  … and {len(groups) - SHOW_FAILURES} other errors (each failed request has its error in the "
                  "output)", file=sys.stderr)
        wall = time.monotonic() - self.t_start
        if self.t_requests is not None:
            req_s = time.monotonic() - self.t_requests
            rate = self.completion_tokens / req_s if req_s > 0 else 0.0
            say(f"tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion; {rate:.1f} completion "
                f"tok/s over {req_s:.1f} s of requests; wall time {wall:.1f} s")
        say(f"output: {self.o.output} ({lines} line{'s' if lines != 1 else ''}); journal: {self.journal.path}")
        if left:
            say(f"{left} request{'s' if left != 1 else ''} not answered yet: run the same command again to finish "
                "(done ones are not sent again)")
        if self.signals.got is not None:
            return 128 + self.signals.got
        if self.cluster_died is not None:
            tail = "".join(list(self.cluster.tail)[-CLUSTER_TAIL:]).rstrip()
            say(f"the cluster stopped during the batch (exolaunch run exited {self.cluster_died}); its last output:\n"
                f"{tail}")
            return self.cluster_died or EXIT_FAILED
        if self.engine_failed:
            say(f"stopped: the server's engine failed: {self.engine_failed}")
            return EXIT_FAILED
        return EXIT_FAILED if failed or malformed or left else 0


def run(o: BatchOptions) -> int:
    if o.concurrency < 1:
        raise ConfigError(f"--concurrency {o.concurrency}: expected 1 or more requests in flight.")
    if o.max_retries < 0:
        raise ConfigError(f"--max-retries {o.max_retries}: expected 0 or more.")
    if o.request_timeout <= 0:
        raise ConfigError(f"--request-timeout {o.request_timeout:g}: expected seconds greater than 0.")
    if o.url:
        normalize_url(o.url)
    journal_path = check_paths(o)
    inp = parse_input(o.input, o.model)
    if not inp.requests and not inp.malformed:
        raise ConfigError(f"--input {o.input}: no requests in it. Fix: one JSON request per line "
                          '({"custom_id": …, "method": "POST", "url": "/v1/chat/completions", "body": {…}}).')
    journal = Journal.open(journal_path, inp, o.model, restart=o.restart)
    for m in inp.malformed:  # after the journal check: a refused run shows only why
        print(m.message, file=sys.stderr)
    try:
        return BatchJob(o, inp, journal).run()
    finally:
        journal.close()
