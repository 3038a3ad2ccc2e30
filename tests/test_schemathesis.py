"""Property-based fuzzing of every route of the four dialects from the app's own OpenAPI schema
(GET /openapi.json: the pydantic request bodies), with Schemathesis, against a real 2-rank
cluster: valid and schema-violating bodies alike get an answer below 500, and no rank dies.

Bounded in time: a few dozen examples per operation, and --max-model-len 32 so that no valid
request generates for long (a prompt and its output share those 32 tokens)."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.launch_helpers import ServingCluster

pytestmark = pytest.mark.slow

MODEL = "demo-llama:tiny"
EXAMPLES = 50  # per operation (and method): about a minute and a half in all


@pytest.fixture(scope="module")
def cluster(model_cache):
    with ServingCluster(MODEL, "--max-model-len", "32", cache=model_cache) as c:
        c.root = c.base_url.removesuffix("/v1")
        c.pids = sorted(c.rank_pids())
        assert len(c.pids) == 2, c.pids
        yield c
        c.stop()


@pytest.fixture(scope="module")
def api_schema(cluster):
    return schemathesis.openapi.from_url(f"{cluster.root}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_error(case):
    case.call_and_validate(checks=[not_a_server_error], timeout=60)


def test_every_dialect_in_the_schema(cluster):
    paths = set(httpx.get(f"{cluster.root}/openapi.json").json()["paths"])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
            "/api/chat", "/api/generate", "/api/show"} <= paths


def test_no_rank_died(cluster):
    assert sorted(cluster.rank_pids()) == cluster.pids, "a rank restarted or died"
    assert cluster.proc.poll() is None
    r = httpx.post(f"{cluster.base_url}/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
