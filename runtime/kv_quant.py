"""Quantized KV cache with continuous batching (--kv-bits 8|4, --kv-group-size).

mlx-lm 0.32 quantizes KV only for one sequence (QuantizedKVCache; mlx_lm.server turns batching
off with --kv-bits). Its BatchGenerator batches any per-layer cache whose class can `merge`
sequences into a batch cache that can filter, extend, extract, prepare and finalize, so this
module adds that pair: `SeqQuantizedKVCache` (one sequence; what a request starts with and what
the prefix cache stores) and `BatchQuantizedKVCache` (BatchKVCache's left-padded layout, with each
of keys and values held as mx.quantize's (packed, scales, biases) triple).

Attention: mlx-lm sends a cache with a `bits` attribute to its quantized attention
(mx.quantized_matmul for q.k and p.v), which on the CPU backend is ~2x slower than float
attention for 8-bit float32 KV and 10x or more for 4-bit or float16 KV. The batch cache therefore has no `bits` (it says `kv_bits`): each step it writes the
new tokens quantized, then hands the layer a transient float copy of its K and V, dequantized
with plain elementwise ops on the packed bytes (2.5-3x faster than mx.dequantize on CPU), to
mx.fast.scaled_dot_product_attention. At rest the KV stays quantized; the float copy lives only
while that layer's attention runs. Each rank does this for its own KV heads under tensor
parallelism.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, dynamic_roll, make_prompt_cache

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def scale_dtype(dtype):
    """Scales and biases are kept in float16 for a float32 model: 8-bit codes with float32
    scales would take 0.56x of float16 KV (groups of 64), float16 ones 0.53x; float16 keeps
    ~3 significant digits, ample for the step between two 8-bit codes."""
    return mx.float16 if dtype == mx.float32 else dtype


def quantize(x: mx.array, group_size: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    w, scales, biases = mx.quantize(x, group_size=group_size, bits=bits)
    sd = scale_dtype(x.dtype)
    return w, scales.astype(sd), biases.astype(sd)


def check(bits: int | None, group_size: int) -> None:
    """Refuse values mlx.quantize does not take, naming the flag (a ValueError)."""
    if bits is not None and bits not in BITS:
        raise ValueError(f"--kv-bits {bits}: expected 8 or 4 (or leave it out for float KV)")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"--kv-group-size {group_size}: expected 32, 64 or 128")


def cache_factory(model, bits: int | None, group_size: int = 64):
    """A function making one sequence's fresh per-layer caches: the model's own, or quantized
    ones when `bits` is set (only for models whose every layer is plain attention)."""
    check(bits, group_size)
    if bits is None:
        return lambda: make_prompt_cache(model)
    if not all(type(c) is KVCache for c in make_prompt_cache(model)):
        raise ValueError("--kv-bits: this model's cache is not plain attention KV in every layer "
                         "(sliding windows or recurrent state); run it without --kv-bits")
    args = getattr(model, "args", None)
    heads = getattr(args, "num_attention_heads", 0)
    head_dim = getattr(args, "head_dim", None) or (getattr(args, "hidden_size", 0) // heads if heads else 0)
    if head_dim and not getattr(args, "kv_lora_rank", None) and head_dim % group_size:
        fits = [g for g in GROUP_SIZES if head_dim % g == 0]
        raise ValueError(f"--kv-group-size {group_size} does not divide the model's head size {head_dim}: "
                         + (f"use --kv-group-size {fits[-1]}" if fits else "this model's KV cannot be quantized"))
    return lambda: [SeqQuantizedKVCache(group_size, bits) for _ in model.layers]


class SeqQuantizedKVCache(QuantizedKVCache):
    """One sequence's quantized KV, mergeable into a BatchQuantizedKVCache."""

    def size(self):
        return self.offset

    def update_and_fetch(self, keys, values):
        """QuantizedKVCache's, with scales in scale_dtype (its triples go to mlx-lm's quantized
        attention, which takes float16 scales with float32 queries)."""
        prev = self.offset
        self.keys, self.values = _store(self.keys, self.values, keys, values, prev, self.step,
                                        self.group_size, self.bits)
        self.offset += keys.shape[2]
        return self.keys_and_values()

    @classmethod
    def merge(cls, caches):
        return BatchQuantizedKVCache.merge(caches)


def dequantize(packed: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
               dtype=None) -> mx.array:
    """mx.dequantize for bits 8 and 4, from the packed words' bytes with elementwise ops (what
    the CPU backend runs fast): a uint32 of 8-bit codes is 4 bytes, element j in byte j; of
    4-bit codes, element 2j in byte j's low nibble and 2j+1 in its high one."""
    u = packed.view(mx.uint8)
    if bits == 4:
        u = mx.stack([u & 15, u >> 4], axis=-1)
    dtype = dtype or scales.dtype
    *lead, groups = scales.shape
    x = u.reshape(*lead, groups, group_size).astype(dtype)
    return (x * scales.astype(dtype)[..., None] + biases.astype(dtype)[..., None]).reshape(*lead, groups * group_size)


