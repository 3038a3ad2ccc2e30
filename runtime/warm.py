"""Warm start: every rank pays the first request's one-time costs before the cluster says ready.

What a first request pays, measured on mlx 0.32.4 / mlx-lm 0.32.2 (Linux CPU): mlx builds each
fused elementwise kernel (mlx-lm's compiled swiglu in the model, apply_top_p in a top-p sampler)
with the system C++ compiler the first time it is used, then keeps the build in
$TMPDIR/mlx/<version>/cpu. On a machine that has not built them yet (a new host, CI, a cleaned
/tmp) the first multi-token prefill paid ~2 s and the first top-p request ~2.6 s more than the
next identical one; with the builds on disk what is left is loading and tracing them, and mlx-lm's
batch generator's first prompt batch and first decode step.

warm() runs one throwaway batch through the model the way the engine will: a short prefill into
caches from the engine's own factory (quantized with --kv-bits), then the first token, with a
greedy and a top-k/top-p/temperature sampler (runtime.sampling.make_sampler) side by side. Every
rank calls it at the same point with the same inputs, so the collectives inside the forwards
match; mlx-lm's generator issues them on generation_stream, as the engine's do.
"""

from __future__ import annotations

import time

import mlx.core as mx

ENV_WARM = "EXOLAUNCH_WARM"  # 0 on a rank skips the warm-up (`run -x EXOLAUNCH_WARM=0`: to measure it)
# mlx's kernels depend on the ops, dtypes and layouts, not on the lengths: a prompt of a few
# tokens takes the prefill path (batched matmuls, the causal mask) for the cost of about one
# decode step, and every later step runs the same kernels as the first token's. Two forwards in
# all (0.24 s for the 100M demo model with OpenBLAS on a busy 2-core machine, where one decode
# step took 0.07-0.1 s); on rank 0 they overlap the API's start.
PROMPT_TOKENS = 4


def warm(model, make_cache) -> float:
    """Run the throwaway batch on this rank; seconds taken. Same call on every rank."""
    from mlx_lm.generate import BatchGenerator, StopSequences

    from runtime.sampling import make_sampler

    t0 = time.perf_counter()
    gen = BatchGenerator(model, completion_batch_size=2, prefill_batch_size=2, prefill_step_size=PROMPT_TOKENS)
    try:
        # Equal lengths: no padding mask, the path a lone first request takes.
        prompts = [list(range(1, PROMPT_TOKENS + 1)), list(range(2, PROMPT_TOKENS + 2))]
        uids = gen.insert(prompts, max_tokens=[2, 2], caches=[make_cache(), make_cache()],
                          samplers=[make_sampler(0.0, 1.0, 0, 0), make_sampler(0.7, 0.9, 40, 0)],
                          stop_sequences=[StopSequences(None)] * 2)
        # Step 1 prefills all but the last prompt token; step 2 forwards the last one and samples
        # the first token (mlx-lm evaluates it asynchronously, so it is not returned yet). A
        # third step would return it but also forward the next token: stop at two forwards.
        for _ in range(2):
            gen.next()
        mx.synchronize(gen.stream)  # the sampling, and mlx's kernel builds with it, happen here
        gen.remove(uids)
    finally:
        gen.close()
    mx.clear_cache()  # the throwaway caches' memory goes back before the engine sizes its own
    return time.perf_counter() - t0
