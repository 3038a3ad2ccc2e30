"""In-process engine benchmark (rank 0 submits directly, no HTTP): the ceiling the API is
measured against. `python -m runtime bench` under `exolaunch exec`; scripts/bench_serving.py
runs it and the HTTP path on the same ranks and model."""

from __future__ import annotations

import json
import statistics
import threading
import time

from runtime.requests import FinishEvent, GenerationRequest, SamplingParams


def exact_prompt(tokenizer, n: int) -> list[int]:
    """A prompt of exactly n tokens (repeated text, cut to length)."""
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * (n // 4 + 8))
    return ids[:n]


def one_stream(engine, prompt: list[int], gen: int) -> dict:
    t0 = time.perf_counter()
    h = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)))
    stamps = []
    for ev in h.iter_sync(timeout=600):
        if isinstance(ev, FinishEvent):
            break
        stamps.append(time.perf_counter())
    n = len(stamps)
    return {"ttft": stamps[0] - t0, "tokens": n,
            "decode_tok_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0,
            "e2e": stamps[-1] - t0}


def run_inprocess(engine, args) -> None:
    prompt = exact_prompt(engine.tokenizer, args.prompt_tokens)
    one_stream(engine, prompt, 8)  # warm-up
    results = []
    for _ in range(args.repeats):
        if args.streams == 1:
            results.append(one_stream(engine, prompt, args.gen_tokens))
            continue
        out, t0 = [], time.perf_counter()
        threads = [threading.Thread(target=lambda: out.append(one_stream(engine, prompt, args.gen_tokens)))
                   for _ in range(args.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        results.append({"aggregate_tok_s": sum(r["tokens"] for r in out) / wall,
                        "ttft": statistics.median(r["ttft"] for r in out),
                        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in out)})
    summary = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "tokens"}
    print("BENCH " + json.dumps({"streams": args.streams, "prompt_tokens": args.prompt_tokens,
                                 "gen_tokens": args.gen_tokens, **summary}), flush=True)
