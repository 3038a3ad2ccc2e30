"""`exolaunch top` against a real 2-rank cluster: one frame (`--once`) shows the model, both
ranks with their shard, the dialects that were used and the recent requests; a wrong key, an
unreachable URL and an unknown job each get one line and a meaningful exit status."""

from __future__ import annotations

import math

import openai
import pytest

from launcher.cli_top import quantile, target_url
from tests.launch_helpers import ServingCluster, env_for_tests, run

MODEL = "demo-llama:tiny"
KEY = "top-key"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ServingCluster(MODEL, "--api-key", KEY, cache=tmp_path_factory.mktemp("models")) as c:
        oa = openai.OpenAI(base_url=c.base_url, api_key=KEY, max_retries=0, timeout=60)
        c.generated = sum(oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=n).usage.completion_tokens for n in (5, 9))
        yield c
        c.stop()


@pytest.mark.slow
def test_top_once_shows_the_cluster(cluster):
    r = run("top", cluster.base_url, "--once", "--interval", "0.5", env=env_for_tests(EXOLAUNCH_API_KEY=KEY,
                                                                                   COLUMNS="160"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert MODEL in out and "ranks up 2/2" in out and "backend ring" in out and "restarts 0" in out
    rows = [ln.replace("│", " ").split() for ln in out.splitlines()]
    assert any(row[:3] == ["0", "local", "TP"] and "up" in row for row in rows), out
    assert any(row[:3] == ["1", "local", "TP"] and "up" in row for row in rows), out
    dialect = next(row for row in rows if row and row[0] == "openai" and len(row) == 7)
    assert dialect[1] == "2" and dialect[3] == str(cluster.generated), out  # requests, generated tokens
    assert sum(1 for row in rows if row[:1] == ["openai"] and len(row) == 8) == 2, out  # the recent requests


@pytest.mark.slow
def test_top_wrong_key_and_unreachable(cluster):
    r = run("top", cluster.base_url, "--once", env=env_for_tests(EXOLAUNCH_API_KEY="nope"))
    assert r.returncode == 2 and "API key" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    from launcher.ports import free_port

    r = run("top", f"127.0.0.1:{free_port()}", "--once")
    assert r.returncode == 1 and "cannot reach" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_top_targets(tmp_path):
    assert target_url(None) == "http://127.0.0.1:52415"
    assert target_url("http://h:1/v1/") == "http://h:1"
    assert target_url("10.0.0.2:8000") == "http://10.0.0.2:8000"
    r = run("top", "abc123", "--once", env=env_for_tests(EXOLAUNCH_JOBS_DIR=str(tmp_path)))
    assert r.returncode == 2 and "no such job" in r.stderr, r.stderr
    r = run("top", "ftp://x:1", "--once")
    assert r.returncode == 2 and "TARGET" in r.stderr, r.stderr
    r = run("top", "--interval", "-1")
    assert r.returncode == 2 and "--interval" in r.stderr


def test_quantile_matches_prometheus():
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (math.inf, 20.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.5)
    assert quantile(0.25, buckets) == pytest.approx(0.3)
    assert quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
