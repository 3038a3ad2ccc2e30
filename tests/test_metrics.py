"""GET /metrics on a real 2-rank cluster (tensor parallel, an API key): counters move by exactly
the requests and tokens each official SDK sent and was told about (streamed and not, every
dialect), the histograms observe every request, per-rank series come from both ranks,
`promtool check metrics` accepts the text, and scrapes keep working under load."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import threading
import time

import anthropic
import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.launch_helpers import ServingCluster

pytestmark = pytest.mark.slow

MODEL = "demo-llama:tiny"
KEY = "metrics-test-key"
DIALECTS = ("openai", "responses", "anthropic", "ollama")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ServingCluster(MODEL, "--api-key", KEY, cache=tmp_path_factory.mktemp("models")) as c:
        c.root = c.base_url.removesuffix("/v1")
        c.http = httpx.Client(base_url=c.root, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield c
        c.http.close()
        c.stop()


def scrape(cluster) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the exolaunch: series."""
    r = cluster.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name.startswith("exolaunch:"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: dict, name: str, **match) -> float:
    return sum(v for (n, labels), v in m.items()
               if n == "exolaunch:" + name and all(dict(labels).get(k) == x for k, x in match.items()))


def test_metrics_need_the_key_health_does_not(cluster):
    with httpx.Client(base_url=cluster.root, timeout=30) as anon:
        assert anon.get("/metrics").status_code == 401
        assert anon.get("/exolaunch/stats").status_code == 401
        assert anon.get("/health").status_code == 200
        # Ollama's plain-text root stays for clients that do not ask for HTML (and needs the key).
        assert anon.get("/").status_code == 401
    assert cluster.http.get("/").text == "Ollama is running"


def _send_all(cluster) -> dict[str, dict[str, int]]:
    """One streamed and one whole request per dialect; what each SDK reported as usage."""
    sent = {d: {"requests": 0, "prompt": 0, "generation": 0} for d in DIALECTS}

    def note(dialect, prompt, generation):
        sent[dialect]["requests"] += 1
        sent[dialect]["prompt"] += prompt
        sent[dialect]["generation"] += generation

    oa = openai.OpenAI(base_url=cluster.base_url, api_key=KEY, max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "count the rivers of France"}]
    r = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=9)
    note("openai", r.usage.prompt_tokens, r.usage.completion_tokens)
    usage = None
    for chunk in oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=7, stream=True,
                                            stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    note("openai", usage.prompt_tokens, usage.completion_tokens)
    r = oa.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    note("openai", r.usage.prompt_tokens, r.usage.completion_tokens)

    r = oa.responses.create(model=MODEL, input="name a colour", max_output_tokens=6)
    note("responses", r.usage.input_tokens, r.usage.output_tokens)
    done = None
    for ev in oa.responses.create(model=MODEL, input="name a fruit", max_output_tokens=8, stream=True):
        if ev.type in ("response.completed", "response.incomplete"):
            done = ev.response
    note("responses", done.usage.input_tokens, done.usage.output_tokens)

    an = anthropic.Anthropic(base_url=cluster.root, api_key=KEY, max_retries=0, timeout=60)
    m = an.messages.create(model=MODEL, max_tokens=6, messages=[{"role": "user", "content": "hi"}])
    note("anthropic", m.usage.input_tokens + m.usage.cache_read_input_tokens, m.usage.output_tokens)
    with an.messages.stream(model=MODEL, max_tokens=9, messages=[{"role": "user", "content": "hello"}]) as s:
        m = s.get_final_message()
    note("anthropic", m.usage.input_tokens + m.usage.cache_read_input_tokens, m.usage.output_tokens)

    ol = ollama.Client(host=cluster.root, headers={"Authorization": f"Bearer {KEY}"})
    r = ol.chat(model=MODEL, messages=[{"role": "user", "content": "hey"}], options={"num_predict": 5})
    note("ollama", r.prompt_eval_count, r.eval_count)
    last = None
    for last in ol.generate(model=MODEL, prompt="tell me", options={"num_predict": 7}, stream=True):
        pass
    note("ollama", last.prompt_eval_count, last.eval_count)
    return sent


def test_counters_move_by_exactly_what_was_sent_in_every_dialect(cluster):
    before = scrape(cluster)
    sent = _send_all(cluster)
    after = scrape(cluster)

    def delta(name, **match):
        return total(after, name, **match) - total(before, name, **match)

    for d, s in sent.items():
        got = {"requests": delta("request_success_total", dialect=d, model_name=MODEL),
               "prompt": delta("prompt_tokens_total", dialect=d), "generation": delta("generation_tokens_total", dialect=d)}
        assert got == s, f"{d}: metrics moved by {got}, the clients were told {s}"
        for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                     "request_prompt_tokens", "request_generation_tokens"):
            assert delta(hist + "_count", dialect=d) == s["requests"], (d, hist)
        assert delta("request_prompt_tokens_sum", dialect=d) == s["prompt"]
        assert delta("request_generation_tokens_sum", dialect=d) == s["generation"]
        # One inter-token gap per token after the first, in each request.
        assert delta("inter_token_latency_seconds_count", dialect=d) == s["generation"] - s["requests"]
        assert delta("time_to_first_token_seconds_sum", dialect=d) > 0
    if total(after, "prefix_cache_queries_total"):  # with a prefix cache, every prompt is looked up
        assert delta("prefix_cache_queries_total") == sum(s["prompt"] for s in sent.values())
        assert 0 <= delta("prefix_cache_hits_total") <= delta("prefix_cache_queries_total")
    # max_tokens ended every one of them
    assert delta("request_success_total", finished_reason="length") == sum(s["requests"] for s in sent.values())
    assert total(after, "num_requests_running") == 0 and total(after, "kv_cache_usage_perc") == 0


