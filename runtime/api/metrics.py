"""Prometheus metrics for rank 0's API: one registry per app, named as in vLLM but under
`exolaunch:` (a Grafana board made for vLLM works once its prefix is changed).

Request series, labelled model_name and dialect (openai | responses | anthropic | ollama); the
serving handle (generation.py) feeds them through `Metrics.track`:
    prompt_tokens_total, generation_tokens_total     counters (as prefill ends, as tokens stream)
    request_success_total{finished_reason}           stop | length | abort (cancelled)
    request_failure_total                            finished by an engine error
    time_to_first_token_seconds, inter_token_latency_seconds, e2e_request_latency_seconds,
    request_queue_time_seconds, request_prompt_tokens, request_generation_tokens   histograms
TTFT and e2e run from the HTTP request's arrival (`RequestOrigin`), queue time from submit to
the step that admits the request.

Read at scrape time (`ClusterCollector`), labelled model_name:
    num_requests_running, num_requests_waiting, kv_cache_usage_perc (0..1 of --max-total-tokens)
    ranks, ranks_up, rank_up{rank,host}; per rank: rank_step_seconds (histogram of the batched
    forward's wall time, all-reduces included), rank_wait_seconds_total (a follower waiting for
    rank 0's next decision while requests run), rank_memory_bytes{kind=rss|mlx_active|mlx_peak},
    rank_memory_budget_bytes and host_memory_usable_bytes (from the plan, when run had one)

`status()` is the same state as JSON for the dashboard and `exolaunch top`, plus the recent
requests. With a prefix cache, rank 0 adds prefix_cache_queries_total and prefix_cache_hits_total
(tokens, as vLLM counts them); with --speculative, spec_decode_num_drafts_total,
spec_decode_num_draft_tokens_total and spec_decode_num_accepted_tokens_total. Restarts are the front door's (launcher/frontdoor.py): a rank 0
restarted with its cluster starts from zero, so it cannot count them.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from contextvars import ContextVar
from typing import Any, Iterable

from prometheus_client import (
    CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from ..contract import ENV_BACKEND, ENV_HOST, ENV_PLAN
from ..requests import FinishEvent, RequestHandle, TokenEvent
from ..stepstats import STEP_BUCKETS, memory

disable_created_metrics()  # the *_created series double a scrape and no dashboard reads them

PREFIX = "exolaunch:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT = 50  # requests the dashboard lists
PEER_STALE_S = 3.5  # a follower reports every second; silent this long, it is down

# vLLM's buckets (vllm/engine/metrics.py), so its boards' quantiles mean the same here.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}  # vLLM's finished_reason values

# The route a request came in on names its dialect.
DIALECT_PATHS = {"/v1/chat/completions": "openai", "/v1/completions": "openai",
                 "/v1/responses": "responses", "/v1/messages": "anthropic",
                 "/api/chat": "ollama", "/api/generate": "ollama"}

_origin: ContextVar[tuple[str, float] | None] = ContextVar("exolaunch_origin", default=None)


def token_buckets(max_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (vLLM's build_1_2_5_buckets)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if v > max_len:
                return out
            out.append(float(v))
        exp += 1


class RequestOrigin:
    """ASGI middleware: note each request's dialect (by path) and arrival time in a context
    variable that `Metrics.track` reads on submit (the dialect routes need not pass them)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            _origin.set((DIALECT_PATHS.get(scope.get("path", ""), "other"), time.monotonic()))
        await self.app(scope, receive, send)


