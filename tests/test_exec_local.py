"""`exolaunch exec` on the built-in local hostfile: output, exit status, failure paths, teardown."""

from __future__ import annotations

import os
import signal
import time

import pytest

from launcher.ports import free_data_port
from tests.launch_helpers import (
    RANKPROG, assert_no_leftovers, env_for_tests, run, start, token, wait_for_output,
)


def test_selftest_two_local_ranks_ring():
    # A free port rather than the default: an earlier test's connections may still hold it.
    r = run("exec", "--port", str(free_data_port(2)), "--", "python", "-m", "runtime.selftest", "--size", "4096")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == ["[0@local]", "[1@local]"]
    assert all("rank" in line and "/2 " in line and "ok=True" in line for line in lines)


def test_single_rank_ring_works():  # mlx.launch crashes on -n 1
    r = run("exec", "-n", "1", "--", "python", "-m", "runtime.selftest", "--size", "16")
    assert r.returncode == 0, r.stderr
    assert "rank 0/1" in r.stdout and "ok=True" in r.stdout


def test_mpi_local_ranks():
    r = run("exec", "-n", "3", "--backend", "mpi", "--", "python", "-m", "runtime.selftest", "--size", "4096")
    assert r.returncode == 0, r.stderr
    assert sorted(line.split()[0] for line in r.stdout.splitlines()) == ["[0@local]", "[1@local]", "[2@local]"]
    assert "backend mpi" in r.stdout
    assert "exiting improperly" not in r.stderr  # runtime.group.finish called MPI_Finalize


def test_oversubscribed_mpi_ranks_yield_their_core():
    # as many ranks as cores or more: OpenMPI is told to yield while its collectives wait
    # (launcher/oversubscription.py); on a host with a core to spare it is left alone, and a
    # user's value wins
    many = os.cpu_count() or 1
    shown = ["sh", "-c", 'echo "yield=${OMPI_MCA_mpi_yield_when_idle:-unset}"']
    r = run("exec", "-n", str(many), "--backend", "mpi", "--", *shown)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("yield=1") == many, r.stdout
    if many > 1:
        r = run("exec", "-n", str(many - 1), "--backend", "mpi", "--", *shown)
        assert r.stdout.count("yield=unset") == many - 1, r.stdout + r.stderr
    r = run("exec", "-n", str(many), "--backend", "mpi", "-x", "OMPI_MCA_mpi_yield_when_idle=0", "--", *shown)
    assert r.stdout.count("yield=0") == many, r.stdout + r.stderr


def test_no_tag_output():
    tok = token()
    r = run("exec", "--no-tag-output", "--", "python", RANKPROG, "env", "EXOLAUNCH_RANK", tok)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == ["EXOLAUNCH_RANK=0", "EXOLAUNCH_RANK=1"]


def test_failing_rank_status_and_teardown():
    tok = token()
    t = time.monotonic()
    r = run("exec", "--", "python", RANKPROG, "fail", "1", "7", "0.5", tok)
    assert r.returncode == 7
    assert "rank 1 on local exited with status 7" in r.stderr
    assert time.monotonic() - t < 15
    assert_no_leftovers(tok)


def test_first_failure_decides_the_status():
    tok = token()
    # rank 1 fails first with 3; rank 0 would fail later with 5 but is torn down first.
    r = run("exec", "-n", "2", "--", "sh", "-c",
            f'if [ "$EXOLAUNCH_RANK" = 1 ]; then sleep 0.3; exit 3; else sleep 3; exit 5; fi # {tok}')
    assert r.returncode == 3, r.stderr
    assert_no_leftovers(tok)


def test_rank_killed_by_signal():
    tok = token()
    r = run("exec", "--", "python", RANKPROG, "signal", "0", str(int(signal.SIGKILL)), "0.3", tok)
    assert r.returncode == 128 + signal.SIGKILL
    assert "was killed by SIGKILL" in r.stderr
    assert_no_leftovers(tok)


def test_command_not_found():
    r = run("exec", "--", "no-such-command-xyz")
    assert r.returncode == 127
    assert "command not found: no-such-command-xyz" in r.stderr


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_exolaunch_tears_down(sig, status):
    tok = token()
    p = start("exec", "--", "python", RANKPROG, "sleep", tok)
    wait_for_output(p, " up", count=2)
    t = time.monotonic()
    p.send_signal(sig)
    assert p.wait(timeout=20) == status
    assert time.monotonic() - t < 10
    assert_no_leftovers(tok)


def test_exolaunch_killed_with_sigkill_leaves_no_rank():
    tok = token()
    p = start("exec", "--", "python", RANKPROG, "sleep", tok)
    wait_for_output(p, " up", count=2)
    p.kill()
    p.wait(timeout=10)
    assert_no_leftovers(tok, timeout=10)  # the agents notice their stdin closing
    # Its job dir could not be removed by a SIGKILLed exolaunch; the next run sweeps it.
    import glob

    assert glob.glob(f"/tmp/exl-{p.pid}-*")
    assert run("exec", "--", "true").returncode == 0
    assert not glob.glob(f"/tmp/exl-{p.pid}-*")


