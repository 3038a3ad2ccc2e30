"""`exolaunch top [URL|HOST:PORT|JOB]`: a terminal view of a serving cluster, refreshing.

It reads what any Prometheus would (rank 0's /metrics: tokens, requests and latency histograms
per dialect) plus /exolaunch/stats (per rank: host, shard, step time, memory against the plan;
recent requests) and, behind `run`'s front door, its /exolaunch/status (phase, restarts).
Rates are the difference between two samples. `--once` prints one frame (two samples
`--interval` apart) and exits: for scripts and tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import typer

from launcher.cli_common import app
from launcher.errors import ConfigError, LaunchError
from runtime import contract

PREFIX = "exolaunch:"


@dataclass
class Sample:
    """One poll: the parsed /metrics, /exolaunch/stats and (behind the front door) its status."""
    at: float
    metrics: dict = field(default_factory=dict)   # family name (no prefix) -> [(sample name, labels, value)]
    stats: dict = field(default_factory=dict)
    door: dict | None = None
    error: str | None = None

    def total(self, family: str, suffix: str = "_total", **match) -> float:
        return sum(v for name, labels, v in self.metrics.get(family, [])
                   if name.endswith(suffix) and all(labels.get(k) == x for k, x in match.items()))

    def labels(self, family: str, key: str) -> list[str]:
        return sorted({lb[key] for _, lb, _ in self.metrics.get(family, []) if key in lb})

    def buckets(self, family: str, **match) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) summed over the other labels, sorted."""
        acc: dict[float, float] = {}
        for name, labels, v in self.metrics.get(family, []):
            if name.endswith("_bucket") and all(labels.get(k) == x for k, x in match.items()):
                le = float(labels["le"])
                acc[le] = acc.get(le, 0.0) + v
        return sorted(acc.items())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the q-th observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, prev_bound, prev_count = q * buckets[-1][1], 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / (count - prev_count or 1))
        prev_bound, prev_count = bound, count
    return None


def target_url(target: Optional[str]) -> str:
    """URL, HOST:PORT, or a detached job's id (`exolaunch ps`) -> the base URL (no /v1)."""
    if not target:
        return f"http://{contract.DEFAULT_API_HOST}:{contract.DEFAULT_API_PORT}"
    if "://" in target:
        url = target
    elif ":" in target:
        url = f"http://{target}"
    else:
        from launcher import jobs

        job = jobs.find(target)
        ready = job.ready()
        if not ready or not ready.get("url"):
            raise ConfigError(f"JOB {target}: it is not serving yet ({job.state()}); see `exolaunch ps`.")
        url = ready["url"]
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"TARGET {target!r}: expected http://HOST:PORT, HOST:PORT or a job id.")
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class Poller:
    def __init__(self, url: str, api_key: Optional[str], timeout: float = 5.0):
        import httpx

        self.url = url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def sample(self) -> Sample:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        s = Sample(time.time())
        try:
            r = self.client.get("/metrics")
            if r.status_code == 401:
                raise ConfigError(f"{self.url} needs its API key: pass --api-key or set {contract.ENV_API_KEY}.")
            if r.status_code != 200:
                s.error = f"/metrics answered HTTP {r.status_code}"
                return s
            for fam in text_string_to_metric_families(r.text):
                if fam.name.startswith(PREFIX):
                    s.metrics[fam.name[len(PREFIX):]] = [(x.name, x.labels, x.value) for x in fam.samples]
            r = self.client.get("/exolaunch/stats")
            if r.status_code == 200:
                s.stats = r.json()
                if r.headers.get("x-exolaunch-served-by"):  # behind run's front door
                    d = self.client.get("/exolaunch/status")
                    s.door = d.json() if d.status_code == 200 else None
        except httpx.HTTPError as e:
            s.error = f"cannot reach {self.url}: {type(e).__name__}: {e}"
        return s


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:,.1f}"


def _size(x) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x / 1e9:,.2f} GB" if x >= 1e9 else f"{x / 1e6:,.0f} MB"