class _Track:
    """One engine request's timeline, from submit to its FinishEvent (or its cancellation)."""

    __slots__ = ("m", "handle", "dialect", "arrived", "submitted", "first", "last", "tokens", "done",
                 "itl", "gen", "prompt")

    def __init__(self, m: "Metrics", handle: RequestHandle, dialect: str, arrived: float, now: float):
        self.m, self.handle, self.dialect = m, handle, dialect
        self.arrived, self.submitted = arrived, now
        self.first = self.last = 0.0
        self.tokens = 0
        self.done = False
        self.itl = m.itl.labels(m.model_name, dialect)  # the per-token path resolves labels once
        self.gen = m.generation_tokens.labels(m.model_name, dialect)
        self.prompt = 0  # prompt tokens counted (at the first token: prefill is done then)

    def token(self, now: float) -> None:
        if self.tokens == 0:
            self.first = now
            self.prompt = len(self.handle.request.prompt_tokens)
            self.m.prompt_tokens.labels(self.m.model_name, self.dialect).inc(self.prompt)
        else:
            self.itl.observe(now - self.last)
        self.last = now
        self.tokens += 1
        self.gen.inc()

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int, now: float) -> None:
        if self.done:
            return
        self.done = True
        m, labels = self.m, (self.m.model_name, self.dialect)
        if completion_tokens > self.tokens:  # tokens the stream never showed (an error's count)
            self.gen.inc(completion_tokens - self.tokens)
        generated = max(completion_tokens, self.tokens)
        if prompt_tokens > self.prompt:
            m.prompt_tokens.labels(*labels).inc(prompt_tokens - self.prompt)
        if reason == "error":
            m.request_failure.labels(*labels).inc()
        else:
            m.request_success.labels(*labels, REASONS.get(reason, reason)).inc()
        e2e = now - self.arrived
        m.e2e.labels(*labels).observe(e2e)
        m.prompt_hist.labels(*labels).observe(prompt_tokens)
        m.gen_hist.labels(*labels).observe(generated)
        ttft = self.first - self.arrived if self.tokens else None
        if ttft is not None:
            m.ttft.labels(*labels).observe(ttft)
        admitted = self.handle.admitted_at
        queue = admitted - self.submitted if admitted is not None else None
        if queue is not None:
            m.queue.labels(*labels).observe(max(0.0, queue))
        decode = self.last - self.first if self.tokens > 1 else 0.0
        m.finished(self.handle, {
            "id": self.handle.id, "dialect": self.dialect, "model": m.model_name,
            "finished_reason": REASONS.get(reason, reason), "prompt_tokens": prompt_tokens,
            "generation_tokens": generated, "ttft_s": ttft, "queue_s": queue, "e2e_s": e2e,
            "tokens_per_s": (self.tokens - 1) / decode if decode > 0 else None,
            "finished_at": time.time(),
        })


class Tracks:
    """The tracks of one API request's engine requests (what `Generation` holds)."""

    def __init__(self, tracks: list[_Track]):
        self.tracks = tracks

    def event(self, i: int, ev: TokenEvent | FinishEvent) -> None:
        now = time.monotonic()
        if isinstance(ev, TokenEvent):
            self.tracks[i].token(now)
        else:
            self.tracks[i].finish(ev.reason, ev.prompt_tokens, ev.completion_tokens, now)

    def close(self) -> None:
        """The consumer stopped (client gone, error): whatever has not finished was cancelled."""
        now = time.monotonic()
        for t in self.tracks:
            if not t.done:
                t.finish("cancelled", len(t.handle.request.prompt_tokens), t.tokens, now)


