"""`run --speculative ngram` end to end: 2 tensor-parallel ranks verify rank-local n-gram drafts in
lock-step and serve the same greedy tokens as a plain cluster; usage reports the drafts in
OpenAI's prediction fields and /metrics counts them under vLLM's spec_decode names."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.launch_helpers import ServingCluster
from tests.test_speculative import LOOP

pytestmark = pytest.mark.slow

MODEL = "demo-llama:tiny"


def greedy(base_url: str) -> tuple[list[int], object]:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    r = client.completions.create(model=MODEL, prompt=LOOP, max_tokens=64, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 64
    return r.choices[0].logprobs.tokens, r.usage


def test_speculative_two_ranks_same_tokens_and_reported(model_cache):
    with ServingCluster(MODEL, cache=model_cache) as plain:
        reference, usage = greedy(plain.base_url)
        assert usage.completion_tokens_details is None  # no speculation: no prediction fields
        plain.stop()
    with ServingCluster(MODEL, "--speculative", "ngram", cache=model_cache) as spec:
        got, usage = greedy(spec.base_url)
        metrics = httpx.get(spec.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
        spec.stop()
    assert got == reference
    details = usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens >= 0
    counters = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("exolaunch:spec_decode")}
    assert counters["exolaunch:spec_decode_num_accepted_tokens_total"] == details.accepted_prediction_tokens
    assert counters["exolaunch:spec_decode_num_draft_tokens_total"] == (
        details.accepted_prediction_tokens + details.rejected_prediction_tokens)
    assert counters["exolaunch:spec_decode_num_drafts_total"] >= 1


def test_draft_model_two_ranks_same_tokens_and_reported(model_cache):
    # the served model as its own draft: rank 0 drafts, both ranks verify; greedy tokens are the
    # plain cluster's (its reference is recomputed: this test must stand alone)
    with ServingCluster(MODEL, cache=model_cache) as plain:
        reference, _ = greedy(plain.base_url)
        plain.stop()
    with ServingCluster(MODEL, "--draft", MODEL, cache=model_cache) as spec:
        got, usage = greedy(spec.base_url)
        spec.stop()
    assert got == reference
    details = usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 0.9 * (details.accepted_prediction_tokens
                                                        + details.rejected_prediction_tokens) > 0


def test_draft_and_ngram_together_is_one_line_and_exit_2():
    from tests.launch_helpers import run

    r = run("run", MODEL, "--speculative", "ngram", "--draft", MODEL)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"exolaunch: error: --speculative ngram and --draft {MODEL}: choose one source of drafts."]
