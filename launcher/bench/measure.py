"""The bench client: `concurrency` streaming completions sent at once to an OpenAI-compatible
/v1/completions, every timestamp from this process's time.perf_counter (one clock).

Per request: TTFT = first streamed text - send; ITL = gaps between text-bearing chunks;
TPOT = (e2e - TTFT) / (tokens - 1), tokens from the server's usage (a server that puts several
tokens in a chunk still gets the right TPOT); decode tok/s = (tokens - 1) / (last - first).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import httpx


_WORDS = ("The quick brown fox jumps over the lazy dog while the cluster of Macs serves the model "
          "across its ranks and every token streams back to the client in order").split()


def exact_text_prompt(tokenizer, n: int, variant: int = 0) -> str:
    """Text that the model's tokenizer encodes to exactly n tokens (what both servers count).
    Each variant shuffles the words differently, so no two requests share a prefix that a
    server's prompt cache could reuse."""
    words = list(_WORDS)
    if variant:
        random.Random(variant).shuffle(words)
    ids = tokenizer.encode(" ".join(words * (n // 15 + 2)), add_special_tokens=False)
    special = len(tokenizer.encode("x")) - len(tokenizer.encode("x", add_special_tokens=False))
    want = n - special
    # Decoding a prefix and encoding it again can merge differently at the cut; walk to a fit.
    for k in sorted(range(max(1, want - 8), want + 9), key=lambda k: abs(k - want)):
        text = tokenizer.decode(ids[:k])
        if len(tokenizer.encode(text)) == n:
            return text
    raise ValueError(f"could not build a prompt of exactly {n} tokens with this tokenizer")


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    s = sorted(xs)

    def q(p):  # linear interpolation between closest ranks
        i = (len(s) - 1) * p
        lo = int(i)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (i - lo)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(s)}


async def _one(client: httpx.AsyncClient, url: str, body: dict, start: asyncio.Event) -> dict:
    await start.wait()
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    finish = None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {r.status_code}: {text[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(f"server error mid-stream: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    stamps.append(time.perf_counter())
                finish = c.get("finish_reason") or finish
    t_end = time.perf_counter()
    if not stamps:
        raise RuntimeError("the stream ended without any text")
    return {"t0": t0, "stamps": stamps, "end": t_end, "usage": usage or {}, "finish": finish}


async def _burst(url: str, bodies: list[dict], timeout: float, headers: dict) -> tuple[list, float, float]:
    limits = httpx.Limits(max_connections=len(bodies) + 2, max_keepalive_connections=len(bodies) + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        start = asyncio.Event()
        tasks = [asyncio.create_task(_one(client, url, b, start)) for b in bodies]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        start.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, t0, time.perf_counter()


def run_burst(base_url: str, bodies: list[dict], *, timeout: float = 1800, api_key: str | None = None) -> dict:
    """Send every body (streaming) at once; the run's metrics."""
    concurrency = len(bodies)
    bodies = [{**b, "stream": True, "stream_options": {"include_usage": True}} for b in bodies]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results, t0, t1 = asyncio.run(_burst(base_url.rstrip("/") + "/completions", bodies, timeout, headers))
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {concurrency} requests failed: {errors[0]}")
    want = bodies[0].get("max_tokens")
    ttft, tpot, itl, e2e, prompt_rate, decode_rate = [], [], [], [], [], []
    generated = prompt_seen = 0
    for r in results:
        n = r["usage"].get("completion_tokens") or len(r["stamps"])
        p = r["usage"].get("prompt_tokens") or 0
        if want and n != want:
            raise RuntimeError(f"a request generated {n} of {want} tokens (finish_reason "
                               f"{r['finish']!r}): end-of-sequence was not suppressed")
        first, last = r["stamps"][0], r["stamps"][-1]
        ttft.append(first - r["t0"])
        e2e.append(r["end"] - r["t0"])
        if n > 1:
            tpot.append((last - first) / (n - 1))
            decode_rate.append((n - 1) / (last - first) if last > first else 0.0)
        itl.extend(b - a for a, b in zip(r["stamps"], r["stamps"][1:]))
        if p and first > r["t0"]:
            prompt_rate.append(p / (first - r["t0"]))
        generated += n
        prompt_seen = p
    return {
        "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "itl_s": percentiles(itl),
        "e2e_s": percentiles(e2e),
        "prompt_tok_s": statistics.median(prompt_rate) if prompt_rate else None,
        "decode_tok_s": statistics.median(decode_rate) if decode_rate else None,
        "decode_sum_tok_s": sum(decode_rate),
        "aggregate_tok_s": generated / (t1 - t0),
        "requests": concurrency, "completed": len(results), "tokens_generated": generated,
        "prompt_tokens_seen": prompt_seen,
    }


def first_token_at(base_url: str, body: dict, *, timeout: float = 600, api_key: str | None = None) -> float:
    """perf_counter time at which the first text of a streamed request arrives (for
    launch-to-first-token), the request sent as soon as this is called."""
    r = asyncio.run(_burst(base_url.rstrip("/") + "/completions",
                           [{**body, "stream": True, "stream_options": {"include_usage": True}}], timeout,
                           {"Authorization": f"Bearer {api_key}"} if api_key else {}))[0][0]
    if isinstance(r, BaseException):
        raise RuntimeError(f"the first request failed: {r}")
    return r["stamps"][0]
