"""Detached jobs (`run -d`): the per-user job directory, each job's record, and its keeper.

One directory per job under jobs_dir() (EXOLAUNCH_JOBS_DIR, else $XDG_STATE_HOME/exolaunch/jobs,
else ~/.local/state/exolaunch/jobs):

    job.json     what was started: id, model, hosts, argv, cwd, created (written once, before start)
    pids.json    the keeper's and the launcher's pid and start time (written by the keeper)
    ready.json   url, ranks, when it became ready (the keeper, once the log says "serving")
    exit.json    how the launcher ended: code or signal (the keeper)
    status.json  the running launcher's own view: front-door state, restarts, hosts (the launcher)
    stop.json    that `exolaunch stop` asked it to end (so an orderly stop is not called a failure)
    launcher.log the launcher's stdout and stderr

Every file has one writer, so no locking. The keeper (`python -m launcher.jobs DIR`) is the
job's session leader and the launcher's parent: it waits for the launcher to record how it
ended, even a SIGKILL. If the keeper itself dies, the launcher gets SIGTERM (Linux) and tears
down in order. The ranks never outlive the launcher: local agents read their stdin from it (EOF
ends them) and each rank has PR_SET_PDEATHSIG on its agent; a remote agent sees its SSH
channel close.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.served import READY  # the line `run` prints once every rank has loaded

ENV_JOBS_DIR = "EXOLAUNCH_JOBS_DIR"
ENV_JOB_ID = "EXOLAUNCH_JOB_ID"  # set in a detached launcher: it must not detach again
LOG = "launcher.log"
RESTARTS = re.compile(r"exolaunch: restart (\d+)")


def jobs_dir() -> Path:
    if os.environ.get(ENV_JOBS_DIR):
        return Path(os.environ[ENV_JOBS_DIR])
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "exolaunch" / "jobs"


def new_id() -> str:
    return secrets.token_hex(3)


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def start_time(pid: int) -> float | None:
    """When process pid started, or None if it is gone (or a zombie): with the pid it names one
    process, so a reused pid is never mistaken for the job's."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except (psutil.Error, OSError):
        return None


def _alive(pid: int | None, started: float | None) -> bool:
    if not pid:
        return False
    now = start_time(pid)
    return now is not None and (started is None or abs(now - started) < 1.0)


@dataclass
class Job:
    dir: Path

    @property
    def id(self) -> str:
        return self.dir.name

    @property
    def log(self) -> Path:
        return self.dir / LOG

    def record(self) -> dict:
        return read_json(self.dir / "job.json") or {}

    def pids(self) -> dict:
        return read_json(self.dir / "pids.json") or {}

    def ready(self) -> dict | None:
        return read_json(self.dir / "ready.json")

    def status(self) -> dict | None:
        """What a running launcher publishes about itself (launcher.cli_run: state, restarts,
        world_size, hosts after a re-plan), or None."""
        return read_json(self.dir / "status.json")

    def exit(self) -> dict | None:
        return read_json(self.dir / "exit.json")

    def stop_requested(self) -> bool:
        return (self.dir / "stop.json").exists()

    def launcher_alive(self) -> bool:
        p = self.pids()
        return _alive(p.get("launcher"), p.get("launcher_started"))

    def keeper_alive(self) -> bool:
        p = self.pids()
        return _alive(p.get("keeper"), p.get("keeper_started"))

    def running(self) -> bool:
        if self.exit() is not None:
            return False
        return self.keeper_alive() or self.launcher_alive() or self._just_created()

    def _just_created(self) -> bool:
        """Between `run -d` writing job.json and the keeper writing its pids."""
        return not self.pids() and time.time() - self.record().get("created", 0) < 10

    def state(self) -> str:
        """starting | serving | stopping | stopped | exited N | failed N | dead (...)"""
        ex = self.exit()
        if ex is None:
            if self.launcher_alive():
                if self.stop_requested():
                    return "stopping"
                phase = (self.status() or {}).get("state")  # the front door's: starting, restarting, …
                if phase and phase != "ready":
                    return phase
                return "serving" if self.ready() else "starting"
            if self.keeper_alive():
                return "starting" if not self.pids().get("launcher") else "exiting"
            if not self.pids():
                return "starting" if self._just_created() else "dead (never started)"
            return "dead (its keeper was killed)"
        sig, code = ex.get("signal"), ex.get("code")
        if sig:
            name = _signal_name(sig)
            if self.stop_requested() and sig in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM):
                return "stopped" if sig != signal.SIGKILL else "stopped (killed)"
            return f"dead (launcher killed by {name})"
        if self.stop_requested() and code in (0, 130, 143):
            return "stopped"
        return "exited 0" if code == 0 else f"failed {code}"

    def uptime(self) -> float | None:
        """Seconds since the job became ready, while it runs."""
        r = self.ready()
        if r is None or self.exit() is not None or not self.running():
            return None
        return max(0.0, time.time() - r.get("at", time.time()))

    def restarts(self) -> int:
        """Restarts the launcher made (run --restart): its status file if it writes one, else the
        count of its "restart N" lines in the log."""
        r = self.status()
        if r is not None and isinstance(r.get("restarts"), int):
            return r["restarts"]
        n = 0
        try:
            with open(self.log, errors="replace") as f:
                for line in f:
                    m = RESTARTS.search(line)
                    if m:
                        n = max(n, int(m.group(1)))
        except OSError:
            pass
        return n


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def all_jobs() -> list[Job]:
    d = jobs_dir()
    if not d.is_dir():
        return []
    jobs = [Job(p) for p in d.iterdir() if (p / "job.json").exists()]
    return sorted(jobs, key=lambda j: j.record().get("created", 0))


