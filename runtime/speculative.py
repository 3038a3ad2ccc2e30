"""N-gram (prompt lookup) or draft-model speculative decoding, identical on every tensor-parallel rank.

`Speculator.next(gen)` stands in for mlx-lm's `BatchGenerator.next()`. When a single sequence is
decoding (no prompt being processed or waiting, no logits processors) it drafts up to
`num_tokens` tokens (fewer after rejections) by prompt lookup: the longest suffix n-gram (lookup_max down to lookup_min
tokens) of the sequence's own tokens that occurred earlier proposes the tokens that followed its
most recent earlier occurrence. One forward of [pending token] + drafts through the batch's KV
cache verifies them all; the rejected positions are trimmed from the cache. Otherwise it is
`gen.next()` unchanged.

With `--draft MODEL` the drafts are a small model's (runtime/draft.py: rank 0 runs it and shares
them in one collective); the rest of this module is the same for both.

For n-gram drafts no message is needed between ranks: every rank holds the same tokens, so it drafts the same
tokens, runs the same [1, 1 + k] forward (the same collectives) and samples the same rows with the
sequence's own keyed sampler. Every choice here depends only on tokens (never on timing), which
is what keeps the ranks in lock-step.

Only plain attention KV is verified and trimmed this way: BatchKVCache, and its subclass
kv_quant.BatchQuantizedKVCache (--kv-bits), whose trim only moves the offsets. Sliding-window
(rotating) and recurrent caches cannot take back positions, so those models decode plainly.

The drafts come from `GenerationBatch.tokens`, the tokens in the sequence's KV cache: a prompt
prefix restored from the prefix cache is not among them, so text echoed from that part of the
prompt finds no draft (accepted: the prompt's uncached tail and the output still do).
"""

from __future__ import annotations

import copy
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

MISSES_BEFORE_PAUSE = 2  # consecutive drafts with nothing accepted before drafting pauses
MAX_PAUSE = 64  # steps; the pause doubles after each failed retry, up to this


def lookup(tokens, num_tokens: int = 5, lookup_max: int = 4, lookup_min: int = 1) -> list[int]:
    """Prompt lookup: the `num_tokens` tokens that followed the most recent earlier occurrence of
    the longest suffix n-gram of `tokens` (n from lookup_max down to lookup_min); [] when no
    suffix of at least lookup_min tokens occurred before."""
    a = np.asarray(tokens, dtype=np.int64)
    n_max = min(lookup_max, len(a) - 1)
    if num_tokens <= 0 or n_max < lookup_min or n_max < 1:
        return []
    # Ends e (< last) of earlier occurrences of the last token, narrowed while the n-gram grows
    ends = np.flatnonzero(a[:-1] == a[-1])
    if len(ends) == 0:
        return []
    length = 1
    while length < n_max:
        longer = ends[ends >= length]
        longer = longer[a[longer - length] == a[-1 - length]]
        if len(longer) == 0:
            break
        ends, length = longer, length + 1
    if length < lookup_min:
        return []
    e = int(ends[-1])  # the most recent occurrence of the longest matching suffix
    draft = a[e + 1:e + 1 + num_tokens].tolist()
    # A continuation that runs into the end of the history repeats with period len - 1 - e (a
    # loop such as "x x x" drafts "x x x x x", not just "x")
    period = len(a) - 1 - e
    while len(draft) < num_tokens:
        draft.append(draft[len(draft) - period])
    return draft


class _Seq:
    """One sequence's draft statistics, its draft width and its miss guard."""

    __slots__ = ("drafts", "drafted", "accepted", "width", "max_width", "misses", "pause", "skip")

    def __init__(self, max_width: int):
        self.drafts = self.drafted = self.accepted = 0
        self.width = self.max_width = max_width  # tokens to draft next
        self.misses = 0  # consecutive drafts with nothing accepted
        self.pause = 0  # the current pause length, in steps
        self.skip = 0  # steps left to decode without drafting

    def record(self, drafted: int, accepted: int) -> None:
        self.drafts += 1
        self.drafted += drafted
        self.accepted += accepted
        # Hugging Face's assisted-generation heuristic: wider after a fully accepted draft,
        # narrower after a rejection (where a wide forward costs k times a narrow one, as with
        # the reference BLAS, rejected tokens are paid in full)
        self.width = min(self.max_width, self.width + 2) if accepted == drafted else max(1, self.width - 1)
        if accepted:
            self.misses, self.pause = 0, 0
            return
        self.misses += 1
        if self.misses >= MISSES_BEFORE_PAUSE:
            # Text with no repetition: drafting only costs a wider forward and loses mlx-lm's
            # overlap of one step's bookkeeping with the next step's compute. Retry later.
            self.pause = min(MAX_PAUSE, max(4, self.pause * 2))
            self.skip, self.misses = self.pause, MISSES_BEFORE_PAUSE - 1