def test_frozen_rank_detected():
    tok = token()
    t = time.monotonic()
    r = run("exec", "--", "python", RANKPROG, "stop", "1", "0.5", tok)
    took = time.monotonic() - t
    assert r.returncode == 4
    assert "rank 1 on local is frozen" in r.stderr
    assert took < 12, took
    assert_no_leftovers(tok)


def test_frozen_agent_detected_by_heartbeat():
    tok = token()
    p = start("exec", "--heartbeat-timeout", "3", "--", "python", RANKPROG, "sleep", tok)
    wait_for_output(p, " up", count=2)
    import psutil

    agents = [c for c in psutil.Process(p.pid).children() if "launcher.agent" in " ".join(c.cmdline())]
    assert len(agents) == 2
    agents[1].suspend()  # the whole agent freezes: no heartbeat at all
    t = time.monotonic()
    try:
        assert p.wait(timeout=30) == 4
        assert time.monotonic() - t < 10
        assert "stopped responding: no heartbeat" in p.stderr.read()
    finally:
        try:
            agents[1].resume()
        except psutil.NoSuchProcess:
            pass  # exolaunch killed the frozen agent, as it should
    assert_no_leftovers(tok)


def test_timeout():
    tok = token()
    t = time.monotonic()
    r = run("exec", "--timeout", "1.5", "--", "python", RANKPROG, "sleep", tok)
    assert r.returncode == 124
    assert "--timeout 1.5 s" in r.stderr
    assert time.monotonic() - t < 10
    assert_no_leftovers(tok)


def test_ready_timeout_names_the_late_rank():
    tok = token()
    r = run("exec", "-n", "3", "--ready-timeout", "2", "--", "python", RANKPROG, "ready-except", "2", tok)
    assert r.returncode == 3
    assert "not ready within --ready-timeout 2 s: rank 2 on local" in r.stderr
    assert "rank 0 on local" not in r.stderr.split("not ready")[1].split(".")[0]
    assert_no_leftovers(tok)


def test_stdin_goes_to_rank_0_only():
    r = run("exec", "--", "python", RANKPROG, "stdin", token(), input="hello\nworld\n")
    assert r.returncode == 0, r.stderr
    assert "[0@local] stdin='hello\\nworld\\n'" in r.stdout
    assert "[1@local] stdin=''" in r.stdout


def test_log_dir(tmp_path):
    r = run("exec", "--log-dir", str(tmp_path / "logs"), "--", "python", RANKPROG, "env", "EXOLAUNCH_RANK", token())
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "logs" / "rank-0.log").read_text() == "EXOLAUNCH_RANK=0\n"
    assert (tmp_path / "logs" / "rank-1.log").read_text() == "EXOLAUNCH_RANK=1\n"


def test_env_forwarding_and_shell_metacharacters(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker}); `touch {marker}`; touch {marker}"
    env_file = tmp_path / "vars.env"
    env_file.write_text(f"# comment\nexport FROM_FILE='{evil}'\nPLAIN=1\n")
    r = run("exec", "-x", f"EVIL={evil}", "-x", "HOME", "--env-file", str(env_file), "--",
            "python", RANKPROG, "env", "EVIL", "FROM_FILE", "PLAIN", "HOME", token())
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"EVIL={evil}\n") == 2
    assert r.stdout.count(f"FROM_FILE={evil}\n") == 2
    assert f"HOME={os.environ['HOME']}" in r.stdout
    assert not marker.exists()


@pytest.mark.parametrize("args,needle", [
    (["-x", "NOT_SET_ANYWHERE_123"], "-x NOT_SET_ANYWHERE_123: NOT_SET_ANYWHERE_123 is not set here"),
    (["-x", "1BAD=2"], "'1BAD' is not a valid environment variable name"),
    (["--backend", "nccl"], "--backend 'nccl'"),
    (["--timeout", "0"], "--timeout 0: expected a number of seconds"),
    (["--host-key-check", "maybe"], "--host-key-check 'maybe'"),
    (["--port", "70000"], "--port 70000"),
])
def test_bad_flags_one_line_errors(args, needle):
    r = run("exec", *args, "--", "true")
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_env_file_names_the_line(tmp_path):
    f = tmp_path / "bad.env"
    f.write_text("OK=1\nthis is not an assignment\n")
    r = run("exec", "--env-file", str(f), "--", "true")
    assert r.returncode == 2
    assert f"{f}:2: expected KEY=VALUE" in r.stderr


