"""Rank agent: runs on every host, one per rank, between the supervisor and the rank's program.

Started as `python -m launcher.agent` (locally, over SSH, or by mpirun). Standard library only,
so it starts fast and works in any interpreter that has exolaunch installed.

Why an agent at all: SSH cannot deliver signals and mlx's ring backend hangs or spins when a peer
misbehaves. The agent gives every rank the same guarantees on every host:
- the program runs in its own session; the agent kills that whole process group on the way out;
- if the supervisor goes away (its stdin closes, a write to it fails, or the agent is re-parented)
  the program is terminated, so a dropped SSH connection never leaves an orphan;
- it reports started / ready / heartbeat / stopped (SIGSTOP) / exit, and the rank's phase
  milestones (launcher.rankapi.phase), as control frames.

Wire format, agent -> supervisor (one frame per line on stdout):
    \\x1e<kind><rank>:<payload>\\n
kind: o / e = a complete stdout / stderr line, p / q = a partial line (no newline yet),
c = a JSON control event. Supervisor -> agent (stdin, only in framed mode): a first line with the
JSON spec, then `d <n>\\n<n bytes>` (data for the program's stdin), `eof` or `sig <n>`.
Under mpirun (`--mpi NAME`) the spec is in the environment variable NAME (base64 JSON, forwarded
by mpirun's `-x NAME`, so no value is on any command line; it is kept out of the program's
environment) and stdin is the program's raw stdin.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from launcher.blas import rank_env as rank_blas_env
from launcher.oversubscription import rank_env as oversubscribed_env
from launcher.rankapi import PHASE_PREFIX
from runtime.contract import ENV_CONTROL_FD

FRAME = b"\x1e"
MPI_SPEC_ENV = "EXOLAUNCH_AGENT_SPEC_"  # + app context number: a host's spec under mpirun
PARTIAL_FLUSH_S = 0.15  # emit an unterminated line (a prompt) after this much quiet


class Link:
    """Serialized frames to the supervisor; remembers when the supervisor has gone."""

    def __init__(self, rank: int):
        self.rank = rank
        self.lost = False

    def send(self, kind: bytes, payload: bytes) -> None:
        if self.lost:
            return
        data = FRAME + kind + str(self.rank).encode() + b":" + payload + b"\n"
        try:
            view = memoryview(data)
            while view:
                n = os.write(1, view)
                view = view[n:]
        except OSError:  # EPIPE: the SSH channel or the supervisor is gone
            self.lost = True

    def event(self, ev: str, **fields) -> None:
        self.send(b"c", json.dumps({"ev": ev, **fields}).encode())


class LineSplitter:
    """Turns a byte stream into complete lines plus timed partial flushes."""

    def __init__(self, full: bytes, partial: bytes, link: Link):
        self.buf = b""
        self.full, self.partial, self.link = full, partial, link
        self.last = 0.0

    def feed(self, data: bytes) -> None:
        self.buf += data
        self.last = time.monotonic()
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self.link.send(self.full, line)
        if len(self.buf) > 65536:
            self.flush()

    def flush(self, force: bool = False) -> None:
        if self.buf and (force or time.monotonic() - self.last >= PARTIAL_FLUSH_S):
            self.link.send(self.partial, self.buf)
            self.buf = b""


def _status_of(wait_status: int) -> tuple[int, int | None]:
    """(exit code as a shell reports it, signal number or None)."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return 128 + sig, sig
    return os.WEXITSTATUS(wait_status), None


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child before exec (Linux): SIGKILL it when its parent dies, even by SIGKILL, so a
    rank never outlives its agent (nor mpirun its supervisor). macOS has no equivalent;
    there the stdin-EOF and EPIPE paths cover every ending but a SIGKILL of the parent."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def _write_files(files: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """Write backend files (e.g. MLX_HOSTFILE) to a private temp dir; env var -> path."""
    if not files:
        return None, {}
    d = tempfile.mkdtemp(prefix="exolaunch-")
    env = {}
    for i, (var, content) in enumerate(sorted(files.items())):
        path = os.path.join(d, f"{i}-{var.lower()}.json")
        with open(path, "w") as f:
            f.write(content)
        env[var] = path
    return d, env


class Agent:
    def __init__(self, spec: dict, framed_stdin: bool):
        self.spec = spec
        self.rank = int(spec["rank"])
        self.link = Link(self.rank)
        self.framed = framed_stdin
        self.grace = float(spec.get("grace", 5.0))
        self.hb_interval = float(spec.get("heartbeat", 1.0))
        self.proc: subprocess.Popen | None = None
        self.status: int | None = None
        self.term_deadline: float | None = None  # set once we decided to end the program
        self.stdin_buf = b""
        self.ppid = os.getppid()

    # -- program lifecycle -------------------------------------------------------------
    def start(self) -> bool:
        spec = self.spec
        self.tmpdir, file_env = _write_files(spec.get("files", {}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(MPI_SPEC_ENV)}
        env.update(spec.get("env", {}))
        env.update(file_env)
        blas_env, blas_error = rank_blas_env(env)
        if blas_error:
            return self._failed_to_start(blas_error, 1)
        env.update(blas_env)
        env.update(oversubscribed_env(env))
        ctl_r, ctl_w = os.pipe()
        env[ENV_CONTROL_FD] = str(ctl_w)
        argv = list(spec["argv"])
        cwd = spec.get("cwd") or None
        if cwd and not os.path.isdir(cwd):
            return self._failed_to_start(f"working directory {cwd!r} does not exist on this host", 1)
        exe = shutil.which(argv[0], path=env.get("PATH")) if "/" not in argv[0] else argv[0]
        try:
            self.proc = subprocess.Popen(
                [exe or argv[0]] + argv[1:],
                env=env,
                cwd=cwd,
                stdin=subprocess.PIPE if spec.get("stdin") else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(ctl_w,),
                start_new_session=True,  # own process group: we can kill the whole tree
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        except FileNotFoundError:
            return self._failed_to_start(f"command not found: {argv[0]}", 127)
        except PermissionError:
            return self._failed_to_start(f"permission denied: {argv[0]}", 126)
        except OSError as e:
            return self._failed_to_start(f"cannot start {argv[0]}: {e}", 126)
        finally:
            os.close(ctl_w)
        self.ctl_r = ctl_r
        self.link.event("started", pid=self.proc.pid, hostname=socket.gethostname())
        return True

    def _failed_to_start(self, msg: str, code: int) -> bool:
        self.link.send(b"e", f"exolaunch agent: {msg}".encode())
        self.link.event("exit", code=code, signal=None, error=msg)
        self.status = code
        return False

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self, why: str | None = None) -> None:
        """SIGTERM the program's group now, SIGKILL it after the grace period."""
        if self.term_deadline is None:
            if why:
                self.link.send(b"e", f"exolaunch agent: {why}; terminating rank {self.rank}".encode())
            self.signal_group(signal.SIGTERM)
            self.signal_group(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.term_deadline = time.monotonic() + self.grace

    # -- main loop ---------------------------------------------------------------------
    def run(self) -> int:
        if not self.start():
            return self.status or 1
        proc = self.proc
        assert proc is not None
        out = LineSplitter(b"o", b"p", self.link)
        err = LineSplitter(b"e", b"q", self.link)
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        for fd in streams:
            os.set_blocking(fd, False)
        watch = set(streams) | {self.ctl_r}
        stdin_fd = 0 if (self.framed or proc.stdin) else None
        if stdin_fd is not None:
            watch.add(stdin_fd)
        self._parse_frames()  # frames that arrived together with the spec
        next_hb = 0.0
        stopped = False
        exited_at = None

        while True:
            now = time.monotonic()
            if now >= next_hb:
                self.link.event("hb")
                next_hb = now + self.hb_interval
            if self.status is None:
                try:
                    pid, st = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED | os.WCONTINUED)
                except ChildProcessError:
                    pid, st = proc.pid, 0
                if pid == proc.pid:
                    if os.WIFSTOPPED(st):
                        if not stopped:
                            self.link.event("stopped", signal=os.WSTOPSIG(st))
                        stopped = True
                    elif os.WIFCONTINUED(st):
                        stopped = False
                        self.link.event("continued")
                    else:
                        self.status, _ = _status_of(st)
                        self.sig = _status_of(st)[1]
                        proc.returncode = self.status
                        exited_at = now
                        # Leftover children of the rank (its session) must not outlive it.
                        self.signal_group(signal.SIGKILL)
            if self.link.lost or (self.framed is False and os.getppid() != self.ppid):
                self.terminate("lost the supervisor")
            if self.term_deadline is not None and self.status is None and now >= self.term_deadline:
                self.signal_group(signal.SIGKILL)
            # Done once the program exited and its output is drained (bounded: grandchildren
            # may hold the pipes; they were killed with the group above).
            if self.status is not None and (not (watch & set(streams)) or now - exited_at > 2.0):
                break

            try:
                ready, _, _ = select.select(list(watch), [], [], 0.05 if self.status is None else 0.02)
            except InterruptedError:
                continue
            for fd in ready:
                if fd in streams:
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if data:
                        streams[fd].feed(data)
                    else:
                        watch.discard(fd)
                elif fd == self.ctl_r:
                    data = os.read(fd, 4096)
                    if not data:
                        watch.discard(fd)
                    for line in data.decode(errors="replace").split():
                        if line in ("ready", "hb") or line.startswith(PHASE_PREFIX):
                            self.link.event(line)
                elif fd == stdin_fd:
                    self._on_stdin(watch)
            for s in streams.values():
                s.flush()

        for s in streams.values():
            s.flush(force=True)
        self.link.event("exit", code=self.status, signal=getattr(self, "sig", None))
        return self.status

    def _on_stdin(self, watch: set) -> None:
        data = os.read(0, 65536)
        if not self.framed:  # mpirun mode: raw stdin for the program (rank 0 only)
            if not data:
                watch.discard(0)
                self._close_child_stdin()
            else:
                self._to_child(data)
            return
        if not data:  # the supervisor / SSH channel is gone: never leave the rank behind
            watch.discard(0)
            self.terminate("connection to exolaunch closed")
            return
        self.stdin_buf += data
        self._parse_frames()

    def _parse_frames(self) -> None:
        while b"\n" in self.stdin_buf:
            head, rest = self.stdin_buf.split(b"\n", 1)
            if head.startswith(b"d "):
                n = int(head[2:])
                if len(rest) < n:
                    break
                self._to_child(rest[:n])
                self.stdin_buf = rest[n:]
            else:
                self.stdin_buf = rest
                if head == b"eof":
                    self._close_child_stdin()
                elif head.startswith(b"sig "):
                    sig = int(head[4:])
                    if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                        self.terminate()
                    else:
                        self.signal_group(sig)

    def _to_child(self, data: bytes) -> None:
        if self.proc and self.proc.stdin:
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def _close_child_stdin(self) -> None:
        if self.proc and self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