def _alloc(B, H, n, dim, dtype, group_size, bits):
    groups = (B, H, n, dim // group_size)
    return (mx.zeros((B, H, n, dim * bits // 32), dtype=mx.uint32),
            mx.zeros(groups, dtype=scale_dtype(dtype)), mx.zeros(groups, dtype=scale_dtype(dtype)))


def _store(kq, vq, keys: mx.array, values: mx.array, at: int, step: int, group_size: int, bits: int):
    """Write new keys and values, quantized, at position `at` of the (packed, scales, biases)
    triples kq and vq, first growing them by whole `step`s of positions when they are too short
    (or None); returns the triples. One sequence or a batch alike."""
    n = keys.shape[2]
    if kq is None or at + n > kq[0].shape[2]:
        steps = (step + n - 1) // step * step
        new = [_alloc(x.shape[0], x.shape[1], steps, x.shape[3], x.dtype, group_size, bits) for x in (keys, values)]
        if kq is None:
            kq, vq = new
        else:
            kq, vq = tree_map(lambda x, y: mx.concatenate([x[..., :at, :], y], axis=2), (kq, vq), tuple(new))
    for buf, x in ((kq, keys), (vq, values)):
        for i, part in enumerate(quantize(x, group_size, bits)):
            buf[i][..., at:at + n, :] = part
    return kq, vq


def _pad_seq(x: mx.array, left: int, right: int) -> mx.array:
    return mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)]) if left or right else x


class BatchQuantizedKVCache(BatchKVCache):
    """BatchKVCache's layout and bookkeeping (left padding, offsets, _idx); keys and values are
    (packed uint32, scales, biases) triples along the same sequence axis. `kv_bits`, not `bits`:
    update_and_fetch returns float K/V for mlx-lm's float attention (see the module doc)."""

    def __init__(self, left_padding, group_size: int = 64, bits: int = 8):
        super().__init__(left_padding)
        self.group_size, self.kv_bits = group_size, bits

    def update_and_fetch(self, keys, values):
        n = keys.shape[2]
        self.keys, self.values = _store(self.keys, self.values, keys, values, self._idx, self.step,
                                        self.group_size, self.kv_bits)
        self.offset = self.offset + n
        self._idx += n
        return self._float(self.keys, keys.dtype), self._float(self.values, values.dtype)

    def _float(self, triple, dtype):
        """The first _idx positions of a (packed, scales, biases) triple as a float array."""
        return dequantize(*(x[..., :self._idx, :] for x in triple), self.group_size, self.kv_bits, dtype)

    def keys_and_values(self):
        return tree_map(lambda x: x[..., :self._idx, :], (self.keys, self.values))

    def finalize(self):
        if self._right_padding is not None:
            padding = self._right_padding
            self.keys, self.values = tree_map(lambda x: dynamic_roll(x, padding[:, None], axis=2),
                                              (self.keys, self.values))
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    def filter(self, batch_indices):
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices], (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        min_left_pad = min(self.left_padding.tolist())
        if min_left_pad > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(lambda x: x[..., min_left_pad:, :], (self.keys, self.values))
            self._idx -= min_left_pad
            self.left_padding -= min_left_pad

    def extend(self, other):
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        max_idx = max(self._idx, other._idx)
        full = next(c for c in (self, other) if c.keys is not None)
        max_size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(c):
            if c.keys is None:  # a batch with no KV yet: empty triples shaped like the other's
                Bc = c.offset.shape[0]
                k, v = tree_map(lambda x: mx.zeros((Bc, x.shape[1], 0, x.shape[3]), x.dtype), (full.keys, full.values))
            else:
                k, v = c.keys, c.values
            left = max_idx - c._idx
            right = max_size - k[0].shape[2] - left
            if right < 0:
                k, v = tree_map(lambda x: x[..., :right, :], (k, v))
                right = 0
            k, v = tree_map(lambda x: _pad_seq(x, left, right), (k, v))
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, l1), (k2, v2, o2, l2) = pad(self), pad(other)
        cat = lambda a, b: mx.concatenate([a, b])  # noqa: E731
        self.keys, self.values = tree_map(cat, (k1, v1), (k2, v2))
        self.offset, self.left_padding = cat(o1, o2), cat(l1, l2)
        self._idx = max_idx

    def extract(self, idx):
        cache = SeqQuantizedKVCache(self.group_size, self.kv_bits)
        padding = self.left_padding.tolist()[idx]
        cache.keys, cache.values = tree_map(lambda x: mx.contiguous(x[idx:idx + 1, :, padding:self._idx]),
                                            (self.keys, self.values))
        cache.offset = self._idx - padding
        return cache

    @classmethod
    def merge(cls, caches):
        lengths = [c.size() for c in caches]
        first = caches[0]
        max_length = max(lengths)
        if max_length == 0:
            return cls([0] * len(caches), first.group_size, first.bits)
        padding = [max_length - n for n in lengths]
        full = next(c for c in caches if c.keys is not None)
        B = len(caches)

        def zeros_like(x):
            return mx.zeros((B, x.shape[1], max_length, x.shape[3]), dtype=x.dtype)

        keys, values = tree_map(zeros_like, (full.keys, full.values))
        for i, (p, c) in enumerate(zip(padding, caches)):
            if c.keys is None:
                continue
            for j in range(3):
                keys[j][i:i + 1, :, p:p + c.offset] = c.keys[j][..., :c.offset, :]
                values[j][i:i + 1, :, p:p + c.offset] = c.values[j][..., :c.offset, :]
        cache = cls(padding, first.group_size, first.bits)
        cache.keys, cache.values = keys, values
        cache.offset += max_length
        cache._idx = max_length
        return cache

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))
