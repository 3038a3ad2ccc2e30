"""Running code on the hosts outside a job: a Python snippet on one host, the child processes
of a task over many hosts, and the per-host result such a task reports.

A snippet runs under the host's python, started directly for `ssh: local` hosts and through
the system ssh client with exolaunch's options (launcher.ssh) for the others. Nothing of it
passes through the remote shell: the remote command is only

    exec '<python>' -u -c 'import sys,json;exec(json.loads(sys.stdin.buffer.readline()))'

stdin's first line is the snippet's source as a JSON string, the second its parameters as JSON
(the snippet sees them as PARAMS); what follows belongs to the snippet (doctor's pings, the
file frames of a staged copy). The snippet answers with say(kind, obj), a line
`@@<kind> <json>` on stdout; any other output (a login banner, a stray print) is ignored.
Snippets meet whatever python a host has (3.8 or later): standard library only.

Every process started here leads its own process group, so Ctrl-C reaches only exolaunch,
which then stops them. A timeout, a cancelled task, or leaving a snippet that is still running
kills the whole group, and on Linux the leader also dies with exolaunch (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from launcher import ssh
from launcher.agent import die_with_parent
from launcher.backends import host_python
from launcher.hostfile import Host

MARK = "@@"
_BOOT = "import sys,json;exec(json.loads(sys.stdin.buffer.readline()))"
# Opens every snippet. `from __future__` must come first in a source, and lets snippets write
# `X | None` annotations on any python. PARAMS is read from the binary layer so that a snippet
# may go on reading stdin as text or as bytes.
_PRELUDE = f"""from __future__ import annotations
import json, sys
def say(kind, obj):
    sys.stdout.write({MARK!r} + kind + " " + json.dumps(obj) + "\\n")
    sys.stdout.flush()
PARAMS = json.loads(sys.stdin.buffer.readline())
"""


# ----------------------------------------------------------------------------- processes


def start(argv: list[str], **kw) -> subprocess.Popen:
    """Popen as the leader of a new session (process group) that, on Linux, dies with us."""
    return subprocess.Popen(argv, start_new_session=True,
                            preexec_fn=die_with_parent if sys.platform == "linux" else None, **kw)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group `proc` leads (everything it started that did not leave it)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Children:
    """The processes of one task over several hosts (a stage, a pull), stopped together on
    Ctrl-C: once stopped, starting another raises KeyboardInterrupt."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._stopped = False

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        with self._lock:
            if self._stopped:
                raise KeyboardInterrupt
            p = start(argv, **kw)
            self._procs.append(p)
            return p

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every group still running, SIGKILL any leader that outlives `grace` seconds."""
        with self._lock:
            self._stopped = True
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                kill_group(p, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                kill_group(p)

    def run_threads(self, jobs: list[Callable[[], None]]) -> None:
        """Run each job in its own thread and wait for all of them; on Ctrl-C stop every child
        and re-raise."""
        threads = [threading.Thread(target=job, daemon=True) for job in jobs]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)  # short joins: the main thread must see KeyboardInterrupt
        except KeyboardInterrupt:
            self.stop_all()
            raise


# ----------------------------------------------------------------------------- snippets


def snippet_argv(host: Host, python: str, sopts: ssh.SshOptions) -> list[str]:
    remote = [python, "-u", "-c", _BOOT]
    return remote if host.is_local else ssh.remote_argv(sopts, host, remote)


class Snippet:
    """One snippet running on one host; a context manager that kills its process group if it
    is still running on the way out. Raises OSError when the process cannot start."""

    def __init__(self, host: Host, code: str, params: dict, sopts: ssh.SshOptions, *,
                 python: str | None = None, children: Children | None = None):
        self.host = host
        self.python = python or host_python(host)
        self.started = time.perf_counter()
        self.killed = False  # we ended it (timeout, or it would not exit)
        self.stderr: collections.deque[str] = collections.deque(maxlen=200)
        self.other: collections.deque[str] = collections.deque(maxlen=20)  # stdout that was no answer
        self._answers: queue.Queue = queue.Queue()
        argv = snippet_argv(host, self.python, sopts)
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        self.proc = children.popen(argv, **pipes) if children else start(argv, **pipes)
        self._pumps = [threading.Thread(target=self._read_stdout, daemon=True),
                       threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._pumps:
            t.start()
        self.send(json.dumps(_PRELUDE + code) + "\n" + json.dumps(params) + "\n")

    def __enter__(self) -> Snippet:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(MARK):
                kind, _, payload = line[len(MARK):].partition(" ")
                try:
                    self._answers.put((kind, json.loads(payload)))
                    continue
                except ValueError:
                    pass
            self.other.append(line)
        self._answers.put(None)

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip("\n"))

    def send(self, data: str | bytes) -> bool:
        """Write to the snippet's stdin; False once it no longer reads."""
        try:
            self.proc.stdin.write(data.encode() if isinstance(data, str) else data)
            self.proc.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def answers(self, deadline: float | None = None) -> Iterator[tuple[str, object]]:
        """(kind, payload) in order until stdout ends; TimeoutError once time.perf_counter()
        passes deadline."""
        while True:
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                raise TimeoutError
            try:
                item = self._answers.get(timeout=left)
            except queue.Empty:
                raise TimeoutError from None
            if item is None:
                self._answers.put(None)  # the end stays visible to the next reader
                return
            yield item

    def expect(self, kind: str, deadline: float | None = None) -> object:
        """The next answer of this kind (others are passed over); EOFError if stdout ends first."""
        for k, obj in self.answers(deadline):
            if k == kind:
                return obj
        raise EOFError(kind)

    def wait(self, timeout: float | None = None) -> int:
        """Close stdin and return the exit status; past `timeout` seconds, kill the group first."""
        self.close_stdin()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.killed = True
            kill_group(self.proc)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def errors(self, join: float = 5.0) -> list[str]:
        """stderr's last lines, once its reader saw the end (or `join` seconds passed)."""
        self._pumps[1].join(timeout=join)
        return list(self.stderr)