def _mpi_spec(name: str) -> dict:
    """Under mpirun one spec covers a host; pick this rank's entry from the MPI env."""
    if not name.startswith(MPI_SPEC_ENV) or name not in os.environ:
        raise SystemExit(f"exolaunch agent: --mpi {name}: no such spec variable in the environment")
    host_spec = json.loads(base64.b64decode(os.environ[name]))
    rank = None
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        if var in os.environ:
            rank = int(os.environ[var])
            break
    if rank is None:
        raise SystemExit("exolaunch agent: --mpi given but no MPI rank in the environment")
    spec = dict(host_spec)
    per_rank = host_spec["ranks"][str(rank)]
    spec.update(per_rank)
    spec["rank"] = rank
    spec["stdin"] = rank == 0
    return spec


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    framed = True
    if argv[:1] == ["--mpi"]:
        framed = False
        spec = _mpi_spec(argv[1] if len(argv) > 1 else "")
    else:
        # Read the spec line straight from fd 0: a buffered reader would swallow the frames
        # that follow it.
        buf = b""
        while b"\n" not in buf:
            chunk = os.read(0, 65536)
            if not chunk:
                return 1
            buf += chunk
        line, rest = buf.split(b"\n", 1)
        spec = json.loads(line)

    agent = Agent(spec, framed_stdin=framed)
    if framed:
        agent.stdin_buf = rest

    def on_signal(signum, _frame):
        agent.terminate(f"received signal {signum}")

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        return agent.run()
    finally:
        agent.signal_group(signal.SIGKILL)
        if getattr(agent, "tmpdir", None):
            shutil.rmtree(agent.tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
