"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

from tests.sshd import SshCluster, SshdError, missing_binaries


def _require_sshd() -> None:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"real-SSH tests need OpenSSH: missing {', '.join(missing)}")
    if os.geteuid() != 0:
        pytest.skip("real-SSH tests run sshd and log in as root: need to run as root")


@pytest.fixture(scope="session")
def ssh_cluster():
    """A started SshCluster with 4 hosts h1..h4 (127.0.0.2..127.0.0.5), shared by the session."""
    _require_sshd()
    cluster = SshCluster(n_hosts=4)
    try:
        cluster.start()
    except SshdError:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ssh_cluster_factory():
    """Build extra, private SshClusters: ``ssh_cluster_factory(n_hosts=2)``; all stopped at teardown."""
    _require_sshd()
    made: list[SshCluster] = []

    def make(n_hosts: int = 2, **kwargs) -> SshCluster:
        c = SshCluster(n_hosts=n_hosts, **kwargs)
        made.append(c)
        c.start()
        return c

    try:
        yield make
    finally:
        for c in made:
            c.stop()