class Speculator:
    """Call `next(gen)` on every rank in place of `gen.next()`.

    Its return value is gen.next()'s, except that a sequence's generation responses may hold
    several GenerationBatch.Response for the same uid, in order; the last one of a finished
    sequence has finish_reason and prompt_cache set as mlx-lm sets them.
    Metrics follow vLLM's spec_decode names: num_drafts, num_draft_tokens, num_accepted_tokens.
    """

    def __init__(self, num_tokens: int = 5, lookup_max: int = 4, lookup_min: int = 1, draft=None):
        if num_tokens < 1 or lookup_min < 1 or lookup_max < lookup_min:
            raise ValueError(f"speculative: need num_tokens >= 1 and 1 <= lookup_min <= lookup_max, got "
                             f"num_tokens={num_tokens}, lookup_min={lookup_min}, lookup_max={lookup_max}")
        self.num_tokens, self.lookup_max, self.lookup_min = num_tokens, lookup_max, lookup_min
        self.draft = draft  # runtime/draft.DraftModel (--draft), or None: n-gram lookup
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
        self._seqs: dict[int, _Seq] = {}  # forgotten on every rank as its sequence leaves

    def stats(self, uid: int) -> tuple[int, int]:
        """(drafted tokens, accepted tokens) of one sequence so far; (0, 0) if it never drafted."""
        s = self._seqs.get(uid)
        return (s.drafted, s.accepted) if s else (0, 0)

    def forget(self, uid: int) -> None:
        """Drop a sequence that left the batch. Call it on every rank alike: the state steers
        what a rank drafts, so the ranks' states must stay equal."""
        self._seqs.pop(uid, None)

    def _seq(self, uid: int) -> _Seq:
        s = self._seqs.get(uid)
        if s is None:
            s = self._seqs[uid] = _Seq(self.num_tokens)
        return s

    def next(self, gen):
        with mx.stream(gen._stream):
            b = gen._generation_batch
            if (len(b) != 1 or len(gen._prompt_batch) or gen._unprocessed_sequences
                    or (b.logits_processors and b.logits_processors[0])
                    or not all(isinstance(c, BatchKVCache) for c in b.prompt_cache)):
                return gen._next()
            seq = self._seq(b.uids[0])
            if seq.skip:
                seq.skip -= 1
                return gen._next()
            tic = time.perf_counter()
            responses = self._step(b, seq)
            if responses is None:
                return gen._next()
            c = gen._counters
            c.decode_time += time.perf_counter() - tic
            c.generation_tokens += len(responses)
            c.generation_steps += 1
            if c.generation_steps % 512 == 0:
                mx.clear_cache()
            return [], responses

    def _step(self, b, seq: _Seq):
        """One verified step of batch `b`'s only sequence, or None to take mlx-lm's plain step."""
        pending = b._next_tokens  # sampled, not yet in the KV cache nor returned
        first = int(pending.item())
        budget = b.max_tokens[0] - b._num_tokens[0] - 1  # tokens allowed after `first`
        if budget <= 0 or copy.copy(b._matchers[0]).advance(first):
            return None  # `first` ends the sequence: nothing to verify
        context, width = b.tokens[0] + [first], min(seq.width, budget)
        draft = self.draft.propose(context, width) if self.draft is not None else \
            lookup(context, width, self.lookup_max, self.lookup_min)
        if not draft:
            return None
        k = len(draft)
        logits = b.model(mx.array([[first] + draft]), cache=b.prompt_cache)[0]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        # Every row sampled in one call: one key split of the sequence's own sampler, so every
        # rank draws the same. Accepting a draft iff the row's sample equals it is speculative
        # sampling for a one-hot draft q = δ(d): accepted with probability min(1, p(d)/q(d)) =
        # p(d), and on rejection the sample, conditioned on != d, follows the residual
        # norm(max(0, p - q)) = p without d. Each emitted token is its row's sample from the model
        # given the tokens before it, so sampling keeps its distribution and greedy its tokens
        # (the key stream differs from plain decoding's: same seed, other draws).
        sampled = ((b.samplers[0] if b.samplers else None) or b.fallback_sampler)(logprobs)
        mx.eval(sampled, logprobs)
        samples = sampled.tolist()
        accepted = 0
        while accepted < k and samples[accepted] == draft[accepted]:
            accepted += 1
        seq.record(k, accepted)
        self.num_drafts += 1
        self.num_draft_tokens += k
        self.num_accepted_tokens += accepted

        emitted = [first] + draft[:accepted]
        lps = [b._next_logprobs[0]] + [logprobs[j] for j in range(accepted)]
        keep = len(emitted)  # tokens of this step that stay in the cache
        finish = None
        for j, t in enumerate(emitted):
            b._num_tokens[0] += 1
            if b._num_tokens[0] >= b.max_tokens[0]:
                finish = "length"
            if b._matchers[0].advance(t):
                finish = "stop"
            if finish:
                keep = j + 1
                break
        for c in b.prompt_cache:
            c.trim(1 + k - keep)
        b.tokens[0].extend(emitted[:keep])  # _token_context is left alone: only processors read it
        uid = b.uids[0]
        Response = type(b).Response
        out = [Response(uid, t, lp, None, None, None) for t, lp in zip(emitted[:keep - 1], lps[:keep - 1])]
        if finish:
            out.append(Response(uid, emitted[keep - 1], lps[keep - 1], finish, b.extract_cache(0), b.tokens[0]))
            b.filter([])
            return out
        out.append(Response(uid, emitted[-1], lps[-1], None, None, None))
        # As GenerationBatch leaves it: the last token fed is "current", the first rejected
        # position's sample is the next pending token, with its logprobs.
        b._current_tokens = mx.array([emitted[-1]], dtype=pending.dtype)
        b._current_logprobs = [lps[-1]]
        b._next_tokens = sampled[accepted:accepted + 1]
        b._next_logprobs = [logprobs[accepted]]
        return out
