"""Detached runs: `run -d`, `ps`, `logs`, `stop`, and a SIGKILLed launcher's job (dead, no ranks).

Two real clusters (demo-llama:tiny on 2 local ranks), each started with `exolaunch run -d`."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import psutil
import pytest

from launcher.cli_jobs import run_argv_without_detach
from launcher.ports import free_data_port
from tests.launch_helpers import env_for_tests, free_port, run, token, yaml_hostfile

MODEL = "demo-llama:tiny"


@pytest.fixture(scope="module")
def jobs_env(tmp_path_factory, model_cache):
    return env_for_tests(EXOLAUNCH_JOBS_DIR=str(tmp_path_factory.mktemp("jobs")), EXOLAUNCH_CACHE=str(model_cache))


def _ranks(tok: str) -> list[int]:
    """Live rank processes carrying this test's token in their environment."""
    pids = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "runtime serve" in cmd and "launcher.agent" not in cmd and p.info["status"] != psutil.STATUS_ZOMBIE \
                    and p.environ().get("EXOLAUNCH_TEST_TOKEN") == tok:
                pids.append(p.info["pid"])
        except (psutil.Error, OSError):
            continue
    return pids


def _wait_no_ranks(tok: str, timeout: float = 15.0) -> float:
    t0 = time.monotonic()
    while _ranks(tok):
        assert time.monotonic() - t0 < timeout, f"ranks left behind: {_ranks(tok)}"
        time.sleep(0.05)
    return time.monotonic() - t0


