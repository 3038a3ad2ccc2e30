"""Shared pytest fixtures."""

from __future__ import annotations

import contextlib
import os
import time

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


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """An EXOLAUNCH_CACHE shared by every test that launches a cluster (demo models are
    generated once per session)."""
    return tmp_path_factory.mktemp("models")


# -- API tests: a 1-rank engine in this process, served on a free loopback port ------------------

API_MODEL = "demo-llama"


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory):
    from runtime.demo_models import ensure

    return ensure(API_MODEL, cache_dir=tmp_path_factory.mktemp("models"), size="tiny")


@contextlib.contextmanager
def running_engine(model_path, **engine_kw):
    """A 1-rank engine in this process (Engine.start_local), ready, shut down at exit."""
    from runtime.engine import Engine

    eng = Engine.start_local(model_path, model_id=API_MODEL, **engine_kw)
    deadline = time.monotonic() + 60
    while not eng.ready and time.monotonic() < deadline:
        time.sleep(0.02)
    assert eng.ready, eng.failed
    try:
        yield eng
    finally:
        eng.shutdown()
        # The engine thread's C++ thread-locals are destroyed after join() returns; give them a
        # moment so interpreter finalization does not race them (mlx aborts otherwise).
        time.sleep(0.5)


@pytest.fixture(scope="module")
def engine(demo_model_path):
    with running_engine(demo_model_path) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    from runtime.api import start_server

    srv = start_server(engine, "127.0.0.1", 0)
    yield srv
    srv.stop()