@dataclass
class SnippetResult:
    answers: dict  # kind -> its last payload
    stderr: list[str]
    rc: int | None
    timed_out: bool = False
    other: list[str] = field(default_factory=list)  # the last stdout lines that were no answer


def run(host: Host, code: str, params: dict, sopts: ssh.SshOptions, *, python: str | None = None,
        children: Children | None = None, on_answer: Callable[[str, object], None] | None = None,
        timeout: float | None = None) -> SnippetResult:
    """Run a snippet to its end (stdin closes after the parameters), passing each answer to
    on_answer as it comes. Raises OSError when it cannot start."""
    deadline = None if timeout is None else time.perf_counter() + timeout
    with Snippet(host, code, params, sopts, python=python, children=children) as s:
        s.close_stdin()
        got: dict = {}
        timed_out = False
        try:
            for kind, obj in s.answers(deadline):
                got[kind] = obj
                if on_answer:
                    on_answer(kind, obj)
            rc = s.wait(None if deadline is None else max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            timed_out = True
            s.kill()
            rc = s.proc.returncode
        return SnippetResult(got, s.errors(), rc, timed_out or s.killed, list(s.other))


# ----------------------------------------------------------------------------- per-host results


@dataclass
class HostResult:
    """One host's part in a task run on every host (a check, a copy, a fetch)."""

    name: str
    error: str | None = None  # why it failed on that host; None when it went well

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Report:
    """Every host's result of one task; `table` gives the rows that render as aligned text."""

    hosts: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list:
        return [h for h in self.hosts if not h.ok]

    def host(self, name: str):
        return next(h for h in self.hosts if h.name == name)

    def table(self) -> tuple[list[str], list[list[str]]]:
        raise NotImplementedError

    def table_lines(self) -> list[str]:
        header, rows = self.table()
        widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
        return ["  ".join(str(cell).ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "hosts": [dataclasses.asdict(h) for h in self.hosts]}
