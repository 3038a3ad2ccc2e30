"""--kv-bits figures (issue 14) on one in-process engine: KV bytes per token and the aggregate
decode tok/s of STREAMS concurrent greedy streams, float KV against quantized KV.

    python scripts/bench_kv_bits.py --model demo-llama --size small --dtype float16 --group-size 32
"""

from __future__ import annotations

import argparse
import json
import time

from runtime.demo_models import ensure
from runtime.engine import Engine
from runtime.requests import FinishEvent, GenerationRequest, SamplingParams


def run(path, bits, group, streams: int, prompt: int, gen: int) -> dict:
    eng = Engine.start_local(path, model_id="bench", kv_bits=bits, kv_group_size=group, prefix_cache_gb=0)
    while not eng.ready:
        time.sleep(0.05)
    try:
        def batch():
            hs = [eng.submit(GenerationRequest([7 + (i * 31 + s) % 1000 for i in range(prompt)],
                                               SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)))
                  for s in range(streams)]
            t0 = time.monotonic()
            done = 0
            for h in hs:
                for ev in h.iter_sync(1800):
                    if isinstance(ev, FinishEvent):
                        done += ev.completion_tokens
            return done, time.monotonic() - t0

        batch()  # warm-up
        tokens, took = batch()
        return {"kv_bits": bits, "group_size": group if bits else None, "kv_bytes_per_token": eng.kv_bytes_per_token,
                "streams": streams, "aggregate_tok_s": round(tokens / took, 1)}
    finally:
        eng.shutdown()
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-llama")
    ap.add_argument("--size", default="small")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    args = ap.parse_args()
    path = ensure(args.model, size=args.size, dtype=args.dtype)
    base = run(path, None, args.group_size, args.streams, args.prompt, args.gen)
    quant = run(path, args.bits, args.group_size, args.streams, args.prompt, args.gen)
    for row in (base, quant):
        print(json.dumps({"model": f"{args.model}:{args.size} {args.dtype}", **row}), flush=True)
    print(json.dumps({"kv_bytes_ratio": round(quant["kv_bytes_per_token"] / base["kv_bytes_per_token"], 4),
                      "tok_s_ratio": round(quant["aggregate_tok_s"] / base["aggregate_tok_s"], 3)}), flush=True)


if __name__ == "__main__":
    main()
