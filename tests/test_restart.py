"""`run --restart N` on a real 2-host cluster (this machine + one host behind a real sshd):
a rank killed with SIGKILL is relaunched while the front door answers 503 + Retry-After; a host
taken away for good (its sshd stopped) gets the model re-planned on the host that remains;
once the restarts are spent the run ends with the failure's status and leaves no rank behind.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import httpx
import openai
import psutil
import pytest

from launcher.restart import Attempt, Policy, Restarter, missing_memory
from launcher.frontdoor import ClusterState
from tests.launch_helpers import ServingCluster

MODEL = "demo-llama:tiny"


def two_hosts(path, far) -> object:
    """Rank 0 on this machine (where the front door is), rank 1 on the sshd host h1."""
    h = far.host("h1")
    path.write_text(f"ssh_config: {far.ssh_config}\nhosts:\n"
                    f"  - {{ssh: local, slots: 1}}\n"
                    f"  - {{ssh: h1, ips: [{h.ip}], slots: 1, python: {sys.executable}}}\n")
    return path


def rank_pid(c: ServingCluster, rank: int) -> int:
    for p in c.rank_pids():
        if psutil.Process(p).environ().get("EXOLAUNCH_RANK") == str(rank):
            return p
    raise AssertionError(f"no rank {rank} running")


def first_token_after(c: ServingCluster, t0: float, timeout: float = 120) -> tuple[float, list]:
    """Seconds from t0 to the first streamed token through the front door; the 503s met meanwhile
    (status, Retry-After, error type)."""
    client = openai.OpenAI(base_url=c.base_url, api_key="x", max_retries=0, timeout=30)
    unavailable = []
    while time.monotonic() - t0 < timeout:
        try:
            stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=4, stream=True, extra_body={"ignore_eos": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    took = time.monotonic() - t0
                    stream.close()
                    return took, unavailable
        except openai.APIStatusError as e:
            assert e.status_code == 503, e
            unavailable.append((e.status_code, e.response.headers.get("retry-after"),
                                e.response.json()["error"]["type"]))
        except openai.APIConnectionError as e:  # the stream in flight when the rank died
            assert "refused" not in str(e.__cause__ or e).lower(), e
        time.sleep(0.1)
    raise AssertionError(f"not serving again within {timeout} s:\n{''.join(c.err)}")


def status(c: ServingCluster) -> dict:
    return httpx.get(f"http://127.0.0.1:{c.port}/exolaunch/status", timeout=10).json()


@pytest.mark.slow
def test_kill_restart_then_host_lost_replanned_then_give_up(ssh_cluster_factory, tmp_path, model_cache):
    far = ssh_cluster_factory(n_hosts=1, workdir=tmp_path / "far")  # its ssh config outlives its sshd
    hf = two_hosts(tmp_path / "two.yaml", far)
    timings = {}
    with ServingCluster(MODEL, "--restart", "2", hostfile=hf, cache=model_cache) as c:
        s = status(c)
        assert (s["state"], s["world_size"], s["hosts"], s["restarts"]) == ("ready", 2, ["local", "h1"], 0)
        first_token_after(c, time.monotonic())

        # 1. A rank killed: the front door says 503 + Retry-After while the cluster relaunches.
        t_kill = time.monotonic()
        os.kill(rank_pid(c, 1), signal.SIGKILL)
        health = None
        while health is None or health.status_code == 200:
            health = httpx.get(f"http://127.0.0.1:{c.port}/health", timeout=10)
            assert time.monotonic() - t_kill < 30
        assert health.status_code == 503 and health.json()["status"] == "restarting"
        assert int(health.headers["retry-after"]) >= 1
        timings["rank killed"], unavailable = first_token_after(c, t_kill)
        assert unavailable and all(u[1] and int(u[1]) >= 1 and u[2] == "service_unavailable_error"
                                   for u in unavailable), unavailable
        s = status(c)
        assert (s["state"], s["world_size"], s["restarts"]) == ("ready", 2, 1)
        assert s["last_failure"] == "rank 1 on h1 was killed by SIGKILL"
        err = "".join(c.err)
        assert "exolaunch: restart 1/2 in 1 s: rank 1 on h1 was killed by SIGKILL" in err

        # 2. The host is gone for good: re-planned on the one that remains.
        t_gone = time.monotonic()
        far.stop()
        timings["host gone"], _ = first_token_after(c, t_gone)
        s = status(c)
        assert (s["state"], s["world_size"], s["hosts"], s["restarts"]) == ("ready", 1, ["local"], 2)
        err = "".join(c.err)
        assert "h1 gone (h1: " in err and "Connection refused" in err and f"re-planned {MODEL} on local: tensor over 1 rank(s)" in err, err
        assert f"serving {MODEL} again on 1 rank(s): {c.base_url} (restart 2/2" in err

        # 3. Restarts spent: the next death ends the run with its status, no rank left behind.
        os.kill(rank_pid(c, 0), signal.SIGKILL)
        c.proc.wait(60)
        c.stop(expect=128 + signal.SIGKILL)
        assert "giving up after 2 restart(s) (--restart 2): rank 0 on local was killed by SIGKILL" in "".join(c.err)
    print(f"\nkill -> first good token: {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}")


def test_host_lost_and_model_too_big_for_the_rest_keeps_retrying_the_full_cluster(ssh_cluster_factory, tmp_path):
    """The real doctor and planner: h1 unreachable, kimi-k2 cannot fit on this machine alone ->
    one line naming the missing memory per restart, never a launch on too little memory."""
    from launcher.hostfile import load_hostfile
    from launcher.doctor import run_checks
    from launcher.planner import plan_for

    far = ssh_cluster_factory(n_hosts=1)
    hf = load_hostfile(two_hosts(tmp_path / "two.yaml", far))
    far.stop()
    state = ClusterState(model="kimi-k2", max_restarts=2)
    launched, said = [], []

    def launch(a: Attempt) -> int:
        launched.append([h.name for h in a.hostfile.hosts])
        state.last_failure = "lost rank 1 on h1: the SSH connection was lost (exit 255)"
        return 255

    r = Restarter(Policy(max_restarts=2, backoff=0.01), state, launch=launch, say=said.append,
                  check=lambda h, np: run_checks(h, None, np=np, connect_timeout=5),
                  replan=lambda h, np: plan_for("kimi-k2", h, np=np))
    assert r.run(Attempt(hf, None, None)) == 255
    assert launched == [["local", "h1"]] and state.restarts == 2
    assert said[0] == "restart 1/2 in 0.01 s: lost rank 1 on h1: the SSH connection was lost (exit 255)"
    assert said[1].startswith("h1 gone (h1: ") and "kimi-k2 does not fit on local: local needs " in said[1]
    assert said[1].endswith("GB usable; retrying the full cluster")
    assert said[-1].startswith("giving up after 2 restart(s) (--restart 2): h1 gone")


def test_backoff_doubles_up_to_its_cap():
    p = Policy(max_restarts=9, backoff=1.0, backoff_max=30.0)
    assert [p.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_missing_memory_names_host_and_numbers():
    from launcher.hostfile import builtin_local
    from launcher.planner import plan_for

    line = missing_memory(plan_for("kimi-k2", builtin_local(1)))
    assert line.startswith("local needs ") and " GB for rank 0, has " in line
