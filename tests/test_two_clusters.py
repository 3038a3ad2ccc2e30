"""Two clusters on one host: when every rank is local and nobody asked for ports, `run` takes
free ones (the defaults may be another cluster's); ports that were asked for are kept."""

from __future__ import annotations

import re
import threading

import httpx
import psutil
import pytest

from runtime import contract
from tests.launch_helpers import ServingCluster, run


def _control(out: str) -> set[str]:
    return set(re.findall(rf"{contract.ENV_CONTROL}=(\S+)", out))


def test_local_ranks_get_free_ports_and_asked_for_ports_are_kept(tmp_path):
    first, second = (_control(run("run", "demo-llama:tiny", "--dry-run").stdout) for _ in range(2))
    assert len(first) == 1 and first != second  # free ports, picked per run
    (ctl,) = first
    assert ctl.startswith("127.0.0.1:") and ctl != f"127.0.0.1:{contract.DEFAULT_DATA_PORT - 1}"
    assert _control(run("run", "demo-llama:tiny", "--dry-run", "--data-port", "41000").stdout) == {"127.0.0.1:40999"}
    hf = tmp_path / "h.yaml"
    hf.write_text("port: 42000\nhosts:\n  - {ssh: local, slots: 2}\n")
    assert _control(run("--hostfile", str(hf), "run", "demo-llama:tiny", "--dry-run").stdout) == {"127.0.0.1:41999"}
    # Not all local: ports are the hostfile's, the control channel on rank 0's data-plane address.
    remote = run("--hostfile", "hostfiles/tb5.yaml", "run", "demo-llama:tiny", "--dry-run").stdout
    assert _control(remote) == {f"10.10.0.1:{contract.DEFAULT_DATA_PORT - 1}"}, remote


def _control_of(c: ServingCluster) -> str:
    return psutil.Process(c.rank_pids()[0]).environ()[contract.ENV_CONTROL]


@pytest.mark.slow
def test_two_local_clusters_started_at_once_with_default_ports(model_cache):
    body = {"model": "demo-llama:tiny", "prompt": "hi", "max_tokens": 4, "temperature": 0}
    started: dict = {}

    def start(name):
        try:
            started[name] = ServingCluster("demo-llama:tiny", cache=model_cache, data_port=None)
        except AssertionError as e:  # did not come up: reported below
            started[name] = e

    threads = [threading.Thread(target=start, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    try:
        a, b = started["a"], started["b"]
        assert isinstance(a, ServingCluster) and isinstance(b, ServingCluster), started
        assert _control_of(a) != _control_of(b)
        for c in (a, b):
            r = httpx.post(f"{c.base_url}/completions", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        for c in (a, b):
            c.stop()
    finally:
        for c in started.values():
            if isinstance(c, ServingCluster):
                c.__exit__(None, None, None)
