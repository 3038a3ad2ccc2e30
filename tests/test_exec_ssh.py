"""`exolaunch exec` across "hosts" reached over real SSH (sshd on loopback aliases), ring and MPI."""

from __future__ import annotations

import signal
import sys
import time

import psutil
import pytest

from tests.launch_helpers import (
    RANKPROG, assert_no_leftovers, run, start, token, wait_for_output, yaml_hostfile,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", ["ring", "mpi"])
@pytest.mark.parametrize("slots", [{"h1": 1, "h2": 1}, {"h1": 1, "h2": 1, "h3": 1, "h4": 1}, {"h1": 2, "h2": 2}])
def test_collectives_over_ssh(ssh_cluster, tmp_path, backend, slots):
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, slots, backend=backend)
    r = run("--hostfile", str(hf), "exec", "--ready-timeout", "60", "--",
            "python", RANKPROG, "collectives", token())
    assert r.returncode == 0, r.stderr
    n = sum(slots.values())
    lines = sorted(r.stdout.splitlines())
    assert len(lines) == n, r.stdout
    ips = {h.alias: h.ip for h in ssh_cluster.hosts}
    rank = 0
    for alias, k in slots.items():
        for _ in range(k):
            line = next(line for line in lines if line.startswith(f"[{rank}@{alias}] "))
            # Each rank ran in an SSH session on its own host's address and saw the full group.
            assert f"size={n} sum={n * (n + 1) // 2:g} gather={list(range(n))} server={ips[alias]}" in line
            rank += 1


def test_failing_rank_over_ssh(ssh_cluster, tmp_path):
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 1, "h2": 1})
    tok = token()
    r = run("--hostfile", str(hf), "exec", "--", "python", RANKPROG, "fail", "1", "9", "0.5", tok)
    assert r.returncode == 9
    assert "rank 1 on h2 exited with status 9" in r.stderr
    assert_no_leftovers(tok)


def test_failing_rank_over_mpi(ssh_cluster, tmp_path):
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 1, "h2": 1}, backend="mpi")
    tok = token()
    r = run("--hostfile", str(hf), "exec", "--", "python", RANKPROG, "fail", "1", "6", "0.5", tok)
    assert r.returncode == 6, r.stderr
    assert "rank 1 on h2 exited with status 6" in r.stderr
    assert_no_leftovers(tok)


@pytest.mark.parametrize("backend", ["ring", "mpi"])
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_teardown_over_ssh(ssh_cluster, tmp_path, backend, sig, status):
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 1, "h2": 2}, backend=backend)
    tok = token()
    p = start("--hostfile", str(hf), "exec", "--", "python", RANKPROG, "sleep", tok)
    wait_for_output(p, " up", count=3)
    t = time.monotonic()
    p.send_signal(sig)
    assert p.wait(timeout=30) == status
    assert time.monotonic() - t < 10
    assert_no_leftovers(tok)


@pytest.mark.parametrize("backend", ["ring", "mpi"])
def test_exolaunch_sigkill_over_ssh_leaves_no_rank(ssh_cluster, tmp_path, backend):
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 2, "h2": 1}, backend=backend)
    tok = token()
    p = start("--hostfile", str(hf), "exec", "--", "python", RANKPROG, "sleep", tok)
    wait_for_output(p, " up", count=3)
    # SIGKILL exolaunch, then its ssh clients (ring) / mpirun: remote agents see their channel
    # close, or orted its mpirun die, and take the ranks down.
    local_side = psutil.Process(p.pid).children(recursive=True)
    p.kill()
    for c in local_side:
        try:
            c.kill()
        except psutil.NoSuchProcess:
            pass
    p.wait(timeout=10)
    assert_no_leftovers(tok, timeout=15)


def _session_of(cluster, tok: str) -> int:
    """The sshd session process whose subtree runs the rank with this token."""
    for pid in cluster.session_pids():
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        if any(tok in " ".join(k.cmdline()) for k in kids if k.is_running()):
            return pid
    raise AssertionError("no sshd session runs the rank")


def test_killed_ssh_session(ssh_cluster, tmp_path):
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 1, "h2": 1})
    tok = token()
    p = start("--hostfile", str(hf), "exec", "--", "python", RANKPROG, "sleep", tok)
    wait_for_output(p, " up", count=2)
    psutil.Process(_session_of(ssh_cluster, tok)).kill()  # the connection drops server-side
    t = time.monotonic()
    assert p.wait(timeout=30) == 255
    assert time.monotonic() - t < 10
    err = p.stderr.read()
    assert "the SSH connection was lost" in err
    assert_no_leftovers(tok, timeout=15)


def test_frozen_rank_over_ssh(ssh_cluster, tmp_path):
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 1, "h2": 1})
    tok = token()
    t = time.monotonic()
    r = run("--hostfile", str(hf), "exec", "--", "python", RANKPROG, "stop", "1", "0.5", tok)
    assert r.returncode == 4
    assert "rank 1 on h2 is frozen" in r.stderr
    assert time.monotonic() - t < 15
    assert_no_leftovers(tok)


