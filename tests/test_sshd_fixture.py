"""The real-sshd test fixture itself (tests/sshd.py, tests/procs.py)."""

from __future__ import annotations

import subprocess
import time
import uuid

import psutil
import pytest

from tests.procs import find_processes, wait_no_processes


def _unique_sleep() -> str:
    # A distinctive duration so the remote `sleep` can be found in the process table.
    return f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"


def _remote(cluster, pattern: str) -> list[int]:
    """PIDs under the sshd daemon whose cmdline contains ``pattern`` (not the local ssh client)."""
    found = []
    for pid in cluster.session_tree_pids():
        try:
            if pattern in " ".join(psutil.Process(pid).cmdline()):
                found.append(pid)
        except psutil.Error:
            pass
    return found


def _wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_hosts_layout(ssh_cluster):
    assert [h.alias for h in ssh_cluster.hosts] == ["h1", "h2", "h3", "h4"]
    assert [h.ip for h in ssh_cluster.hosts] == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    assert len({h.port for h in ssh_cluster.hosts}) == 1
    assert psutil.pid_exists(ssh_cluster.sshd_pid)
    assert len(str(ssh_cluster.workdir)) < 40  # room for ControlPath sockets


@pytest.mark.parametrize("alias,ip", [("h1", "127.0.0.2"), ("h2", "127.0.0.3")])
def test_ssh_reaches_the_right_loopback_address(ssh_cluster, alias, ip):
    r = ssh_cluster.ssh(alias, "echo $SSH_CONNECTION")
    assert r.returncode == 0, r.stderr
    client_ip, _client_port, server_ip, server_port = r.stdout.split()
    assert client_ip.startswith("127.")
    assert server_ip == ip
    assert int(server_port) == ssh_cluster.host(alias).port


def test_plain_ssh_with_config_file(ssh_cluster):
    r = subprocess.run(
        ["ssh", "-F", str(ssh_cluster.ssh_config), "h4", "echo", "ok"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10,
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", "")


def test_host_key_checking_is_on(ssh_cluster, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = ssh_cluster.ssh(
        "h1", "true",
        options=[f"UserKnownHostsFile={empty}", "StrictHostKeyChecking=yes", "LogLevel=ERROR"],
    )
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr
    assert empty.read_text() == ""  # nothing was silently trusted


def test_killing_a_session_drops_the_connection(ssh_cluster):
    duration = _unique_sleep()
    before = set(ssh_cluster.session_pids())
    client = subprocess.Popen(
        ssh_cluster.ssh_argv("h2", f"sleep {duration}"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: _remote(ssh_cluster, f"sleep {duration}"), what="remote sleep to start")
        new = set(ssh_cluster.session_pids()) - before
        assert len(new) == 1, new
        (session,) = new
        # The remote command runs under that session.
        assert any(
            f"sleep {duration}" in " ".join(p.cmdline())
            for p in psutil.Process(session).children(recursive=True)
        )
        psutil.Process(session).kill()
        assert client.wait(timeout=10) == 255
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate()
        # Like on a real host, the remote command is orphaned: clean it up.
        for pid in _remote(ssh_cluster, f"sleep {duration}"):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
    assert wait_no_processes(f"sleep {duration}") == []
    assert session not in ssh_cluster.session_pids()


def test_stop_kills_daemon_sessions_and_orphans(ssh_cluster_factory):
    cluster = ssh_cluster_factory(n_hosts=2)
    cfg = str(cluster.sshd_config)
    daemon = psutil.Process(cluster.sshd_pid)
    assert find_processes(cfg)  # the daemon's cmdline carries the config path

    d1, d2, d3 = _unique_sleep(), _unique_sleep(), _unique_sleep()
    clients = [
        subprocess.Popen(cluster.ssh_argv(alias, cmd), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for alias, cmd in [
            ("h1", f"sleep {d1}"),
            # a background child that escapes its session (setsid + double fork)
            ("h2", f"setsid sh -c 'sleep {d2} & :' </dev/null >/dev/null 2>&1; sleep {d3}"),
        ]
    ]
    try:
        for d in (d1, d2, d3):
            _wait_for(lambda d=d: _remote(cluster, f"sleep {d}"), what=f"sleep {d}")
        assert len(cluster.session_pids()) == 2
        # Drop one connection first, so its command is orphaned before stop().
        psutil.Process(cluster.session_pids()[0]).kill()

        cluster.stop()
        cluster.stop()  # idempotent

        assert not daemon.is_running()
        assert wait_no_processes(cfg) == []
        for d in (d1, d2, d3):
            assert wait_no_processes(f"sleep {d}") == []
        for c in clients:
            assert c.wait(timeout=10) == 255
        assert cluster.session_pids() == []
        assert not cluster.workdir.exists()  # it made its own workdir: removed
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()


def test_context_manager(tmp_path):
    from tests.sshd import SshCluster, missing_binaries

    if missing_binaries():
        pytest.skip(f"missing {missing_binaries()}")
    workdir = tmp_path / "c"
    with SshCluster(1, workdir) as c:
        assert c.ssh("h1", "echo", "hi").stdout == "hi\n"
        cfg = str(c.sshd_config)
    assert wait_no_processes(cfg) == []
    assert (workdir / "sshd.log").exists()  # caller's workdir is kept


def test_sessions_are_minimal_and_not_interactive(ssh_cluster):
    # root's ~/.bashrc (pyenv init) must not run in sessions
    r = ssh_cluster.ssh("h3", "echo $PATH; echo $PYENV_ROOT; tty || true")
    assert r.returncode == 0, r.stderr
    path, pyenv_root, tty = r.stdout.splitlines()
    assert ".pyenv" not in path and pyenv_root == ""
    assert tty == "not a tty"


def test_many_concurrent_connections(ssh_cluster):
    clients = [
        subprocess.Popen(ssh_cluster.ssh_argv(h.alias, f"echo {h.alias}-{i}"), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4) for h in ssh_cluster.hosts
    ]
    outs = []
    for c in clients:
        out, err = c.communicate(timeout=30)
        assert c.returncode == 0, err
        outs.append(out.strip())
    assert sorted(outs) == sorted(f"{h.alias}-{i}" for i in range(4) for h in ssh_cluster.hosts)
