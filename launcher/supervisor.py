"""Supervisor: start every rank, tag its output, watch readiness and heartbeats, tear down, exit.

Each *channel* is one local OS process whose stdout carries agent frames (see launcher.agent):
an agent run locally, an `ssh` running the agent on a host, or (backend mpi) mpirun, which
carries the frames of all its ranks. A reader thread per channel stream feeds one queue;
the main loop owns all state, so there are no locks around rank state.

Exit status (documented in README):
  0 all ranks exited 0;  N the status of the first rank that failed (128+S if killed by signal S);
  2 bad input (hostfile, flags);  3 a rank did not report ready within --ready-timeout;
  4 a rank stopped responding (no heartbeat, or stopped by SIGSTOP) for --heartbeat-timeout;
  124 --timeout expired;  130 / 143 exolaunch got SIGINT / SIGTERM;
  255 a host could not be reached, or its SSH connection was lost.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from launcher import ssh
from launcher.agent import die_with_parent
from launcher.backends import LaunchSpec, RankSpec
from launcher.backends import mpi as mpi_backend

FRAME = 0x1E
EXIT_NOT_READY = 3
EXIT_UNRESPONSIVE = 4
EXIT_TIMEOUT = 124
EXIT_SSH = 255


@dataclass
class Options:
    tag_output: bool = True
    log_dir: Path | None = None
    timeout: float | None = None
    ready_timeout: float | None = None  # ranks must call ready() within this (None: started = up)
    start_timeout: float = 30.0  # on top of the SSH connect timeout
    heartbeat_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    grace: float = 5.0
    forward_stdin: bool = True
    ssh: ssh.SshOptions = field(default_factory=ssh.SshOptions)
    on_all_ready: Callable[[], None] | None = None
    on_event: Callable[[str, "RankState"], None] | None = None
    on_teardown: Callable[[int, str], None] | None = None  # (status, why) the moment teardown begins
    quiet: bool = False  # no supervisor messages on stderr (library use)


@dataclass
class RankState:
    spec: RankSpec
    channel: "Channel"
    started: float | None = None
    ready: bool = False
    last_hb: float = 0.0
    stopped_since: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    pid: int | None = None

    @property
    def label(self) -> str:
        return f"rank {self.spec.rank} on {self.spec.host.name}"


class Channel:
    def __init__(self, name: str, argv: list[str], ranks: list[int], q: queue.SimpleQueue,
                 framed: bool, env: dict | None = None, first_line: bytes | None = None):
        self.name, self.ranks, self.framed = name, ranks, framed
        self.stderr_tail: list[str] = []
        self.eof = False
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=mpi_backend.mpirun_env({**os.environ, **(env or {})}) if not framed else {**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C reaches exolaunch only; we tear down in order
            # mpirun does not notice its parent dying; ssh and agents do (stdin EOF).
            preexec_fn=die_with_parent if (not framed and sys.platform == "linux") else None,
        )
        if first_line is not None:
            self.send(first_line)
        threading.Thread(target=self._read, args=(self.proc.stdout, "line", q), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, "stderr", q), daemon=True).start()

    def _read(self, stream, kind: str, q: queue.SimpleQueue) -> None:
        for line in iter(stream.readline, b""):
            q.put((kind, self, line))
        q.put((kind + "-eof", self, None))

    def send(self, data: bytes) -> None:
        with self.lock:
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass

    def close_stdin(self) -> None:
        with self.lock:
            try:
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass

    def terminate(self) -> None:
        if self.framed:
            self.send(f"sig {int(signal.SIGTERM)}\n".encode())
        else:  # mpirun forwards SIGTERM to its ranks, then kills them
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.close_stdin()  # agents kill their rank when the channel closes
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _sweep_stale_workdirs() -> None:
    """Remove job dirs whose exolaunch died without cleaning up (SIGKILL): the pid in the name
    is gone. Another user's or a live job's dir is left alone."""
    for d in Path("/tmp").glob("exl-*-*"):
        pid = d.name.split("-")[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        shutil.rmtree(d, ignore_errors=True)


class Supervisor:
    def __init__(self, launch: LaunchSpec, opts: Options | None = None):
        self.launch = launch
        self.opts = opts or Options()
        # SimpleQueue: its put() is reentrant. The signal handlers below put into it from the main
        # thread, which may be inside get() holding a Queue's lock: a Queue deadlocked there
        # (exolaunch ignored every SIGTERM after that).
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.channels: list[Channel] = []
        self.ranks: dict[int, RankState] = {}
        self.failure: tuple[int, str] | None = None
        self.tearing_since: float | None = None
        self.killed = False
        self.all_ready = False
        self.at_bol: dict[tuple[int, int], bool] = {}
        self.logs: dict[int, object] = {}
        _sweep_stale_workdirs()
        # /tmp keeps ssh ControlPath short (104-byte socket paths on macOS).
        self.workdir = Path(tempfile.mkdtemp(prefix=f"exl-{os.getpid()}-", dir="/tmp"))

    # -- output ------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if not self.opts.quiet:
            sys.stderr.write(f"exolaunch: {msg}\n")
            sys.stderr.flush()

    def _emit(self, rank: int, stream: int, payload: bytes, newline: bool) -> None:
        out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
        data = payload + (b"\n" if newline else b"")
        key = (rank, stream)
        if self.opts.tag_output and self.at_bol.get(key, True):
            host = self.ranks[rank].spec.host.name if rank in self.ranks else "?"
            data = f"[{rank}@{host}] ".encode() + data
        self.at_bol[key] = newline
        out.write(data)
        out.flush()
        if self.opts.log_dir is not None:
            log = self.logs.get(rank)
            if log is None:
                self.opts.log_dir.mkdir(parents=True, exist_ok=True)
                log = self.logs[rank] = open(self.opts.log_dir / f"rank-{rank}.log", "ab")
            log.write(payload + (b"\n" if newline else b""))
            log.flush()

    # -- start -------------------------------------------------------------------------
    def _ssh_opts(self) -> ssh.SshOptions:
        o = self.opts.ssh
        hf = self.launch.hostfile
        return ssh.SshOptions(
            connect_timeout=o.connect_timeout,
            host_key_check=o.host_key_check,
            config=o.config or hf.ssh_config,
            options={**(hf.ssh_options or {}), **(o.options or {})},
        )

    def _agent_spec(self, s: RankSpec) -> dict:
        return {
            "rank": s.rank,
            "argv": s.argv,
            "env": s.env,
            "files": s.files,
            "cwd": s.cwd,
            "stdin": s.rank == 0 and self.opts.forward_stdin,
            "grace": self.opts.grace,
            "heartbeat": self.opts.heartbeat_interval,
        }

    def start(self) -> None:
        sopts = self._ssh_opts()
        if self.launch.backend == "mpi":
            agent = ssh.base_argv(ssh.SshOptions(
                connect_timeout=sopts.connect_timeout, host_key_check=sopts.host_key_check,
                config=sopts.config, options=sopts.options))
            argv, env = mpi_backend.mpirun_command(
                self.launch, ssh_agent=agent, workdir=self.workdir,
                grace=self.opts.grace, heartbeat=self.opts.heartbeat_interval)
            ch = Channel("mpirun", argv, [s.rank for s in self.launch.ranks], self.q, framed=False, env=env)
            self.channels.append(ch)
            for s in self.launch.ranks:
                self.ranks[s.rank] = RankState(s, ch)
        else:
            self._start_agents(sopts)
        if self.opts.forward_stdin:
            threading.Thread(target=self._forward_stdin, daemon=True).start()

    def _start_agents(self, sopts: ssh.SshOptions) -> None:
        """One channel per rank. Per remote host the first rank's ssh becomes the multiplexing
        master; the host's other ranks start once its socket exists (starting them together
        races for the socket and loses multiplexing)."""
        hosts: dict[str, list[RankSpec]] = {}
        for s in self.launch.ranks:
            hosts.setdefault(s.host.name, []).append(s)
        waiting = []
        for i, specs in enumerate(hosts.values()):
            if specs[0].host.is_local:
                for s in specs:
                    self._start_channel(s, [s.python, "-m", "launcher.agent"])
                continue
            control = str(self.workdir / f"c{i}")
            self._start_channel(specs[0], ssh.agent_argv(sopts, specs[0].host, specs[0].python, control))
            if len(specs) > 1:
                waiting.append((control, specs[1:]))
        deadline = time.monotonic() + sopts.connect_timeout
        while waiting:
            ready = [w for w in waiting if os.path.exists(w[0]) or time.monotonic() > deadline]
            for control, specs in ready:
                mux = control if os.path.exists(control) else None  # master failed: connect directly
                for s in specs:
                    self._start_channel(s, ssh.agent_argv(sopts, s.host, s.python, mux))
                waiting.remove((control, specs))
            if waiting:
                time.sleep(0.02)

    def _start_channel(self, s: RankSpec, argv: list[str]) -> None:
        first = json.dumps(self._agent_spec(s)).encode() + b"\n"
        ch = Channel(s.host.name, argv, [s.rank], self.q, framed=True, first_line=first)
        self.channels.append(ch)
        self.ranks[s.rank] = RankState(s, ch)

    def _forward_stdin(self) -> None:
        """Our stdin goes to rank 0 only, as with mpirun."""
        ch = self.ranks[0].channel
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            fd = None
        while fd is not None:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            ch.send(b"d %d\n" % len(data) + data if ch.framed else data)
        if ch.framed:
            ch.send(b"eof\n")
        elif ch.proc.poll() is None:
            ch.close_stdin()

    # -- events ------------------------------------------------------------------------
    def _on_line(self, ch: Channel, line: bytes) -> None:
        now = time.monotonic()
        if line[:1] != bytes([FRAME]):
            # Not from an agent: mpirun's own messages, a login banner, or a remote shell's
            # error such as "No module named launcher". Shown, and kept for error messages.
            text = line.decode(errors="replace").rstrip("\r\n")
            ch.stderr_tail = (ch.stderr_tail + [text])[-5:]
            sys.stderr.write(f"[{ch.name}] {text}\n")
            return
        kind = line[1:2]
        head, _, payload = line[2:].partition(b":")
        try:
            rank = int(head)
        except ValueError:
            return
        if payload.endswith(b"\n"):
            payload = payload[:-1]
        st = self.ranks.get(rank)
        if st is None:
            return
        st.last_hb = now
        if kind in (b"o", b"e", b"p", b"q"):
            self._emit(rank, 1 if kind in (b"o", b"p") else 2, payload, kind in (b"o", b"e"))
            return
        if kind != b"c":
            return
        try:
            ev = json.loads(payload)
        except ValueError:
            return
        name = ev.get("ev")
        if name == "started":
            st.started, st.pid = now, ev.get("pid")
        elif name == "ready":
            st.ready = True
        elif name == "stopped":
            st.stopped_since = now
        elif name == "continued":
            st.stopped_since = None
        elif name == "exit":
            st.exit_code, st.signal, st.error = ev.get("code"), ev.get("signal"), ev.get("error")
            if st.exit_code != 0 and self.tearing_since is None:
                how = (f"was killed by {_signal_name(st.signal)}" if st.signal
                       else f"exited with status {st.exit_code}")
                self.teardown(st.exit_code or 1, f"{st.label} {how}" + (f" ({st.error})" if st.error else ""))
        if name != "hb" and self.opts.on_event:
            self.opts.on_event(name, st)
        self._check_ready()

    def _check_ready(self) -> None:
        if self.all_ready or self.tearing_since is not None:
            return
        need_ready = self.opts.ready_timeout is not None
        if all((s.ready if need_ready else s.started) for s in self.ranks.values()):
            self.all_ready = True
            if self.opts.on_all_ready:
                self.opts.on_all_ready()

    def _on_channel_end(self, ch: Channel) -> None:
        code = ch.proc.wait()
        lost = [self.ranks[r] for r in ch.ranks if self.ranks[r].exit_code is None]
        if not lost or self.tearing_since is not None:
            return
        tail = "; ".join(t for t in ch.stderr_tail if t.strip())[-400:]
        st = lost[0]
        if st.started is None:
            if ch.framed and not st.spec.host.is_local:
                msg = f"could not start {st.label}: ssh exited with status {code}" + (f": {tail}" if tail else "")
                if code != EXIT_SSH:
                    msg += (f". Check that exolaunch is installed for {st.spec.python!r} on "
                            f"{st.spec.host.name} (set `python:` for that host in the hostfile)")
            else:
                msg = f"could not start {st.label}: {ch.name} exited with status {code}" + (f": {tail}" if tail else "")
            self.teardown(EXIT_SSH if code == EXIT_SSH else (code or 1), msg)
        else:
            what = "the SSH connection was lost" if not st.spec.host.is_local else "its agent died"
            self.teardown(EXIT_SSH if ch.framed else (code or 1),
                          f"lost {st.label}: {what} (exit {code})" + (f": {tail}" if tail else ""))

    def _tick(self, t0: float) -> None:
        now = time.monotonic()
        o = self.opts
        if self.tearing_since is not None:
            if not self.killed and now - self.tearing_since > o.grace + 2.0:
                self.killed = True
                for ch in self.channels:
                    ch.kill()
            return
        if o.timeout is not None and now - t0 > o.timeout:
            self.teardown(EXIT_TIMEOUT, f"the job exceeded --timeout {o.timeout:g} s")
            return
        for st in self.ranks.values():
            if st.exit_code is not None:
                continue
            if st.started is None:
                if now - t0 > o.ssh.connect_timeout + o.start_timeout:
                    self.teardown(EXIT_SSH, f"{st.label} did not start within "
                                            f"{o.ssh.connect_timeout + o.start_timeout:g} s")
                    return
                continue
            if st.stopped_since is not None and now - st.stopped_since > o.heartbeat_timeout:
                self.teardown(EXIT_UNRESPONSIVE, f"{st.label} is frozen: its process {st.pid} has been "
                                                 f"stopped (SIGSTOP) for {now - st.stopped_since:.1f} s")
                return
            if now - st.last_hb > o.heartbeat_timeout:
                self.teardown(EXIT_UNRESPONSIVE, f"{st.label} stopped responding: no heartbeat for "
                                                 f"{now - st.last_hb:.1f} s (host frozen or network down)")
                self._kill_unresponsive(st)
                return
        if o.ready_timeout is not None and not self.all_ready and now - t0 > o.ready_timeout:
            late = [s for s in self.ranks.values() if not s.ready]
            names = ", ".join(s.label for s in late)
            self.teardown(EXIT_NOT_READY, f"not ready within --ready-timeout {o.ready_timeout:g} s: {names}. "
                                          "A rank that never finishes distributed init usually means a peer "
                                          "cannot reach its data-plane address (check ips and ports)")

    def _kill_unresponsive(self, st: RankState) -> None:
        """An agent that sends no heartbeat will not act on SIGTERM either: cut it off now.
        A remote agent kills its rank when it sees the channel close (once its host thaws)."""
        if st.spec.host.is_local and st.pid:
            try:
                os.killpg(st.pid, signal.SIGKILL)  # the rank leads its own process group
            except (ProcessLookupError, PermissionError):
                pass
        if st.channel.framed:
            st.channel.kill()

    def teardown(self, status: int, message: str) -> None:
        if self.tearing_since is not None:
            return
        self.tearing_since = time.monotonic()
        if self.failure is None:
            self.failure = (status, message)
        self.say(message + "; stopping all ranks")
        if self.opts.on_teardown:
            self.opts.on_teardown(status, message)
        for ch in self.channels:
            if ch.proc.poll() is None:
                ch.terminate()

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> int:
        t0 = time.monotonic()
        prev = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                prev[s] = signal.signal(s, lambda n, f: self.q.put(("signal", None, n)))
        try:
            self.start()
            open_streams = {(id(ch), k) for ch in self.channels for k in ("line", "stderr")}
            ended: set[int] = set()
            while len(ended) < len(self.channels):
                try:
                    kind, ch, data = self.q.get(timeout=0.1)
                except queue.Empty:
                    kind = None
                if kind == "line":
                    self._on_line(ch, data)
                elif kind == "stderr":
                    text = data.decode(errors="replace").rstrip("\r\n")
                    ch.stderr_tail = (ch.stderr_tail + [text])[-5:]
                    if not self.opts.quiet:
                        sys.stderr.write(f"[{ch.name}] {text}\n")
                elif kind in ("line-eof", "stderr-eof"):
                    open_streams.discard((id(ch), kind[:-4]))
                    if (id(ch), "line") not in open_streams and (id(ch), "stderr") not in open_streams:
                        ended.add(id(ch))
                        self._on_channel_end(ch)
                elif kind == "signal":
                    if self.tearing_since is None:
                        self.teardown(128 + data, f"interrupted by {_signal_name(data)}")
                    elif not self.killed:  # a second Ctrl-C: no more grace
                        self.killed = True
                        self.say("second interrupt: killing all ranks now")
                        for c in self.channels:
                            c.kill()
                self._tick(t0)
                if self.tearing_since is not None and time.monotonic() - self.tearing_since > self.opts.grace + 10:
                    self.say("some channels did not close; giving up on them")
                    for c in self.channels:
                        c.kill()
                    break
        finally:
            for c in self.channels:
                if c.proc.poll() is None:
                    c.kill()
                    try:
                        c.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
            for s, h in prev.items():
                signal.signal(s, h)
            for f in self.logs.values():
                f.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self.failure is not None:
            took = time.monotonic() - self.tearing_since
            self.say(f"all {len(self.ranks)} ranks stopped, {took:.1f} s after teardown began")
            return self.failure[0]
        bad = [s for s in self.ranks.values() if s.exit_code != 0]
        return bad[0].exit_code or 1 if bad else 0


def run(launch: LaunchSpec, opts: Options | None = None) -> int:
    return Supervisor(launch, opts).run()