def _ps(env) -> dict[str, dict]:
    r = run("ps", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return {row["id"]: row for row in map(json.loads, r.stdout.splitlines())}


def _detach(env, tok: str, *glob: str) -> tuple[str, str]:
    port = free_port()
    r = run(*glob, "run", "-d", MODEL, "-n", "2", "--port", str(port), "--data-port", str(free_data_port(4)),
            "-x", f"EXOLAUNCH_TEST_TOKEN={tok}", "-x", "EXOLAUNCH_CACHE", timeout=240, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id, url = r.stdout.split()
    assert url == f"http://127.0.0.1:{port}/v1"
    assert f"job {job_id} serving {MODEL} on 2 rank(s) at {url}" in r.stderr
    return job_id, url


@pytest.mark.slow
def test_detached_run_ps_logs_stop(jobs_env):
    tok = token()
    job_id, url = _detach(jobs_env, tok)
    try:
        # `run -d` returned: the cluster answers, from a launcher no longer tied to this terminal.
        assert httpx.get(url.removesuffix("/v1") + "/ready", timeout=10).status_code == 200
        assert len(_ranks(tok)) == 2
        row = _ps(jobs_env)[job_id]
        assert (row["model"], row["hosts"], row["ranks"], row["url"], row["state"], row["restarts"]) == \
            (MODEL, ["local"], 2, url, "serving", 0)
        table = run("ps", env=jobs_env).stdout.splitlines()
        assert table[0].split() == ["ID", "MODEL", "HOSTS", "RANKS", "URL", "UPTIME", "RESTARTS", "STATE"]
        assert any(line.startswith(job_id) and line.rstrip().endswith("serving") for line in table)

        logs = run("logs", job_id[:4], env=jobs_env)  # a unique prefix will do
        assert logs.returncode == 0 and f"serving {MODEL} on 2 rank(s)" in logs.stdout
        assert "[0@local]" in logs.stdout and "[1@local]" in logs.stdout
        assert len(run("logs", job_id, "-n", "2", env=jobs_env).stdout.splitlines()) == 2
    finally:
        stop = run("stop", job_id, env=jobs_env, timeout=90)
    assert stop.returncode == 0, stop.stderr
    assert f"job {job_id} stopped" in stop.stderr
    assert _ps(jobs_env)[job_id]["state"] == "stopped"
    _wait_no_ranks(tok, timeout=5)
    # The teardown is the supervisor's (Ctrl-C's), written to the job's log; -f ends with the job.
    follow = run("logs", job_id, "-f", env=jobs_env, timeout=10)
    assert "interrupted by SIGINT; stopping all ranks" in follow.stdout
    assert "all 2 ranks stopped" in follow.stdout
    again = run("stop", job_id, env=jobs_env)
    assert again.returncode == 0 and "is not running (stopped)" in again.stderr


@pytest.mark.slow
def test_sigkilled_launcher_is_dead_and_its_ranks_are_gone(jobs_env, ssh_cluster, tmp_path):
    """One rank on each of two SSH hosts. Nothing stops them in order: they end because their
    launcher did (its ssh clients see stdin EOF, so does each remote agent, which kills its rank;
    a rank also has PR_SET_PDEATHSIG on its agent)."""
    tok = token()
    hf = yaml_hostfile(tmp_path / "h.yaml", ssh_cluster, {"h1": 1, "h2": 1})
    job_id, _ = _detach(jobs_env, tok, "--hostfile", str(hf))
    pids = json.loads((_job_dir(jobs_env, job_id) / "pids.json").read_text())
    assert len(_ranks(tok)) == 2
    assert _ps(jobs_env)[job_id]["hosts"] == ["h1", "h2"]
    os.kill(pids["launcher"], signal.SIGKILL)
    took = _wait_no_ranks(tok, timeout=10)
    print(f"ranks gone {took:.2f} s after SIGKILL of the launcher")
    deadline = time.monotonic() + 10
    while _ps(jobs_env)[job_id]["state"] != "dead (launcher killed by SIGKILL)":
        assert time.monotonic() < deadline, _ps(jobs_env)[job_id]
        time.sleep(0.1)
    row = _ps(jobs_env)[job_id]
    assert row["uptime"] is None
    stop = run("stop", job_id, env=jobs_env)
    assert stop.returncode == 0 and "is not running (dead (launcher killed by SIGKILL))" in stop.stderr
    # --prune forgets ended jobs (this one and the other test's), logs included.
    assert run("ps", "--prune", env=jobs_env).returncode == 0
    assert job_id not in _ps(jobs_env)


def _job_dir(env, job_id: str):
    from pathlib import Path

    return Path(env["EXOLAUNCH_JOBS_DIR"]) / job_id


def test_failed_start_shows_the_log_and_exits_nonzero(jobs_env):
    """-n 5 cannot split the tiny model's heads: run refuses (exit 5) before loading anything."""
    r = run("run", "-d", MODEL, "-n", "5", "--port", str(free_port()), timeout=120, env=jobs_env)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "did not start: failed 5" in r.stderr
    assert "lines of" in r.stderr and "refusing to start" in r.stderr  # the log's tail, shown here
    assert r.stdout == ""
    failed = [row for row in _ps(jobs_env).values() if row["state"] == "failed 5"]
    assert failed and failed[-1]["url"] is None


@pytest.mark.parametrize("args, needle", [
    (("stop", "zzz"), "JOB 'zzz': expected a job id"),
    (("logs", "abcdef0123"), "JOB 'abcdef0123': no such job"),
    (("stop", "a1", "--timeout", "0"), "--timeout 0: expected a number of seconds"),
    (("run", "-d", "--dry-run", MODEL), "-d/--detach with --dry-run"),
])
def test_bad_input_is_one_line_and_exit_2(jobs_env, args, needle):
    r = run(*args, env=jobs_env)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_detach_flag_is_removed_from_the_run_command_line():
    assert run_argv_without_detach(["--hostfile", "h.yaml", "run", "-d", "m", "-n", "2"]) == \
        ["--hostfile", "h.yaml", "run", "m", "-n", "2"]
    assert run_argv_without_detach(["run", "--detach", "m"]) == ["run", "m"]
    assert run_argv_without_detach(["run", "-dn2", "m"]) == ["run", "-n2", "m"]  # click's reading of -dn2
    assert run_argv_without_detach(["run", "--dry-run", "--data-port", "5"]) == ["run", "--dry-run", "--data-port", "5"]


def test_stop_escalates_to_sigkill_when_the_launcher_ignores_interrupts(jobs_env, monkeypatch):
    """A launcher that ignores SIGINT (here a real process that does, under the real keeper):
    `stop` interrupts twice, then kills it; the job shows as stopped (killed)."""
    import sys

    from launcher import jobs

    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    env = dict(jobs_env)
    monkeypatch.setenv(jobs.ENV_JOBS_DIR, env["EXOLAUNCH_JOBS_DIR"])
    job = jobs.create({"model": "stubborn", "hosts": ["local"], "argv": [sys.executable, "-c", stubborn],
                       "cwd": os.getcwd()})
    keeper = jobs.spawn_keeper(job, env)
    deadline = time.monotonic() + 15
    while "up" not in (job.log.read_text() if job.log.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    launcher = job.pids()["launcher"]
    t0 = time.monotonic()
    r = run("stop", job.id, "--timeout", "0.5", env=env)
    assert r.returncode == 0, r.stderr
    assert "interrupting again" in r.stderr and "killing its launcher" in r.stderr and "killed in" in r.stderr
    assert time.monotonic() - t0 < 8
    assert not psutil.pid_exists(launcher) or psutil.Process(launcher).status() == psutil.STATUS_ZOMBIE
    assert _ps(env)[job.id]["state"] == "stopped (killed)"
    keeper.wait(timeout=5)