def test_frozen_remote_agent_over_ssh(ssh_cluster, tmp_path):
    """The whole remote side freezes (agent and rank): only the missing heartbeat tells."""
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 1, "h2": 1})
    tok = token()
    p = start("--hostfile", str(hf), "exec", "--", "python", RANKPROG, "sleep", tok)
    wait_for_output(p, " up", count=2)
    frozen = [pr for pr in psutil.Process(_session_of(ssh_cluster, tok)).children(recursive=True)]
    for pr in frozen:
        pr.suspend()
    t = time.monotonic()
    try:
        assert p.wait(timeout=30) == 4
        took = time.monotonic() - t
        assert took < 10, took
        assert "stopped responding: no heartbeat" in p.stderr.read()
    finally:
        for pr in frozen:
            try:
                pr.resume()
            except psutil.NoSuchProcess:
                pass
    assert_no_leftovers(tok, timeout=15)  # thawed, the agent sees its channel gone


def test_timeout_over_ssh(ssh_cluster, tmp_path):
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 1, "h2": 1})
    tok = token()
    r = run("--hostfile", str(hf), "exec", "--timeout", "2", "--", "python", RANKPROG, "sleep", tok)
    assert r.returncode == 124
    assert_no_leftovers(tok)


def test_ready_timeout_over_ssh(ssh_cluster, tmp_path):
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 1, "h2": 1})
    tok = token()
    r = run("--hostfile", str(hf), "exec", "--ready-timeout", "3", "--",
            "python", RANKPROG, "ready-except", "1", tok)
    assert r.returncode == 3
    assert "rank 1 on h2" in r.stderr
    assert_no_leftovers(tok)


def test_unreachable_host_named_quickly(ssh_cluster, tmp_path):
    # 127.0.0.9 is loopback with nothing listening on the port: connection refused.
    extra = (f"  - {{name: ghost, ssh: 127.0.0.9, port: {ssh_cluster.port}, slots: 1, "
             f"python: {sys.executable}}}")
    hf = yaml_hostfile(tmp_path / "hosts.yaml", ssh_cluster, {"h1": 1}, extra_host=extra)
    tok = token()
    t = time.monotonic()
    r = run("--hostfile", str(hf), "exec", "--connect-timeout", "3", "--", "python", RANKPROG, "sleep", tok)
    assert r.returncode == 255
    assert "could not start rank 1 on ghost: ssh exited with status 255" in r.stderr
    assert time.monotonic() - t < 15
    assert_no_leftovers(tok)


def test_missing_remote_python(ssh_cluster, tmp_path):
    hf = tmp_path / "hosts.yaml"
    hf.write_text(f"ssh_config: {ssh_cluster.ssh_config}\nhosts:\n"
                  f"  - {{ssh: h1, ips: [127.0.0.2], python: {sys.executable}}}\n"
                  f"  - {{ssh: h2, ips: [127.0.0.3], python: /nonexistent/bin/python3}}\n")
    r = run("--hostfile", str(hf), "exec", "--", "python", RANKPROG, "sleep", token())
    assert r.returncode == 127, r.stderr
    assert "could not start rank 1 on h2" in r.stderr
    assert "Check that exolaunch is installed for '/nonexistent/bin/python3' on h2" in r.stderr


def test_shell_metacharacters_never_execute(ssh_cluster, tmp_path):
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker}); `touch {marker}`; touch {marker} #"
    hf = tmp_path / "hosts.yaml"
    hf.write_text(
        f"ssh_config: {ssh_cluster.ssh_config}\nenv:\n  GLOBAL_EVIL: '{evil}'\nhosts:\n"
        f"  - ssh: h1\n    ips: [127.0.0.2]\n    python: {sys.executable}\n"
        f"    env: {{HOST_EVIL: '{evil}'}}\n"
        f"  - ssh: h2\n    ips: [127.0.0.3]\n    python: {sys.executable}\n    cwd: '{tmp_path}'\n")
    r = run("--hostfile", str(hf), "exec", "-x", f"X_EVIL={evil}", "--",
            "python", RANKPROG, "env", "GLOBAL_EVIL", "HOST_EVIL", "X_EVIL", f"{evil}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"GLOBAL_EVIL={evil}") == 2
    assert f"[0@h1] HOST_EVIL={evil}" in r.stdout and "[1@h2] HOST_EVIL=<unset>" in r.stdout
    assert r.stdout.count(f"X_EVIL={evil}") == 2
    # A host name carrying shell syntax is refused before anything runs.
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"hosts:\n  - ssh: 'h1;touch {marker}'\n  - ssh: '$(touch {marker})'\n")
    r2 = run("--hostfile", str(bad), "exec", "--", "true")
    assert r2.returncode == 2 and f"{bad}:2" in r2.stderr
    assert not marker.exists()