def test_a_client_that_leaves_counts_as_abort(cluster):
    before = scrape(cluster)
    with cluster.http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
            "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then gone
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = scrape(cluster)
        if total(after, "request_success_total", finished_reason="abort") > \
                total(before, "request_success_total", finished_reason="abort"):
            break
        time.sleep(0.2)
    assert total(after, "request_success_total", finished_reason="abort") - \
        total(before, "request_success_total", finished_reason="abort") == 1
    assert total(after, "prompt_tokens_total") > total(before, "prompt_tokens_total")
    assert total(after, "generation_tokens_total") - total(before, "generation_tokens_total") < 400


def test_every_rank_reports(cluster):
    time.sleep(1.5)  # a follower reports once a second
    m = scrape(cluster)
    assert total(m, "ranks") == 2 and total(m, "ranks_up") == 2
    for rank in ("0", "1"):
        assert total(m, "rank_up", rank=rank) == 1
        assert total(m, "rank_step_seconds_count", rank=rank) > 0
        assert total(m, "rank_step_seconds_sum", rank=rank) > 0
        assert total(m, "rank_memory_bytes", rank=rank, kind="rss") > 10e6
        assert total(m, "rank_memory_budget_bytes", rank=rank) > 0  # from the plan run made
    # Lock-step: both ranks ran the same steps (a follower's report may lag by a second).
    steps0, steps1 = (total(m, "rank_step_seconds_count", rank=r) for r in "01")
    assert abs(steps0 - steps1) <= steps0 * 0.5
    stats = cluster.http.get("/exolaunch/stats").json()
    assert [r["rank"] for r in stats["cluster"]["ranks"]] == [0, 1]
    assert stats["cluster"]["backend"] == "ring" and stats["cluster"]["ranks_up"] == 2


def test_promtool_accepts_the_scrape(cluster):
    if shutil.which("promtool") is None:
        pytest.skip("promtool is absent (Debian package `prometheus`; scripts/install.sh --dev installs it)")
    text = cluster.http.get("/metrics").text
    assert "exolaunch:time_to_first_token_seconds_bucket" in text  # observed series, not just HELP lines
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    # promtool's one complaint is the ':' that vLLM's names (vllm:...) carry too: Prometheus reserves it
    # for recording rules, yet scrapes it fine. Everything else must be clean, which the same text
    # with '_' for ':' proves (promtool exits 0).
    assert all(p.endswith("metric names should not contain ':'") for p in problems), problems
    r = subprocess.run(["promtool", "check", "metrics"], input=text.replace("exolaunch:", "exolaunch_"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scrapes_under_load(cluster):
    """8 streams at once while a scraper polls: every scrape parses, sees the load, and the
    counters add up afterwards. Prints what a scrape costs."""
    before = scrape(cluster)
    oa = openai.OpenAI(base_url=cluster.base_url, api_key=KEY, max_retries=0, timeout=120)
    got: list[int] = []
    errors: list[BaseException] = []

    def stream():
        try:
            n = None
            for chunk in oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                    max_tokens=48, stream=True, stream_options={"include_usage": True}):
                n = chunk.usage.completion_tokens if chunk.usage else n
            got.append(n)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    costs, running = [], []
    while any(t.is_alive() for t in threads):
        t0 = time.perf_counter()
        m = scrape(cluster)
        costs.append((time.perf_counter() - t0) * 1000)
        running.append(total(m, "num_requests_running") + total(m, "num_requests_waiting"))
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors, errors
    assert max(running) > 0, "no scrape saw the load"
    after = scrape(cluster)
    assert total(after, "generation_tokens_total") - total(before, "generation_tokens_total") == sum(got)
    assert total(after, "request_success_total") - total(before, "request_success_total") == 8
    idle = []
    for _ in range(20):
        t0 = time.perf_counter()
        cluster.http.get("/metrics")
        idle.append((time.perf_counter() - t0) * 1000)
    size = len(cluster.http.get("/metrics").content)
    print(f"\nscrape cost: median {statistics.median(idle):.1f} ms idle, {statistics.median(costs):.1f} ms under "
          f"8 streams ({len(costs)} scrapes, max {max(costs):.1f} ms); {size} bytes")
    assert re.search(r"exolaunch:inter_token_latency_seconds_count\{", cluster.http.get("/metrics").text)
