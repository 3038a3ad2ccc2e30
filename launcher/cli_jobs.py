"""Detached runs: `run -d` (detach_run), `ps`, `logs JOB [-f]`, `stop JOB`.

A detached job is the same `exolaunch run` with the same arguments, started in a session of its
own under a keeper (launcher.jobs), its output in the job's log file. `stop` ends it the way
Ctrl-C does (SIGINT: the supervisor tears every rank down in order), then escalates.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from typing import List, Optional

import typer

from launcher import jobs
from launcher.cli_common import Globals, app, load_cluster
from launcher.errors import ConfigError, LaunchError

TAIL_ON_FAILURE = 20


def run_argv_without_detach(argv: list[str]) -> list[str]:
    """The command line minus -d/--detach (also inside a group of short flags, as click reads
    `-dn2` as `-d -n2`); nothing after `--` is touched."""
    out, rest = [], False
    for a in argv:
        if rest or a == "--":
            rest = True
            out.append(a)
        elif a in ("-d", "--detach"):
            continue
        elif re.fullmatch(r"-d[A-Za-z0-9].*", a):
            out.append("-" + a[2:])
        else:
            out.append(a)
    return out


def detach_run(ctx: typer.Context) -> int:
    """`run -d`: start this run as a background job, return once it serves (or failed)."""
    p = ctx.params
    if p.get("dry_run"):
        raise ConfigError("-d/--detach with --dry-run: a dry run starts nothing to detach; drop one of them.")
    if os.environ.get(jobs.ENV_JOB_ID):
        raise ConfigError("-d/--detach inside a detached job: write -d as an argument of its own.")
    g: Globals = ctx.obj
    hostfile, _ = load_cluster(g)  # a bad hostfile is the user's error here, not a failed job
    from launcher.backends import first_slots

    used = first_slots(hostfile, p["np"]) if p.get("np") else hostfile
    model = p.get("model")
    if model is None:
        from runtime import contract

        model, _ = contract.default_model()
    argv = [sys.executable, "-m", "launcher", *run_argv_without_detach(sys.argv[1:])]
    job = jobs.create({"model": model, "hosts": [h.name for h in used.hosts], "argv": argv,
                       "cwd": os.getcwd()})
    keeper = jobs.spawn_keeper(job, {**os.environ, jobs.ENV_JOB_ID: job.id})
    deadline = time.monotonic() + (p.get("ready_timeout") or 900.0) + 60.0
    try:
        while True:
            ready = job.ready()
            if ready is not None:
                break
            ex = job.exit()
            if ex is not None or (keeper.poll() is not None and not job.launcher_alive()):
                _show_tail(job)
                code = (ex or {}).get("code") or 1
                raise LaunchError(f"job {job.id} did not start: {job.state()} (log: {job.log})", status=code)
            if time.monotonic() > deadline:
                _stop(job, timeout=10.0)
                _show_tail(job)
                raise LaunchError(f"job {job.id} was not serving within --ready-timeout; stopped it "
                                  f"(log: {job.log})", status=3)
            time.sleep(0.2)
    except KeyboardInterrupt:
        print(f"exolaunch: job {job.id} goes on starting in the background "
              f"(`exolaunch logs {job.id} -f`, `exolaunch stop {job.id}`)", file=sys.stderr)
        return 130
    print(f"exolaunch: job {job.id} serving {model} on {ready.get('ranks') or '?'} rank(s) at {ready['url']} "
          f"(`exolaunch logs {job.id} -f`, `exolaunch stop {job.id}`)", file=sys.stderr)
    print(f"{job.id} {ready['url']}")
    return 0


def _show_tail(job: jobs.Job, n: int = TAIL_ON_FAILURE) -> None:
    lines = _tail_lines(job.log, n)
    if lines:
        print(f"exolaunch: the last {len(lines)} lines of {job.log}:", file=sys.stderr)
        for line in lines:
            print("    " + line, file=sys.stderr)


def _tail_lines(path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-n:] if n > 0 else []


# -- ps --------------------------------------------------------------------------------------

def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def job_row(job: jobs.Job) -> dict:
    rec, ready, status = job.record(), job.ready() or {}, job.status() or {}
    # After a restart re-planned on fewer hosts, the launcher's status has the hosts in use.
    hosts, ranks = status.get("hosts") or rec.get("hosts", []), status.get("world_size") or ready.get("ranks")
    return {"id": job.id, "model": rec.get("model"), "hosts": hosts, "ranks": ranks,
            "url": ready.get("url"), "uptime": job.uptime(), "restarts": job.restarts(), "state": job.state(),
            "log": str(job.log)}


@app.command("ps", help="List detached jobs (`run -d`): id, model, hosts, ranks, URL, uptime, restarts, state.")
def ps_(
    json_out: bool = typer.Option(False, "--json", help="One JSON object per job, one per line."),
    prune: bool = typer.Option(False, "--prune", help="Delete the records and logs of jobs that have ended."),
):
    all_jobs = jobs.all_jobs()
    if prune:
        import shutil

        ended = [j for j in all_jobs if not j.running()]
        for j in ended:
            shutil.rmtree(j.dir, ignore_errors=True)
        print(f"exolaunch: removed {len(ended)} ended job(s)", file=sys.stderr)
        all_jobs = [j for j in all_jobs if j not in ended]
    rows = [job_row(j) for j in all_jobs]
    if json_out:
        for r in rows:
            typer.echo(json.dumps(r))
        return 0
    table = [("ID", "MODEL", "HOSTS", "RANKS", "URL", "UPTIME", "RESTARTS", "STATE")]
    for r in rows:
        hosts = ",".join(r["hosts"])
        table.append((r["id"], r["model"] or "?", hosts if len(hosts) <= 30 else hosts[:29] + "…",
                      str(r["ranks"] or "-"), r["url"] or "-", _duration(r["uptime"]), str(r["restarts"]),
                      r["state"]))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


# -- logs ------------------------------------------------------------------------------------

@app.command("logs", help="Print a detached job's output (its launcher's and every rank's).")
def logs_(
    job_ref: str = typer.Argument(..., metavar="JOB", help="Job id (or a unique prefix), as `exolaunch ps` shows."),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new output until the job ends."),
    tail: Optional[int] = typer.Option(None, "-n", "--tail", help="Start with only the last N lines."),
):
    job = jobs.find(job_ref)
    return print_log(job.log, follow=follow, tail=tail, running=job.running)


def print_log(path, *, follow: bool, tail: Optional[int], running) -> int:
    """Print a log file (its last `tail` lines), then with follow new output while running()."""
    if tail is not None and tail < 0:
        raise ConfigError(f"--tail {tail}: expected a number of lines, 0 or more.")
    out = sys.stdout.buffer
    f = None
    try:
        if os.path.exists(path):
            f = open(path, "rb")
            if tail is not None:
                out.write("".join(line + "\n" for line in _tail_lines(path, tail)).encode())
                f.seek(0, os.SEEK_END)
            else:
                out.write(f.read())
            out.flush()
        while follow:
            alive = running()
            if f is None and os.path.exists(path):
                f = open(path, "rb")
            data = f.read() if f is not None else b""
            if data:
                out.write(data)
                out.flush()
                continue
            if not alive:
                break
            time.sleep(0.2)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        if f is not None:
            f.close()
    return 0


# -- stop ------------------------------------------------------------------------------------

def _signal(pid: int | None, sig: int) -> None:
    if pid:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait(job: jobs.Job, seconds: float) -> bool:
    """Until the keeper recorded the launcher's end (or both are gone)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if job.exit() is not None or not (job.launcher_alive() or job.keeper_alive()):
            return True
        time.sleep(0.1)
    return False


