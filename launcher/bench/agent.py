"""`exolaunch bench --trace agent`: what a coding agent sends (issue 14).

A system prompt of ~`system` tokens (tool definitions), then `turns` turns per conversation, each
resending the whole conversation so far (every earlier answer included, as the server wrote it)
plus a short new user message; `conversations` conversations interleaved turn by turn (all of one
turn's requests in flight at once). Per turn: TTFT median and max over the conversations, prompt
tokens, and the cached prompt tokens the server reported (OpenAI's
usage.prompt_tokens_details.cached_tokens, where it reports them).

Servers, each on a fresh cluster of every sweep point (model x ranks x backend x sharding x blas,
the BLAS given to both servers alike as in the load sweep):
exolaunch with its prefix cache, exolaunch with --prefix-cache-gb 0, and with --against mlx-lm,
mlx_lm.server with its own prompt cache on (its default). Records go to OUT/agent.jsonl; the
summary gives turns 2..N's mean TTFT and its ratio to the other servers'.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from launcher.bench import measure

SERVERS = ("exolaunch", "exolaunch-nocache")


@dataclass
class Trace:
    system: int = 2000
    turns: int = 6
    conversations: int = 3
    user: int = 40
    answer: int = 24


def _turn(client: httpx.Client, base_url: str, body: dict) -> tuple[float, str, dict]:
    """One streamed completion: (TTFT, the text, usage)."""
    t0 = time.perf_counter()
    ttft, text, usage = None, [], {}
    with client.stream("POST", f"{base_url}/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(c["text"])
    if ttft is None:
        raise RuntimeError("no text streamed")
    return ttft, "".join(text), usage


def run_trace(base_url: str, model: str, tokenizer, trace: Trace, *, suppress: dict | None = None,
              api_key: str | None = None, variant: int = 0) -> list[dict]:
    """Play the trace against one server; one row per turn."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    system = "System: you are a coding agent. Tools: " + measure.exact_text_prompt(tokenizer, trace.system, variant + 1)
    histories = [system for _ in range(trace.conversations)]
    rows = []
    with httpx.Client(timeout=1800, headers=headers) as client, ThreadPoolExecutor(trace.conversations) as pool:
        for turn in range(1, trace.turns + 1):
            for i in range(trace.conversations):
                message = measure.exact_text_prompt(tokenizer, trace.user, variant + 1000 * (i + 1) + turn)
                histories[i] += f"\nUser: {message}\nAssistant:"
            bodies = [{"model": model, "prompt": h, "max_tokens": trace.answer, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, **(suppress or {})} for h in histories]
            results = list(pool.map(lambda b: _turn(client, base_url, b), bodies))
            for i, (_, text, _) in enumerate(results):
                histories[i] += text  # the agent resends the answer as the server wrote it
            ttfts = [r[0] for r in results]
            usages = [r[2] for r in results]
            rows.append({"turn": turn, "ttft_p50_s": statistics.median(ttfts), "ttft_max_s": max(ttfts),
                         "prompt_tokens": sum(u.get("prompt_tokens") or 0 for u in usages),
                         "cached_tokens": sum(((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                                              for u in usages)})
    return rows


def later_ttft(rows: list[dict]) -> float | None:
    """Mean TTFT of turns 2..N: what a cache should cut."""
    later = [r["ttft_p50_s"] for r in rows if r["turn"] > 1]
    return statistics.fmean(later) if later else None


def run(runner, trace: Trace, servers: list[str]) -> tuple[list[dict], int]:
    """Every sweep point x server: a fresh cluster, the trace, one record. Uses the sweep Runner
    (runner.py) for clusters; returns (records, failures)."""
    from mlx_lm.utils import load_tokenizer

    from runtime.contract import resolve_model

    out: list[dict] = []
    failed = 0
    path = runner.out / "agent.jsonl"
    runner.out.mkdir(parents=True, exist_ok=True)
    for model, ranks, backend, sharding, blas in runner.sweep.clusters():
        model_dir, _ = resolve_model(model)
        tokenizer = load_tokenizer(model_dir)
        for server in servers:
            kind = "exolaunch" if server.startswith("exolaunch") else server
            tag = "exl" + uuid.uuid4().hex[:12]
            cluster = runner._make_cluster(kind, model, model_dir, ranks, backend, sharding, tag, blas)
            if server == "exolaunch-nocache":
                cluster.options.extra = (*cluster.options.extra, "--prefix-cache-gb", "0")
            suppress = {"ignore_eos": True} if kind == "exolaunch" else {}
            rec = {"trace": "agent", "sweep": runner.sweep.name, "server": server, "model": model, "ranks": ranks,
                   "backend": backend, "sharding": sharding, "blas": blas, "blas_library": None,
                   "trace_config": vars(trace)}
            runner.say(f"exolaunch: bench: agent trace on {server} {model} {ranks} rank(s) {backend} {sharding} "
                       f"blas {blas}")
            try:
                cluster.start()
                name = getattr(cluster, "model_name", model)
                measure.first_token_at(cluster.base_url, {"model": name, "prompt": "warm up", "max_tokens": 2,
                                                          "temperature": 0, **suppress}, api_key=runner.target.api_key)
                rec["blas_library"] = _ran_blas(runner, ranks, tag, cluster.rank_cmd_marker)
                rows = run_trace(cluster.base_url, name, tokenizer, trace, suppress=suppress,
                                 api_key=runner.target.api_key)
                rec.update(ok=True, turns=rows, later_ttft_s=later_ttft(rows))
            except Exception as e:  # noqa: BLE001 - a failed server is a failed record, not a crash
                rec.update(ok=False, error=f"{type(e).__name__}: {e}")
                failed += 1
            finally:
                cluster.stop()
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            out.append(rec)
    return out, failed


def _ran_blas(runner, ranks: int, tag: str, marker: str) -> str | None:
    """The BLAS library the cluster's ranks run (probes.py), as the load sweep records it."""
    from launcher.bench import probes
    from launcher.bench.runner import blas_summary

    names = set(runner._rank_hosts(ranks))
    hosts = [h for h in runner.target.hostfile.hosts if h.name in names]
    try:
        return blas_summary(probes.RankMonitor(hosts, tag, marker, runner.target.sopts).blas())["library"]
    except probes.ProbeError:
        return None


def _key(r: dict) -> tuple:
    return r["model"], r["ranks"], r["backend"], r["sharding"], r.get("blas") or "auto"


def report(recs: list[dict]) -> str:
    """Markdown: TTFT per turn per server, then turns 2..N against exolaunch's."""
    lines = []
    for key in sorted({_key(r) for r in recs}):
        group = [r for r in recs if _key(r) == key]
        lines += [f"### agent trace: {key[0]}, {key[1]} rank(s), {key[2]}, {key[3]}, blas {key[4]}", "",
                  "| server | " + " | ".join(f"turn {t['turn']} TTFT s (cached)" for t in
                                             next((r["turns"] for r in group if r.get("ok")), [])) + " | turns 2+ |",
                  "|---" * (2 + len(next((r["turns"] for r in group if r.get("ok")), []))) + "|"]
        base = next((r["later_ttft_s"] for r in group if r.get("ok") and r["server"] == "exolaunch"), None)
        for r in group:
            if not r.get("ok"):
                lines.append(f"| {r['server']} | failed: {r['error']} |")
                continue
            cells = [f"{t['ttft_p50_s']:.2f} ({t['cached_tokens']})" for t in r["turns"]]
            ratio = f" (exolaunch: {base / r['later_ttft_s']:.2f}x)" if base and r["later_ttft_s"] and \
                r["server"] != "exolaunch" else ""
            ran = ", ".join(x.rsplit("/", 1)[-1] for x in (r.get("blas_library") or "").split(", ") if x)
            server = f"{r['server']} ({ran})" if ran else r["server"]
            lines.append(f"| {server} | " + " | ".join(cells) + f" | {r['later_ttft_s']:.2f}{ratio} |")
        lines.append("")
    return "\n".join(lines)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
