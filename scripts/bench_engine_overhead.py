"""What the engine costs on one rank: decode tok/s of exolaunch's engine against mlx-lm's own
`stream_generate`, same process, same loaded model, same prompt, rounds interleaved.

    python scripts/bench_engine_overhead.py [--model demo-llama:100m] [--blas openblas|bundled]
                                            [--prompt-tokens 32] [--gen-tokens 128] [--rounds 3]

Decode tok/s = (tokens - 1) / (last token - first token), greedy, the full length every time.
Also prints the memory roofline of one decode step (weight bytes / measured bandwidth, threaded
numpy copy as in `exolaunch bench`) and the share of it each reaches. --blas openblas re-runs
this script with OpenBLAS preloaded (what a rank gets from `--blas auto` when the host has it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measured_bandwidth(mb: int = 512) -> float:
    """Bytes/s, by the same probe `exolaunch bench` runs on every host for its roofline."""
    from launcher.bench.probes import _BANDWIDTH

    out: dict = {}
    exec(_BANDWIDTH, {"PARAMS": {"mb": mb}, "say": lambda _kind, res: out.update(res)})  # noqa: S102
    return out["gbs"] * 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-llama:100m")
    ap.add_argument("--blas", default="openblas", choices=("openblas", "bundled"))
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.blas == "openblas" and "libopenblas" not in os.environ.get("LD_PRELOAD", ""):
        from launcher.blas import rank_env

        add, error = rank_env({**os.environ, "EXOLAUNCH_BLAS": "openblas"})  # what a rank gets
        if error:
            raise SystemExit(error)
        os.environ.update(add)
        os.execv(sys.executable, [sys.executable, *sys.argv])  # the preload must be there at exec

    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from runtime.bench import exact_prompt, one_stream
    from runtime.contract import resolve_model
    from runtime.engine import Engine

    path, model_id = resolve_model(a.model)
    model, tokenizer = load(str(path))
    prompt = exact_prompt(tokenizer, a.prompt_tokens)
    engine = Engine(model, tokenizer, model_id=model_id, model_path=path, group=mx.distributed.init(strict=False),
                    prefix_cache_gb=0)
    loop = threading.Thread(target=engine.run_leader, daemon=True)
    engine._thread = loop
    loop.start()
    while not engine.ready:
        time.sleep(0.01)

    def mlx_lm_once() -> float:
        stamps = []
        greedy = make_sampler(temp=0.0)
        for _ in stream_generate(model, tokenizer, prompt, max_tokens=a.gen_tokens, sampler=greedy):
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    mlx_lm_once()
    one_stream(engine, prompt, 8)  # warm both
    ours, theirs = [], []
    for _ in range(a.rounds):
        theirs.append(mlx_lm_once())
        ours.append(one_stream(engine, prompt, a.gen_tokens)["decode_tok_s"])
    engine.shutdown()
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    bw = measured_bandwidth()
    ceiling = bw / weight_bytes
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"{model_id}, 1 rank, blas {a.blas}, prompt {a.prompt_tokens}, {a.gen_tokens} tokens, "
          f"median of {a.rounds} interleaved rounds")
    print(f"  mlx-lm stream_generate  {t:7.2f} tok/s  ({100 * t / ceiling:4.1f}% of roofline)")
    print(f"  exolaunch engine        {o:7.2f} tok/s  ({100 * o / ceiling:4.1f}% of roofline)")
    print(f"  engine / mlx-lm         {o / t:7.3f}  (goal >= 0.98)")
    print(f"  roofline: {weight_bytes / 1e6:.0f} MB of weights per step at {bw / 1e9:.1f} GB/s = {ceiling:.1f} tok/s")
    sys.stdout.flush()
    os._exit(0)  # skip finalizing mlx under the engine thread


if __name__ == "__main__":
    sys.exit(main())
