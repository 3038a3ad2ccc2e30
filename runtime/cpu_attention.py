"""Attention for CPU ranks in numpy, where mlx's CPU build is slowest.

mlx has no fused attention kernel on the CPU: `mx.fast.scaled_dot_product_attention` falls back
to matmul, softmax, matmul, and the CPU `exp` behind that softmax is scalar (~20 ns an element
here). Measured on 2 x86 cores with OpenBLAS: for 3 x 80 prompt tokens against 2,280 cached ones
(8 heads of 32) QK^T and PV take 9 ms each and the softmax 97 ms; the whole attention in numpy
(vectorized exp, numpy's own OpenBLAS for the products) takes ~19 ms. A cached agent turn (a
short new message over a long cached context) is almost all attention.

Scoped to the engine's own loop thread (`engine_scope()`), not the process: mlx-lm code run
elsewhere in the process (a test's reference generation) keeps mlx's numerics. Inside the scope,
calls with at least MIN_SCORES scores take this path (prefill chunks, verified drafts, many
streams over long contexts); the rest, attention sinks and anything unusual stay on mlx's. Off
on a GPU (Metal's SDPA is one fused kernel) and with EXOLAUNCH_CPU_ATTENTION=0.

The numpy step needs its inputs evaluated, so the layer's graph is evaluated up to them: every
rank evaluates the same graph in the same order, so collectives stay matched.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

ENV_CPU_ATTENTION = "EXOLAUNCH_CPU_ATTENTION"
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
# Below this many scores mlx's own path is cheaper: the numpy step evaluates the graph up to the
# layer, a sync that also stops mlx overlapping graph building with compute (at 2^13 an 8-stream
# decode step of the 100M model went from ~110 to 128-144 ms on one rank).
MIN_SCORES = 1 << 17
_scope = threading.local()
_mlx_sdpa = mx.fast.scaled_dot_product_attention


def wanted() -> bool:
    """This process computes on the CPU and the user did not turn the path off."""
    return os.environ.get(ENV_CPU_ATTENTION, "1") != "0" and mx.default_device() == mx.cpu


@contextmanager
def engine_scope():
    """Attention calls made by this thread inside the block take the numpy path (if wanted)."""
    if not wanted():
        yield
        return
    # mlx-lm's models (and runtime/kv_quant.py) call mx.fast.scaled_dot_product_attention by
    # attribute, so one wrapper there reaches every architecture; outside a scope it is mlx's.
    mx.fast.scaled_dot_product_attention = _sdpa
    before = getattr(_scope, "on", False)
    _scope.on = True
    try:
        yield
    finally:
        _scope.on = before


def _sdpa(q, k, v, *, scale, mask=None, sinks=None, **kw):
    if (not getattr(_scope, "on", False) or sinks is not None or kw or q.ndim != 4
            or q.dtype not in _FLOATS or k.shape[1] == 0 or q.shape[1] % k.shape[1]
            or q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] < MIN_SCORES):
        return _mlx_sdpa(q, k, v, scale=scale, mask=mask, sinks=sinks, **kw)
    return attention(q, k, v, scale, mask)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(q k^T * scale + mask) v with mx.fast's shapes and mask rules: q (B, Hq, L, D),
    k and v (B, Hkv, S, D) with Hq a multiple of Hkv; mask None, "causal" (aligned to the last
    key), a boolean array (True attends) or an additive one, broadcastable to (B, Hq, L, S).
    Computed in float32 whatever the inputs' dtype (numpy has no bfloat16), returned in v's."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep, dtype = Hq // Hkv, v.dtype
    # One evaluation for all three (each is a wait on mlx's stream), then views of mlx's buffers
    # (the cache's keys are a strided slice of a longer buffer).
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    mx.eval(q, k, v, *([mask] if isinstance(mask, mx.array) else []))
    kn, vn = np.asarray(k), np.asarray(v)
    qn = np.asarray(q).reshape(B, Hkv, rep * L, D) * np.float32(scale)
    # Grouped queries share their KV head: one (rep * L) x S score block per KV head.
    a = np.matmul(qn, kn.swapaxes(-1, -2)).reshape(B, Hkv, rep, L, S)
    low = np.finfo(np.float32).min  # as mlx masks: a row with nothing to attend averages all
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        if L > 1:
            # query i sits at position S - L + i and sees keys up to it
            hidden = np.arange(S)[None, :] > (S - L + np.arange(L))[:, None]
            np.copyto(a, low, where=hidden)
    elif mask is not None:
        m = np.asarray(mask)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        if m.shape[1] != 1:  # per query head: split the heads like the queries
            m = m.reshape(m.shape[0], Hkv, rep, *m.shape[2:])
        else:
            m = m[:, :, None]
        if m.dtype == np.bool_:
            np.copyto(a, low, where=~m)
        else:
            np.add(a, m.astype(np.float32), out=a)
            np.maximum(a, low, out=a)
    a -= a.max(axis=-1, keepdims=True)
    np.exp(a, out=a)
    total = a.sum(axis=-1, keepdims=True)
    # Normalized after the product: D values per query to divide instead of S weights.
    out = np.matmul(a.reshape(B, Hkv, rep * L, S), vn).reshape(B, Hkv, rep, L, -1)
    out /= total
    return mx.array(out.reshape(B, Hq, L, vn.shape[-1])).astype(dtype)