class Metrics:
    """One per app (`create_app`): the registry /metrics renders, and the recent requests."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.model_name = str(engine.model_id)
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name", "dialect"]
        max_len = int(getattr(engine, "context_length", 0) or 4096)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                                       [*labels, "finished_reason"], registry=r)
        self.request_failure = Counter(PREFIX + "request_failure", "Count of requests the engine failed.",
                                       labels, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Histogram of time to first token in "
                              "seconds (from the request's arrival).", labels, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Histogram of end to end request latency "
                             "in seconds.", labels, buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Histogram of time spent waiting for a "
                               "batch slot in seconds.", labels, buckets=E2E_BUCKETS, registry=r)
        self.prompt_hist = Histogram(PREFIX + "request_prompt_tokens", "Number of prefill tokens processed.",
                                     labels, buckets=token_buckets(max_len), registry=r)
        self.gen_hist = Histogram(PREFIX + "request_generation_tokens", "Number of generation tokens processed.",
                                  labels, buckets=token_buckets(max_len), registry=r)
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT)
        self._open: dict[int, RequestHandle] = {}  # submitted, not finished: their KV reservation
        self._lock = threading.Lock()
        self.started = time.time()
        self.cluster = ClusterCollector(self)
        r.register(self.cluster)

    # --- feeding --------------------------------------------------------------------------
    def track(self, handles: list[RequestHandle]) -> Tracks:
        now = time.monotonic()
        dialect, arrived = _origin.get() or ("other", now)
        with self._lock:
            for h in handles:
                self._open[id(h)] = h
        return Tracks([_Track(self, h, dialect, arrived, now) for h in handles])

    def finished(self, handle: RequestHandle, record: dict) -> None:
        with self._lock:
            self._open.pop(id(handle), None)
            self.recent.append(record)

    # --- reading --------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def kv_usage(self) -> float | None:
        """Fraction of the KV budget (--max-total-tokens) the admitted, unfinished requests reserve."""
        budget = getattr(self.engine, "max_total_tokens", None)
        if not budget:
            return None
        with self._lock:
            used = sum(h.request.kv_tokens for h in self._open.values() if h.admitted_at is not None and not h.done)
        return min(1.0, used / budget)

    def totals(self) -> dict:
        """Counters summed over the label values, for the status JSON."""
        def total(metric, suffix: str = "_total", where=None) -> float:
            s = 0.0
            for fam in metric.collect():
                for sample in fam.samples:
                    if sample.name.endswith(suffix) and (where is None or where(sample.labels)):
                        s += sample.value
            return s

        return {
            "prompt_tokens": int(total(self.prompt_tokens)),
            "generation_tokens": int(total(self.generation_tokens)),
            "requests": int(total(self.request_success) + total(self.request_failure)),
            "requests_failed": int(total(self.request_failure)),
            "requests_aborted": int(total(self.request_success, where=lambda lb: lb.get("finished_reason") == "abort")),
        }

    def status(self) -> dict:
        running, waiting = self.engine.load()
        with self._lock:
            recent = list(self.recent)[::-1]
        return {
            "model": self.model_name, "time": time.time(), "uptime_s": time.time() - self.started,
            "state": "failed" if self.engine.failed else ("ready" if self.engine.ready else "loading"),
            "failed": self.engine.failed, "running": running, "waiting": waiting,
            "kv_cache_usage": self.kv_usage(), "max_num_seqs": getattr(self.engine, "max_num_seqs", None),
            "max_total_tokens": getattr(self.engine, "max_total_tokens", None),
            "context_length": getattr(self.engine, "context_length", None),
            "totals": self.totals(), "cluster": self.cluster.cluster(), "recent": recent,
            "prefix_cache": self.prefix_cache(),
        }

    def prefix_cache(self) -> dict | None:
        stats = getattr(self.engine, "stats", None)
        if stats is None or stats.prefix_queries is None:
            return None
        return {"queried_tokens": stats.prefix_queries, "hit_tokens": stats.prefix_hits}


def _plan() -> dict:
    try:
        plan = json.loads(os.environ.get(ENV_PLAN) or "{}")
    except ValueError:
        return {}
    return plan if isinstance(plan, dict) else {}


class ClusterCollector(Collector):
    """What is read, not counted, at scrape time: load, KV usage and every rank's report."""

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self.plan = _plan()

    def ranks(self) -> list[dict]:
        """Per rank: host, up, last stats (rank 0: its own; others: their last report)."""
        engine = self.m.engine
        group = getattr(engine, "group", None)
        world = group.size() if group is not None else 1
        planned = {r.get("rank"): r for r in self.plan.get("ranks", []) if isinstance(r, dict)}
        stats = getattr(engine, "stats", None)
        leader = getattr(engine, "control", None)
        peers = dict(getattr(leader, "peer_stats", None) or {})
        now = time.monotonic()
        out = []
        for rank in range(world):
            if rank == 0:
                snap = stats.snapshot() if stats is not None else memory()
                up = not engine.failed
            else:
                snap = peers.get(rank) or {}
                up = bool(snap) and now - snap.get("received", 0.0) < PEER_STALE_S and not engine.failed
            plan = planned.get(rank, {})
            host = snap.get("host") or plan.get("host") or (os.environ.get(ENV_HOST, "") if rank == 0 else "")
            out.append({"rank": rank, "host": host or "local", "up": up, "shard": plan.get("shard"),
                        "need_gb": plan.get("need_gb"), "usable_gb": plan.get("usable_gb"),
                        **{k: v for k, v in snap.items() if k not in ("host", "received", "time")}})
        return out

    def cluster(self) -> dict:
        ranks = self.ranks()
        return {"backend": os.environ.get(ENV_BACKEND) or self.plan.get("backend"),
                "sharding": self.plan.get("sharding"), "world_size": len(ranks),
                "ranks_up": sum(r["up"] for r in ranks), "ranks": ranks, "links": self.plan.get("links", [])}

    def collect(self) -> Iterable:
        m, name = self.m, self.m.model_name
        running, waiting = m.engine.load()
        for metric, doc, value in (
                ("num_requests_running", "Number of requests in model execution batches.", running),
                ("num_requests_waiting", "Number of requests waiting to be processed.", waiting),
                ("kv_cache_usage_perc", "KV-cache usage (of the --max-total-tokens budget). 1 means 100 percent "
                                        "usage.", m.kv_usage())):
            if value is not None:
                g = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
                g.add_metric([name], value)
                yield g
        stats = getattr(m.engine, "stats", None)
        if stats is not None and stats.prefix_queries is not None:  # vLLM's: counted in tokens
            for metric, doc, value in (
                    ("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                     stats.prefix_queries),
                    ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", stats.prefix_hits)):
                c = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
                c.add_metric([name], value)
                yield c
        spec = getattr(m.engine, "spec", None)
        if spec is not None:  # vLLM's spec_decode counters
            for metric, doc, value in (
                    ("spec_decode_num_drafts", "Number of spec decoding drafts.", spec.num_drafts),
                    ("spec_decode_num_draft_tokens", "Number of draft tokens.", spec.num_draft_tokens),
                    ("spec_decode_num_accepted_tokens", "Number of accepted tokens.", spec.num_accepted_tokens)):
                c = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
                c.add_metric([name], value)
                yield c
        ranks = self.ranks()
        g = GaugeMetricFamily(PREFIX + "ranks", "Ranks in the cluster (world size).", labels=["model_name"])
        g.add_metric([name], len(ranks))
        yield g
        g = GaugeMetricFamily(PREFIX + "ranks_up", "Ranks that reported within the last seconds.",
                              labels=["model_name"])
        g.add_metric([name], sum(r["up"] for r in ranks))
        yield g
        up = GaugeMetricFamily(PREFIX + "rank_up", "1 if the rank reported within the last seconds.",
                               labels=["rank", "host"])
        step = HistogramMetricFamily(PREFIX + "rank_step_seconds", "Wall time of one batched forward on the rank, "
                                     "its tensor-parallel all-reduces included.", labels=["rank", "host"])
        wait = CounterMetricFamily(PREFIX + "rank_wait_seconds", "Seconds a follower waited for rank 0's next step "
                                   "decision while requests ran.", labels=["rank", "host"])
        mem = GaugeMetricFamily(PREFIX + "rank_memory_bytes", "Memory of the rank's process: resident (rss) and "
                                "mlx's active and peak allocations.", labels=["rank", "host", "kind"])
        budget = GaugeMetricFamily(PREFIX + "rank_memory_budget_bytes", "What the plan sized for the rank: "
                                   "weights, KV cache and headroom.", labels=["rank", "host"])
        usable = GaugeMetricFamily(PREFIX + "host_memory_usable_bytes", "The plan's usable memory of the rank's "
                                   "host (shared by its ranks).", labels=["rank", "host"])
        for r in ranks:
            lb = [str(r["rank"]), r["host"]]
            up.add_metric(lb, 1.0 if r["up"] else 0.0)
            if isinstance(r.get("buckets"), list) and len(r["buckets"]) == len(STEP_BUCKETS) + 1:
                acc, cum = 0, []
                for bound, n in zip([*map(str, STEP_BUCKETS), "+Inf"], r["buckets"]):
                    acc += int(n)
                    cum.append((bound, acc))
                step.add_metric(lb, cum, float(r.get("step_seconds", 0.0)))
                wait.add_metric(lb, float(r.get("wait_seconds", 0.0)))
            for kind in ("rss", "mlx_active", "mlx_peak"):
                if isinstance(r.get(f"{kind}_bytes"), (int, float)):
                    mem.add_metric([*lb, kind], float(r[f"{kind}_bytes"]))
            if isinstance(r.get("need_gb"), (int, float)):
                budget.add_metric(lb, r["need_gb"] * 1e9)
            if isinstance(r.get("usable_gb"), (int, float)):
                usable.add_metric(lb, r["usable_gb"] * 1e9)
        yield from (up, step, wait, mem, budget, usable)