def find(ref: str) -> Job:
    """A job by its id or a unique prefix of it."""
    from launcher.errors import ConfigError

    if not re.fullmatch(r"[0-9a-f]{1,32}", ref or ""):
        raise ConfigError(f"JOB {ref!r}: expected a job id (hex, as `exolaunch ps` shows it).")
    hits = [j for j in all_jobs() if j.id.startswith(ref)]
    if not hits:
        raise ConfigError(f"JOB {ref!r}: no such job in {jobs_dir()} (see `exolaunch ps`).")
    if len(hits) > 1:
        raise ConfigError(f"JOB {ref!r}: ambiguous, matches {', '.join(j.id for j in hits)}.")
    return hits[0]


def create(record: dict) -> Job:
    d = jobs_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    while True:
        job_id = new_id()
        try:
            (d / job_id).mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    job = Job(d / job_id)
    write_json(job.dir / "job.json", {"id": job_id, "created": time.time(), **record})
    return job


def spawn_keeper(job: Job, env: dict) -> subprocess.Popen:
    """Start the job's keeper in a session of its own, detached from this terminal (its own
    errors, if any, go to the job's log)."""
    with open(job.log, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "launcher.jobs", str(job.dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True, env=env, cwd=job.record().get("cwd") or None, close_fds=True)


# -- the keeper ------------------------------------------------------------------------------

def keep(job_dir: Path) -> int:
    from launcher.agent import die_with_parent

    job = Job(job_dir)
    rec = job.record()
    me = os.getpid()
    write_json(job.dir / "pids.json", {"keeper": me, "keeper_started": start_time(me)})
    with open(job.log, "ab", buffering=0) as log:
        proc = subprocess.Popen(rec["argv"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=rec.get("cwd") or None,
                                # Keeper gone: SIGTERM, and `run` tears its ranks down in order.
                                preexec_fn=(lambda: die_with_parent(signal.SIGTERM)) if sys.platform == "linux" else None)
    write_json(job.dir / "pids.json", {"keeper": me, "keeper_started": start_time(me),
                                       "launcher": proc.pid, "launcher_started": start_time(proc.pid)})

    # A signal to the keeper (a logout's SIGHUP, a stray SIGTERM) is passed on: the launcher
    # decides how to end.
    def forward(signum, _frame):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, forward)
    offset, ready = 0, False
    while True:
        try:
            status = proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            status = None
        if not ready:
            offset, ready = _scan_ready(job, offset)
        if status is not None:
            break
    ex = {"at": time.time(), "code": status if status >= 0 else None, "signal": -status if status < 0 else None}
    write_json(job.dir / "exit.json", ex)
    return 0


def _scan_ready(job: Job, offset: int) -> tuple[int, bool]:
    """Look for the "serving" line in the log's new complete lines; record it once seen."""
    try:
        with open(job.log, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset, False
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        m = READY.search(line)
        if m:
            ranks = int(m.group(1))
            write_json(job.dir / "ready.json", {"at": time.time(), "url": m.group(2), "ranks": ranks})
            return offset + end, True
    return offset + end, False


if __name__ == "__main__":
    sys.exit(keep(Path(sys.argv[1])))