def _stop(job: jobs.Job, timeout: float) -> str:
    """Ctrl-C the launcher (orderly teardown of every rank); a second one after `timeout` (kill
    the ranks now); SIGKILL after `timeout` more (the ranks die with it: stdin EOF, PDEATHSIG)."""
    jobs.write_json(job.dir / "stop.json", {"at": time.time(), "by": os.getpid()})
    pids = job.pids()
    launcher = pids.get("launcher") if job.launcher_alive() else None
    if launcher is None:  # only the keeper is left, or not even that
        _signal(pids.get("keeper") if job.keeper_alive() else None, signal.SIGTERM)
        _wait(job, 5.0)
        return "stopped"
    _signal(launcher, signal.SIGINT)
    if _wait(job, timeout):
        return "stopped"
    print(f"exolaunch: job {job.id} still running {timeout:g} s after SIGINT; interrupting again "
          "(its ranks are killed now)", file=sys.stderr)
    _signal(launcher, signal.SIGINT)
    if _wait(job, timeout):
        return "stopped after a second interrupt"
    print(f"exolaunch: job {job.id}: killing its launcher (pid {launcher})", file=sys.stderr)
    if job.launcher_alive():
        _signal(launcher, signal.SIGKILL)
    _wait(job, 5.0)
    return "killed"


@app.command("stop", help="Stop detached jobs the way Ctrl-C stops `run`: every rank on every host is "
                          "torn down; after --timeout, killed.")
def stop_(
    job_refs: List[str] = typer.Argument(..., metavar="JOB...", help="Job ids (or unique prefixes)."),
    timeout: float = typer.Option(30.0, "--timeout", help="Seconds for the orderly teardown, then for a second "
                                                            "interrupt, before the launcher is killed."),
):
    if timeout <= 0:
        raise ConfigError(f"--timeout {timeout:g}: expected a number of seconds greater than 0.")
    found = [jobs.find(r) for r in job_refs]
    for job in found:
        if not job.running():
            print(f"exolaunch: job {job.id} is not running ({job.state()})", file=sys.stderr)
            continue
        t0 = time.monotonic()
        how = _stop(job, timeout)
        print(f"exolaunch: job {job.id} {how} in {time.monotonic() - t0:.1f} s ({job.state()})", file=sys.stderr)
    return 0
