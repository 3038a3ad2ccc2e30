"""runtime/cpu_attention.py: the engine's CPU attention matches mlx's, and only the engine uses it."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

from runtime import cpu_attention
from runtime.requests import GenerationRequest, SamplingParams
from tests.conftest import running_engine


def _qkv(B, Hq, Hkv, L, S, D, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    q, k, v = (mx.random.normal(s).astype(dtype) for s in ((B, Hq, L, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    return q, k, v


MASKS = {
    "none": lambda B, Hq, L, S: None,
    "causal": lambda B, Hq, L, S: "causal",
    "bool per batch": lambda B, Hq, L, S: mx.random.uniform(shape=(B, 1, L, S)) > 0.3,
    "bool per head": lambda B, Hq, L, S: mx.random.uniform(shape=(B, Hq, L, S)) > 0.3,
    "bool 2-d": lambda B, Hq, L, S: mx.random.uniform(shape=(L, S)) > 0.3,
    "nothing visible": lambda B, Hq, L, S: mx.zeros((B, 1, L, S), dtype=mx.bool_),
    "additive": lambda B, Hq, L, S: mx.random.normal((B, Hq, L, S)),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("shape", [(2, 8, 4, 5, 9, 16), (2, 8, 8, 1, 9, 16), (1, 9, 3, 7, 40, 64)],
                         ids=["gqa", "decode", "smollm2-heads"])
def test_matches_mlx_fast_sdpa(mask, shape):
    B, Hq, Hkv, L, S, D = shape
    q, k, v = _qkv(*shape)
    m = MASKS[mask](B, Hq, L, S)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=m)
    out = cpu_attention.attention(q, k, v, D ** -0.5, m)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert mx.abs(out - ref).max().item() < 2e-6


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_inputs(dtype):
    q, k, v = _qkv(2, 8, 2, 5, 30, 16, dtype)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal").astype(mx.float32)
    out = cpu_attention.attention(q, k, v, 0.25, "causal")
    assert out.dtype == dtype
    assert mx.abs(out.astype(mx.float32) - ref).max().item() < (2e-3 if dtype == mx.float16 else 2e-2)


def test_keys_as_a_view_of_a_longer_buffer():
    # A cache's keys are a strided slice of a buffer grown in steps.
    q, k, v = _qkv(1, 4, 2, 3, 300, 32)
    k, v = k[:, :, :257, :], v[:, :, :257, :]
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask="causal")
    assert mx.abs(cpu_attention.attention(q, k, v, 0.2, "causal") - ref).max().item() < 2e-6


def test_only_inside_the_scope_and_only_in_that_thread(monkeypatch):
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: calls.append(threading.get_ident()) or real(*a))
    q, k, v = _qkv(1, 8, 8, 64, 4096, 16)  # above MIN_SCORES
    with cpu_attention.engine_scope():
        assert mx.fast.scaled_dot_product_attention is cpu_attention._sdpa
        mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal"))
        other = threading.Thread(target=lambda: mx.eval(
            mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")))
        other.start()
        other.join()
        small = _qkv(1, 8, 8, 1, 64, 16)  # a short decode step: mlx's own path
        mx.eval(mx.fast.scaled_dot_product_attention(*small, scale=0.25))
        # sinks are mlx's business
        mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal", sinks=mx.zeros((8,))))
    mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal"))
    assert calls == [threading.get_ident()]


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_attention.ENV_CPU_ATTENTION, "0")
    assert not cpu_attention.wanted()
    monkeypatch.setenv(cpu_attention.ENV_CPU_ATTENTION, "1")
    assert cpu_attention.wanted() == (mx.default_device() == mx.cpu)


def test_engine_greedy_output_matches_with_the_path_off(demo_model_path, monkeypatch):
    """A long prompt (its prefill goes through the numpy path) gives the same greedy tokens as
    mlx's attention: the two differ by float rounding only."""
    prompt = [3 + (i * 7) % 1500 for i in range(700)]

    def tokens():
        with running_engine(demo_model_path, prefix_cache_gb=0) as eng:
            h = eng.submit(GenerationRequest(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
            return [ev.token for ev in h.iter_sync(timeout=120) if hasattr(ev, "token")]

    monkeypatch.setenv(cpu_attention.ENV_CPU_ATTENTION, "0")
    off = tokens()
    monkeypatch.setenv(cpu_attention.ENV_CPU_ATTENTION, "1")
    on = tokens()
    assert len(on) == 12 and on == off
    assert np.unique(on).size > 1  # a real sequence, not one repeated token
