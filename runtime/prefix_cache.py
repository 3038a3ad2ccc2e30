"""The prefix KV cache: prompts that share a prefix with an earlier request skip its prefill.

Split like everything else in the data plane (see runtime/engine.py's lock-step contract):
- `PrefixIndex` lives on rank 0 only. It knows each entry's tokens and decides, for every new
  request, which entry and how many of its tokens to reuse, which finished sequences to keep and
  which entries to evict (LRU, bounded in tokens). Those choices travel in the step decision.
- `KVStore` lives on every rank and holds that rank's shard of each entry's KV (its layers, its
  KV heads), keyed by the entry id rank 0 chose. It never decides anything, so the stores stay
  identical in content across ranks, whatever each rank's bytes per token.

The byte budget (--prefix-cache-gb, per rank) becomes a token budget through the largest KV
bytes per token of any rank (measured once at start, `kv_bytes_per_token`), so no rank's store
exceeds its bytes. Only plain attention caches (KVCache and QuantizedKVCache, which hold exactly
the keys/values of the tokens before them) can be cut to a prefix; a model with any other cache
(sliding windows, recurrent state) runs without the prefix cache.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

GB = 10**9  # as the planner counts (launcher/catalogue.py)
SHARE_SLACK = 16  # tokens of buffer beyond an entry that a kept view may pin
_W = array("q").itemsize


def prefixable(caches: list) -> bool:
    """Whether a model's per-layer caches can be cut to any prefix and restored."""
    return bool(caches) and all(type(c) in (KVCache, QuantizedKVCache) or _is_quantized(c) for c in caches)


def _is_quantized(c) -> bool:
    return isinstance(c, QuantizedKVCache)


def token_bytes(tokens: list[int]) -> bytes:
    """Tokens as fixed-width bytes, so prefix comparisons are memcmp (entries keep this form)."""
    return array("q", tokens).tobytes()


def common_prefix(a: list[int] | bytes, b: list[int] | bytes) -> int:
    """Length in tokens of the common prefix of two token lists (or their token_bytes): block
    comparisons, then a binary search inside the first block that differs."""
    a = a if isinstance(a, bytes) else token_bytes(a)
    b = b if isinstance(b, bytes) else token_bytes(b)
    n = min(len(a), len(b)) // _W
    block = 1024
    lo = 0
    while lo < n and a[lo * _W:min(lo + block, n) * _W] == b[lo * _W:min(lo + block, n) * _W]:
        lo += block
    if lo >= n:
        return n
    hi = min(lo + block, n)  # tokens [:lo] agree, [:hi] do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo * _W:mid * _W] == b[lo * _W:mid * _W]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Entry:
    key: bytes  # token_bytes of the tokens whose KV the entry holds, in order
    n: int  # how many tokens


class PrefixIndex:
    """Rank 0's view: entry id -> tokens, in LRU order, within `budget_tokens` in total."""

    MIN_REUSE = 1  # reuse even a short prefix: restoring is a copy, prefilling is a forward

    def __init__(self, budget_tokens: int):
        self.budget_tokens = max(0, budget_tokens)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0
        self.hits = 0
        self.lookups = 0
        self.reused_tokens = 0

    @property
    def tokens(self) -> int:
        return sum(e.n for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[int, int]:
        """(entry id, tokens to reuse) for the longest cached prefix of `prompt`, or (-1, 0). At
        least the last prompt token is always left to prefill: its logits start the answer."""
        self.lookups += 1
        best, best_n = -1, 0
        key = token_bytes(prompt)
        for eid, e in self._entries.items():
            n = common_prefix(e.key, key)
            if n > best_n:
                best, best_n = eid, n
        best_n = min(best_n, len(prompt) - 1)
        if best < 0 or best_n < self.MIN_REUSE:
            return -1, 0
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += best_n
        return best, best_n

    def shared(self, before: int, after: int) -> None:
        """Count a lookup's reuse grown from `before` to `after` tokens by sharing a running
        sequence's KV (Engine._share)."""
        self.hits += before == 0
        self.reused_tokens += after - before

    def add(self, tokens: list[int], protect: set[int] = frozenset()) -> tuple[int, list[int]]:
        """Record a new entry; return (its id or -1 when it cannot fit, entry ids to evict).
        Entries whose tokens are a prefix of the new one are now redundant and go first; then
        the least recently used until the total fits. `protect`: ids reused by this very step."""
        if not tokens or len(tokens) > self.budget_tokens:
            return -1, []
        key = token_bytes(tokens)
        evict = [eid for eid, e in self._entries.items() if eid not in protect and key.startswith(e.key)]
        for eid in evict:
            del self._entries[eid]
        total = self.tokens + len(tokens)
        for eid in list(self._entries):
            if total <= self.budget_tokens:
                break
            if eid in protect:
                continue
            total -= self._entries.pop(eid).n
            evict.append(eid)
        if total > self.budget_tokens:  # only protected entries are left: skip this one instead
            return -1, evict
        eid = self._next_id
        self._next_id += 1
        self._entries[eid] = _Entry(key, len(tokens))
        return eid, evict

    def covers(self, tokens: list[int]) -> bool:
        """An entry already holds all of `tokens` (keeping them again would add nothing)."""
        key = token_bytes(tokens)
        return any(e.key.startswith(key) for e in self._entries.values())


class KVStore:
    """Every rank: entry id -> this rank's per-layer caches (exact length, contiguous)."""

    def __init__(self):
        self._entries: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for caches in self._entries.values() for c in caches if not c.empty())

    def keep(self, eid: int, caches: list, n_tokens: int) -> None:
        """Store the first n_tokens of a finished sequence's caches under rank 0's id."""
        # A finished sequence's extracted caches are already its own arrays, a token longer than
        # what is kept: a view of them costs no copy (the next turn's request often waits on
        # this). A view of a longer buffer would pin memory the budget does not count: copied.
        kept = [cut(c, n_tokens, copy=_length(c) - n_tokens > SHARE_SLACK) for c in caches]
        mx.eval([c.state for c in kept if not c.empty()])
        self._entries[eid] = kept

    def drop(self, eid: int) -> None:
        self._entries.pop(eid, None)

    def restore(self, eid: int, n_tokens: int) -> list:
        """Fresh per-layer caches holding the entry's first n_tokens (the entry is unchanged: they
        are views of its arrays, which the generator copies into its batch when it merges them)."""
        return [cut(c, n_tokens, copy=False) for c in self._entries[eid]]


def _length(c) -> int:
    """Tokens of buffer behind a cache's keys (its capacity, not its offset)."""
    if c.keys is None:
        return 0
    return (c.keys[0] if isinstance(c.keys, tuple) else c.keys).shape[2]


def cut(c, n: int, copy: bool = True):
    """A new cache with the first n tokens of c; with copy its arrays are exactly n long, else
    views of c's (mlx copies a shared buffer before any write, so c never changes)."""
    take = mx.contiguous if copy else (lambda x: x)
    if isinstance(c, QuantizedKVCache):
        out = type(c).__new__(type(c))
        out.__dict__.update(c.__dict__)  # group_size, bits (and any subclass settings)
        if c.keys is not None:
            out.keys = tuple(take(x[..., :n, :]) for x in c.keys)
            out.values = tuple(take(x[..., :n, :]) for x in c.values)
        out.offset = min(n, c.offset)
        return out
    out = KVCache()
    if c.keys is not None:
        out.keys = take(c.keys[..., :n, :])
        out.values = take(c.values[..., :n, :])
        out.offset = out.keys.shape[2]
    return out
