"""--kv-bits (issue 14): a quantized KV cache with continuous batching. The batch cache keeps every
sequence's quantized KV intact through merge, extend, filter and extract; a batch of requests on
a real engine gives each the tokens it gets alone; the prefix cache works on quantized KV; and
8-bit KV takes at most 0.55x float16's bytes per token. (2 ranks, tensor parallel: in
tests/test_prefix_cache_cluster.py.)"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from runtime.kv_quant import BatchQuantizedKVCache, SeqQuantizedKVCache, cache_factory
from runtime.prefix_cache import cut
from runtime.requests import GenerationRequest, SamplingParams, TokenEvent
from tests.conftest import running_engine


def _seq(n: int, seed: int, bits=8, group=32) -> SeqQuantizedKVCache:
    c = SeqQuantizedKVCache(group, bits)
    k = mx.random.normal((1, 2, n, 32), key=mx.random.key(seed))
    c.update_and_fetch(k, k * 2)
    return c


def _same(a: SeqQuantizedKVCache, b: SeqQuantizedKVCache) -> bool:
    ka, _ = a.keys_and_values() if a.offset else (None, None)
    kb, _ = b.keys_and_values() if b.offset else (None, None)
    return a.offset == b.offset and all(mx.array_equal(x, y).item() for x, y in zip(ka, kb))


def test_batch_cache_keeps_each_sequence_through_merge_extend_filter_extract():
    a, b, c = _seq(5, 1), _seq(9, 2), _seq(3, 3)
    batch = BatchQuantizedKVCache.merge([a, b])
    assert batch.kv_bits == 8 and batch.group_size == 32 and not hasattr(batch, "bits")  # float attention
    assert _same(batch.extract(0), a) and _same(batch.extract(1), b)
    batch.extend(BatchQuantizedKVCache.merge([c]))
    assert [_same(batch.extract(i), s) for i, s in enumerate((a, b, c))] == [True] * 3
    batch.filter([0, 2])  # b, the longest, leaves: the padding shrinks
    assert _same(batch.extract(0), a) and _same(batch.extract(1), c)
    # A new token for both: appended after each one's own history.
    k = mx.random.normal((2, 2, 1, 32), key=mx.random.key(9))
    keys, values = batch.update_and_fetch(k, k)
    assert batch.extract(0).offset == 6 and batch.extract(1).offset == 4
    # What attention gets: float K/V, exactly mx.dequantize of what the cache holds at rest.
    w, scales, biases = (x[..., :batch._idx, :] for x in batch.keys)
    assert keys.dtype == mx.float32 and keys.shape == (2, 2, batch._idx, 32) and scales.dtype == mx.float16
    want = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=8)
    assert mx.array_equal(keys, want).item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_fast_dequantize_equals_mx_dequantize(bits, dtype):
    from runtime.kv_quant import dequantize, quantize

    x = mx.random.normal((2, 3, 40, 128), key=mx.random.key(bits)).astype(dtype)
    for group in (32, 64, 128):
        q = quantize(x, group, bits)
        sliced = tuple(t[[1, 0]][..., 5:33, :] for t in q)  # as after filter and a step's [:_idx]
        w, scales, biases = sliced
        want = mx.dequantize(w, scales.astype(dtype), biases.astype(dtype), group_size=group, bits=bits)
        assert mx.array_equal(dequantize(*sliced, group, bits, dtype), want).item(), group


def test_8_bit_kv_takes_at_most_055x_float16_bytes_per_token():
    k = mx.random.normal((1, 8, 100, 128)).astype(mx.float16)
    full = KVCache()
    full.update_and_fetch(k, k)
    q = SeqQuantizedKVCache(64, 8)
    q.update_and_fetch(k, k)
    ratio = cut(q, 100).nbytes / cut(full, 100).nbytes
    assert ratio <= 0.55, ratio
    q32 = SeqQuantizedKVCache(64, 8)  # a float32 model's KV: scales kept in float16, same bytes
    q32.update_and_fetch(k.astype(mx.float32), k.astype(mx.float32))
    assert cut(q32, 100).nbytes == cut(q, 100).nbytes
    q4 = SeqQuantizedKVCache(64, 4)
    q4.update_and_fetch(k, k)
    assert cut(q4, 100).nbytes / cut(full, 100).nbytes <= 0.30


def test_bad_group_size_for_the_model_is_refused_naming_the_flag(demo_model_path):
    from mlx_lm.utils import load

    model, _ = load(str(demo_model_path))  # tiny: head size 16, which no group size divides
    with pytest.raises(ValueError, match="--kv-group-size 64 does not divide the model's head size 16"):
        cache_factory(model, 8, 64)
    with pytest.raises(ValueError, match="--kv-bits 3"):
        cache_factory(model, 3, 64)


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    from runtime.demo_models import ensure

    return ensure("demo-llama", cache_dir=tmp_path_factory.mktemp("models"), size="small")  # head size 32


def _tokens(handle) -> tuple[list[int], object]:
    toks = []
    for ev in handle.iter_sync(120):
        if isinstance(ev, TokenEvent):
            toks.append(ev.token)
        else:
            return toks, ev


def test_quantized_kv_batched_equals_alone_and_the_prefix_cache_reuses_it(small_path):
    prompts = [[7 + (i * 13 + k) % 3000 for i in range(60 + 25 * k)] for k in range(4)]

    def req(p):
        return GenerationRequest(p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))

    with running_engine(small_path, kv_bits=8, kv_group_size=32, prefix_cache_gb=0) as eng:
        alone = [_tokens(eng.submit(req(p)))[0] for p in prompts]
        together = [_tokens(h)[0] for h in [eng.submit(req(p)) for p in prompts]]
        assert together == alone
        bpt = eng.kv_bytes_per_token
    with running_engine(small_path, kv_bits=8, kv_group_size=32, prefix_cache_gb=0.1) as eng:
        assert eng.kv_bytes_per_token == bpt
        first = [_tokens(eng.submit(req(p))) for p in prompts]
        again = [_tokens(eng.submit(req(p))) for p in prompts]
        assert [t for t, _ in first] == [t for t, _ in again] == alone
        assert [f.cached_tokens for _, f in again] == [len(p) - 1 for p in prompts]


def test_the_plan_sizes_kv_memory_and_the_kv_budget_with_kv_bits():
    from launcher.hostfile import builtin_local
    from launcher.planner import kv_scale, plan_for

    assert kv_scale(None) == 1.0 and kv_scale(8, 64) == pytest.approx(0.53125) and kv_scale(4, 32) < 0.32
    full = plan_for("llama-3.1-8b", builtin_local(1), None)
    q8 = plan_for("llama-3.1-8b", builtin_local(1), None, kv_share=kv_scale(8, 64))
    assert q8.ranks[0].kv_bytes_per_token == pytest.approx(full.ranks[0].kv_bytes_per_token * 0.53125)
    assert q8.ranks[0].kv_gb < full.ranks[0].kv_gb
    assert q8.kv_budget_tokens() > 1.8 * full.kv_budget_tokens()