def test_np_larger_than_hostfile(tmp_path):
    hf = tmp_path / "h.yaml"
    hf.write_text("hosts:\n  - {ssh: local, slots: 2}\n")
    r = run("--hostfile", str(hf), "exec", "-n", "3", "--", "true")
    assert r.returncode == 2
    assert "-n 3:" in r.stderr and "only 2 slots" in r.stderr


def test_bad_hostfile_is_one_line(tmp_path):
    hf = tmp_path / "bad.yaml"
    hf.write_text("hosts:\n  - ssh: local\n    slots: two\n")
    r = run("--hostfile", str(hf), "exec", "--", "true")
    assert r.returncode == 2
    assert f"{hf}:3" in r.stderr and "slots" in r.stderr
    assert "Traceback" not in r.stderr


def test_hostfile_from_environment(tmp_path):
    hf = tmp_path / "three.yaml"
    hf.write_text("hosts:\n  - {ssh: local, slots: 3}\n")
    from tests.launch_helpers import env_for_tests

    r = run("exec", "--", "python", RANKPROG, "env", "EXOLAUNCH_WORLD_SIZE", token(),
            env=env_for_tests(EXOLAUNCH_HOSTFILE=str(hf)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("EXOLAUNCH_WORLD_SIZE=3") == 3


def test_dry_run_jaccl_shows_config_and_starts_nothing(tmp_path):
    r = run("--hostfile", "hostfiles/tb5.yaml", "--topology", "configs/topology-tb5.yaml",
            "exec", "--dry-run", "--", "python", "x.py")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("backend jaccl, 4 rank(s)")
    assert out.count("MLX_JACCL_COORDINATOR=10.10.0.1:52600") == 4
    assert 'MLX_IBV_DEVICES -> [[null, "rdma_en2"' in out
    assert "MLX_JACCL_RING" not in out
    assert "ssh -o BatchMode=yes" in out and "-- m3u-2.local" in out
    ring = run("--hostfile", "hostfiles/tb5.yaml", "exec", "--backend", "jaccl-ring", "--dry-run", "--", "true")
    assert ring.returncode == 0 and ring.stdout.count("MLX_JACCL_RING=1") == 4


def test_dry_run_mpi_flags():
    r = run("exec", "--backend", "mpi", "--dry-run", "--", "python", "x.py")
    assert r.returncode == 0, r.stderr
    assert "mpirun --hostfile" in r.stdout and "--bind-to none" in r.stdout
    assert "--output" not in r.stdout  # OpenMPI 4 rejects mlx.launch's `--output :raw`
    assert "localhost slots=2" in r.stdout


def test_dry_run_ring_addresses():
    r = run("exec", "-n", "3", "--port", "40000", "--dry-run", "--", "true")
    assert r.returncode == 0, r.stderr
    assert 'MLX_HOSTFILE -> [["127.0.0.1:40000"], ["127.0.0.1:40001"], ["127.0.0.1:40002"]]' in r.stdout


def test_jaccl_missing_pair_refused(tmp_path):
    hf = tmp_path / "h.yaml"
    hf.write_text(
        "backend: jaccl\nhosts:\n"
        "  - {name: a, ssh: a.local, ips: [10.0.0.1], rdma: {b: rdma_en2, c: rdma_en3}}\n"
        "  - {name: b, ssh: b.local, ips: [10.0.0.2], rdma: {a: rdma_en2, c: rdma_en3}}\n"
        "  - {name: c, ssh: c.local, ips: [10.0.0.3], rdma: {a: rdma_en2}}\n")
    r = run("--hostfile", str(hf), "exec", "--dry-run", "--", "true")
    assert r.returncode == 2
    assert "missing: c -> b." in r.stderr


SINGLETON_ENV = r"""
import json, subprocess
import mlx.core as mx
mx.distributed.init(backend="mpi")  # MPI_Init without mpirun: a singleton that edits its environ
print(json.dumps(dict(l.split("=", 1) for l in subprocess.run(["env"], capture_output=True, text=True)
                      .stdout.splitlines() if "=" in l)))
"""


def test_mpi_job_started_from_an_mpi_singletons_environment():
    # A process that initialised MPI on its own (an in-process engine, a notebook) leaves
    # PMIX_* / OMPI_MCA_* job variables to its children; mpirun started with them exits 1 silently.
    import json
    import subprocess
    import sys

    from launcher.backends.mpi import mpirun_env

    polluted = json.loads(subprocess.run([sys.executable, "-c", SINGLETON_ENV], capture_output=True, text=True,
                                         env=env_for_tests(), timeout=60).stdout)
    assert any(k.startswith("PMIX_") for k in polluted), "this MPI does not mark singletons; nothing to test"
    assert not any(k.startswith("PMIX_") for k in mpirun_env(polluted))
    r = run("exec", "-n", "2", "--backend", "mpi", "--", "python", "-c", "print('hello')",
            env={**env_for_tests(), **polluted})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("hello") == 2