def render(cur: Sample, prev: Sample | None, url: str):
    """One frame (a rich renderable) from the newest sample and the one before it."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if cur.error:
        return Text(f"exolaunch top {url}: {cur.error} (retrying)", style="bold red")
    st, dt = cur.stats, (cur.at - prev.at) if prev is not None and not prev.error else 0.0

    def rate(family: str) -> str:
        if dt <= 0:
            return "-"
        return f"{(cur.total(family) - prev.total(family)) / dt:,.1f}"

    cluster = st.get("cluster") or {}
    door = cur.door or {}
    head = Text.assemble(
        ("exolaunch top ", "bold"), (url, "cyan"), "  ",
        (st.get("model", "?"), "bold"), "  ",
        (door.get("state") or st.get("state", "?"), "green" if (door.get("state") or st.get("state")) == "ready" else "red"),
        f"  ranks up {int(cur.total('ranks_up', ''))}/{int(cur.total('ranks', ''))}",
        f"  backend {cluster.get('backend') or '-'}",
        f"  restarts {door.get('restarts', '-')}",
        f"  up {st.get('uptime_s', 0) / 60:,.1f} min")

    load = Table(show_edge=False, box=None, pad_edge=False)
    for col in ("gen tok/s", "prompt tok/s", "running", "waiting", "KV used", "requests", "TTFT p50", "TTFT p95",
                "ITL p50", "e2e p50", "prefix hit"):
        load.add_column(col, justify="right")
    kv = cur.total("kv_cache_usage_perc", "")
    queried = cur.total("prefix_cache_queries")
    load.add_row(rate("generation_tokens"), rate("prompt_tokens"), f"{cur.total('num_requests_running', ''):g}",
                 f"{cur.total('num_requests_waiting', ''):g}", f"{kv * 100:.1f}%",
                 f"{cur.total('request_success') + cur.total('request_failure'):g}",
                 _ms(quantile(0.5, cur.buckets("time_to_first_token_seconds"))),
                 _ms(quantile(0.95, cur.buckets("time_to_first_token_seconds"))),
                 _ms(quantile(0.5, cur.buckets("inter_token_latency_seconds"))),
                 _ms(quantile(0.5, cur.buckets("e2e_request_latency_seconds"))),
                 f"{cur.total('prefix_cache_hits') / queried * 100:.1f}%" if queried else "-")

    dialects = Table(title="per dialect (ms)", title_justify="left", show_edge=False)
    for col in ("dialect", "requests", "prompt tok", "gen tok", "TTFT mean", "ITL mean", "e2e mean"):
        dialects.add_column(col, justify="left" if col == "dialect" else "right")
    for d in cur.labels("request_success", "dialect") or cur.labels("prompt_tokens", "dialect"):
        def mean(fam: str) -> str:
            n = cur.total(fam, "_count", dialect=d)
            return _ms(cur.total(fam, "_sum", dialect=d) / n) if n else "-"
        dialects.add_row(d, f"{cur.total('request_success', dialect=d) + cur.total('request_failure', dialect=d):g}",
                         f"{cur.total('prompt_tokens', dialect=d):g}", f"{cur.total('generation_tokens', dialect=d):g}",
                         mean("time_to_first_token_seconds"), mean("inter_token_latency_seconds"),
                         mean("e2e_request_latency_seconds"))

    ranks = Table(title="ranks", title_justify="left", show_edge=False)
    for col in ("rank", "host", "shard", "state", "step ms", "wait ms", "rss", "plan", "mlx active"):
        ranks.add_column(col, justify="left" if col in ("host", "shard", "state") else "right")
    before = {r.get("rank"): r for r in ((prev.stats.get("cluster") or {}).get("ranks", []) if prev else [])}
    for r in cluster.get("ranks", []):
        p = before.get(r.get("rank"))
        n = (r.get("steps", 0) - p.get("steps", 0)) if p else 0
        step = (r["step_seconds"] - p["step_seconds"]) / n if n > 0 else (r.get("last_step_seconds") or None)
        wait = (r["wait_seconds"] - p["wait_seconds"]) / n if n > 0 else None
        ranks.add_row(str(r.get("rank")), str(r.get("host")), r.get("shard") or "-",
                      Text("up", "green") if r.get("up") else Text("down", "red"), _ms(step), _ms(wait),
                      _size(r.get("rss_bytes")), _size((r.get("need_gb") or 0) * 1e9 or None),
                      _size(r.get("mlx_active_bytes")))

    recent = Table(title="recent requests", title_justify="left", show_edge=False)
    for col in ("dialect", "reason", "prompt", "output", "queue ms", "TTFT ms", "tok/s", "total ms"):
        recent.add_column(col, justify="left" if col in ("dialect", "reason") else "right")
    for q in (st.get("recent") or [])[:8]:
        tps = q.get("tokens_per_s")
        recent.add_row(q.get("dialect", ""), q.get("finished_reason", ""), str(q.get("prompt_tokens")),
                       str(q.get("generation_tokens")), _ms(q.get("queue_s")), _ms(q.get("ttft_s")),
                       "-" if tps is None else f"{tps:,.1f}", _ms(q.get("e2e_s")))
    return Group(head, Text(""), load, Text(""), dialects, Text(""), ranks, Text(""), recent)


@app.command("top", help="Watch a serving cluster: tokens/s, queue, latency percentiles per dialect, every rank's "
                         "step time and memory against the plan, recent requests. TARGET: the URL `run` printed, "
                         "HOST:PORT, or a detached job's id (default: this machine's default port).")
def top_(
    target: Optional[str] = typer.Argument(None, metavar="URL|HOST:PORT|JOB"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=contract.ENV_API_KEY,
                                          help="The cluster's API key (prefer the environment variable)."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one frame (two samples INTERVAL apart) and exit."),
):
    from rich.console import Console
    from rich.live import Live

    if not 0 < interval <= 3600:
        raise ConfigError(f"--interval {interval:g}: expected seconds between 0 and 3600.")
    url = target_url(target)
    poller = Poller(url, api_key)
    console = Console()
    prev = poller.sample()
    if once:
        if prev.error:
            raise LaunchError(prev.error, status=1)
        time.sleep(interval)
        cur = poller.sample()
        if cur.error:
            raise LaunchError(cur.error, status=1)
        console.print(render(cur, prev, url))
        return 0
    try:
        with Live(render(prev, None, url), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                cur = poller.sample()
                live.update(render(cur, prev, url))
                prev = cur
    except KeyboardInterrupt:
        return 0
