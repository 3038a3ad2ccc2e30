"""Lock-step continuous batching across ranks.

Every rank holds an identical mlx-lm BatchGenerator. Rank 0 (the leader) decides each step:
which requests join (with their sampling parameters and seeds), which leave (cancelled, or
stopped by a stop string that only rank 0 sees as text), whether to step at all, and when to
shut down. It sends that decision over the control channel; every rank applies it the same
way and runs the same batched forward, whose collectives are the only mx.distributed traffic.
Identical logits plus per-request samplers with identical keys give identical tokens on every
rank, so the ranks never need to exchange sampled tokens. No follower ever decides alone.

When nothing is running the leader blocks on a condition variable and followers block in
recv(): an idle cluster does not spin. Prefill is chunked and interleaved with decode steps, so a
long prompt does not freeze running streams; rank 0 sizes each step's chunk (at most
prefill_step tokens, and about PREFILL_CHUNK_SECONDS of work) and sends the size in the decision,
so a cancelled prompt stops at the next chunk boundary on every rank.

The prefix cache (runtime/prefix_cache.py): rank 0 chooses, for each request joining, the cached
prefix it reuses (Insert.entry, Insert.cached) and which finished sequences to keep or entries
to evict (StepDecision.keep, evict); every rank restores and stores its own shard of that KV.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences, generation_stream

from runtime import constrain, cpu_attention, kv_quant, sampling
from runtime.prefix_cache import GB, KVStore, PrefixIndex, common_prefix, cut, prefixable
from runtime.decision import Insert, StepDecision
from runtime.stepstats import StepStats
from runtime.steptrace import StepTrace
from runtime.requests import (
    EngineFailed, FinishEvent, GenerationRequest, PromptTooLong, QueueFull, RequestHandle, TokenEvent,
)

log = logging.getLogger("exolaunch.engine")

PREFILL_CHUNK_SECONDS = 1.0  # a prefill step's target length: how late a cancel can take effect
MIN_PREFILL_CHUNK = 64  # smaller chunks cost more in per-step overhead than they save in latency
LEASE_SECONDS = 0.02  # steps per decision while nothing changes: how late a new request may join
MAX_LEASE = 16
# With nothing running, rank 0 holds the first step up to this long while the API is still
# preparing requests that arrived with the first (an agent's parallel calls: 8-18 ms apart here),
# so they prefill as one batch instead of the later ones waiting for the first one's prefill.
COALESCE_SECONDS = 0.03
MIN_SHARE = 64  # tokens a running sequence must add over the prefix cache for a prompt to share its KV


@dataclass
class _Live:
    """Rank 0's view of one running request."""

    handle: RequestHandle
    uid: int
    detok: object
    stops: list[str]
    completion: int = 0
    emitted: int = 0  # characters of detokenized text already sent
    finished: bool = False
    text: str = field(default="")
    cached: int = 0  # prompt tokens restored from the prefix cache
    generated: list[int] = field(default_factory=list)  # every token the ranks produced for it
    gen_done: bool = False  # the generator ended it (EOS, length): it leaves at the next decision


class Engine:
    """Admission (rank 0): at most `max_num_seqs` sequences run, and the prompt + max_tokens of
    the running ones together stay within `max_total_tokens` (the KV budget the plan sized, so a
    plan that fits keeps fitting under load); what does not fit now waits in a queue of at most
    `max_queue` requests, beyond which submit raises QueueFull."""

    def __init__(self, model, tokenizer, *, model_id: str, model_path: Path, group, control=None,
                 context_length: int = 4096, prefill_step: int = 256, max_num_seqs: int = 32,
                 max_queue: int = 256, max_total_tokens: int | None = None, prefix_cache_gb: float = 1.0,
                 kv_bits: int | None = None, kv_group_size: int = 64, speculator=None):
        self.model, self.tokenizer = model, tokenizer
        self.model_id, self.model_path = model_id, Path(model_path)
        self.group, self.control = group, control
        self.rank = group.rank()
        self.context_length = context_length
        self.max_num_seqs, self.max_queue = max(1, max_num_seqs), max(0, max_queue)
        self.max_total_tokens = max_total_tokens or self.max_num_seqs * context_length
        self.created = int(time.time())
        self.gen = BatchGenerator(model, prefill_step_size=prefill_step, completion_batch_size=self.max_num_seqs,
                                  prefill_batch_size=min(8, self.max_num_seqs))
        self.prefill_step = max(1, prefill_step)
        self._chunk = min(self.prefill_step, 256)  # grows while steps stay short (_size_chunk)
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self._make_cache = kv_quant.cache_factory(model, kv_bits, kv_group_size)  # ValueError: cannot quantize
        # The prefix cache: the index on rank 0 (sized once the loops start: it needs every
        # rank's KV bytes per token), this rank's KV of each entry everywhere.
        self.prefix_cache_bytes = round(max(0.0, prefix_cache_gb) * GB) if prefixable(self._make_cache()) else 0
        self.kv_bytes_per_token = 0  # this rank's, measured when the loop starts
        self.index: PrefixIndex | None = None
        self.store = KVStore()
        self._gen_finished: dict[int, list] = {}  # uid -> caches of sequences the generator ended this step
        eos = list(getattr(tokenizer, "eos_token_ids", None) or [])
        self._stop_eos = StopSequences([[t] for t in eos]) if eos else StopSequences(None)
        self._stop_none = StopSequences(None)
        self.ready = False
        self.failed: str | None = None
        self._cv = threading.Condition()
        self._pending: list[RequestHandle] = []
        self._live: dict[int, _Live] = {}
        self._stopping = False
        self._new_handles: list[RequestHandle] = []
        self._expected, self._expected_at = 0, 0.0  # requests the API is preparing (arriving())
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.spec = speculator  # runtime/speculative.py, or None: one token per sequence per step
        self._step_ema = 0.0  # seconds per step, for the lease length
        self._waited = 0.0
        self.stats = StepStats()  # step times for /metrics (runtime/stepstats.py)

    # -- rank 0: API side (any thread) ---------------------------------------------------
    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        try:
            return self._submit(req, loop)
        except BaseException:
            with self._cv:  # it will not come: an idle engine need not wait for it
                self._expected = max(0, self._expected - 1)
                self._cv.notify()
            raise

    def _submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None) -> RequestHandle:
        if self.failed:
            raise EngineFailed(self.failed)
        p = req.params
        n = len(req.prompt_tokens)
        if n == 0:
            raise ValueError("the prompt is empty")
        if req.kv_tokens > self.context_length:
            raise PromptTooLong(f"the prompt has {n} tokens and max_tokens is {p.max_tokens}: {req.kv_tokens} "
                                f"exceeds the model's context of {self.context_length} tokens")
        if req.kv_tokens > self.max_total_tokens:
            raise PromptTooLong(f"the prompt has {n} tokens and max_tokens is {p.max_tokens}: {req.kv_tokens} "
                                f"exceeds the cluster's KV cache budget of {self.max_total_tokens} tokens "
                                "(--max-total-tokens)")
        if p.grammar is not None:
            # Refuse here what a rank could not compile in _apply (that would stop the engine).
            constrain.validate(p.grammar, self.tokenizer)  # UnsupportedGrammar (a ValueError)
        handle = RequestHandle(req, loop)
        with self._cv:
            if self._stopping:
                raise EngineFailed("the server is shutting down")
            # Waiting = pending requests beyond the free sequence slots (the next step admits those).
            free = self.max_num_seqs - sum(1 for lv in self._live.values() if not lv.finished)
            waiting = sum(1 for h in self._pending if not h.cancelled.is_set()) - max(0, free)
            if waiting >= self.max_queue:
                # Roughly when a slot frees up: each full round of running sequences ahead.
                retry = 1.0 + waiting // self.max_num_seqs
                raise QueueFull(f"the server is busy: {waiting} requests are waiting (--max-queue "
                                f"{self.max_queue}); retry after {retry:g} s", retry_after=retry)
            self._pending.append(handle)
            self._expected = max(0, self._expected - 1)
            self._cv.notify()
        return handle

    def arriving(self) -> None:
        with self._cv:
            self._expected += 1
            self._expected_at = time.monotonic()

    def _coalesce(self) -> None:
        """Rank 0, holding the lock, with requests pending and none running: wait while requests
        the API admitted are still being prepared, at most COALESCE_SECONDS after the last of
        them arrived (one that failed before its submit never comes, so the count expires)."""
        while self._expected > 0 and not self._stopping:
            left = self._expected_at + COALESCE_SECONDS - time.monotonic()
            if left <= 0:
                self._expected = 0
                break
            self._cv.wait(left)

    def active_requests(self) -> int:
        return sum(self.load())

    def load(self) -> tuple[int, int]:
        """(running sequences, requests waiting to be admitted)."""
        with self._cv:
            return sum(1 for lv in self._live.values() if not lv.finished), len(self._pending)

    def _fits(self, h: RequestHandle, running: int, reserved: int) -> bool:
        return (running < self.max_num_seqs
                and reserved + h.request.kv_tokens <= self.max_total_tokens)

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        # An engine thread still inside mlx when the interpreter finalizes aborts the process.
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def fail(self, reason: str) -> None:
        """The cluster can no longer serve: every open request gets an error now."""
        with self._cv:
            if self.failed:
                return
            self.failed = reason
        self._close_open(reason)

    def _close_open(self, reason: str) -> None:
        with self._cv:
            # Also the handles of this step's inserts, which are in neither list for a moment.
            handles = [lv.handle for lv in self._live.values() if not lv.finished] + self._pending
            handles += [h for h in self._new_handles if h not in handles]
            counts = {id(lv.handle): lv.completion for lv in self._live.values()}
            self._pending = []
            self._stopping = True
            self._cv.notify()
        for h in handles:
            if not h.done:
                h.push(FinishEvent("error", len(h.request.prompt_tokens), counts.get(id(h), 0), error=reason))

    # -- the step decision ---------------------------------------------------------------
    def _decide(self, block: bool = True) -> StepDecision | None:
        """Rank 0: this step's decision; with block, wait for work first, without, None when
        there is none (the caller hands out the last tokens, then waits). Requests join in
        arrival order while they fit (admission above); the first that does not fit waits, and
        so does everyone behind it, so a long request is never starved by short ones."""
        removes, leaving = [], []
        with self._cv:
            # Sequences that just ended are removed (and kept by the prefix cache) at once, not
            # when the next request comes: keeping copies their KV, which is no request's wait.
            while not (self._pending or self._stopping or self._live):
                if not block:
                    return None
                self._cv.wait()
            stopping = self._stopping
            # _live changes only under the lock: fail() may close it from another thread.
            for uid, lv in list(self._live.items()):
                if lv.finished or lv.gen_done:
                    removes.append(uid)
                    leaving.append(lv)
                    del self._live[uid]
                elif lv.handle.cancelled.is_set():
                    self._finish(lv, "cancelled")
                    removes.append(uid)
                    leaving.append(lv)
                    del self._live[uid]
            if self._pending and not self._live and not stopping:
                self._coalesce()  # nothing runs: requests sent together may start together
            running = len(self._live)
            reserved = sum(lv.handle.request.kv_tokens for lv in self._live.values())
            new = []
            while not stopping and self._pending and (self._pending[0].cancelled.is_set()
                                                      or self._fits(self._pending[0], running, reserved)):
                h = self._pending.pop(0)
                new.append(h)
                h.admitted_at = time.monotonic()  # queue time (runtime/api/metrics.py)
                if not h.cancelled.is_set():
                    running += 1
                    reserved += h.request.kv_tokens
            waiting = bool(self._pending)
            live = [lv for lv in self._live.values() if lv.generated and not lv.finished]
        keep, evict = self._keep(leaving) if self.index is not None and not stopping else ([], [])
        inserts = []
        for h in new:
            if h.cancelled.is_set():
                h.push(FinishEvent("cancelled", len(h.request.prompt_tokens), 0))
                continue
            p = h.request.params
            seed = p.seed if p.seed is not None else random.getrandbits(31)
            prompt = h.request.prompt_tokens
            entry, cached = (-1, 0)
            if self.index is not None:
                entry, cached = self.index.lookup(prompt)
                entry, cached = self._share(prompt, entry, cached, live, inserts, keep, evict)
            self.stats.prefix_lookup(len(prompt), cached, self.index is not None)
            inserts.append(Insert(prompt[cached:], p.max_tokens, p.temperature, p.top_p, p.top_k,
                                  seed, eos=not p.ignore_eos, grammar=p.grammar, entry=entry, cached=cached,
                                  **sampling.insert_fields(p, prompt)))
            self._new_handles.append(h)
        step = not stopping and (bool(inserts) or bool(self._live))
        # A lease: while nothing waits, every rank runs several steps on this decision, as many as
        # fit in LEASE_SECONDS (new requests and cancels wait at most that long); one at a time
        # while requests wait for a slot or prompts are being prefilled (long steps).
        run = 1 if waiting or inserts else max(1, min(MAX_LEASE, int(LEASE_SECONDS / max(self._step_ema, 1e-4))))
        return StepDecision(inserts, removes, step=step, stop=stopping, keep=keep, evict=evict,
                            prefill=self._chunk, run=run)

    def _keep(self, leaving: list[_Live]) -> tuple[list[list[int]], list[int]]:
        """Rank 0: which leaving sequences the prefix cache keeps, and what that evicts. Only a
        sequence whose prefill completed (it has produced a token) holds a whole prompt's KV; a
        request cancelled or failed mid-prefill leaves nothing behind. The cache holds the
        prompt and every generated token but the last (its KV was never computed, or not by
        every path), which is also what the next turn of a conversation starts with."""
        keep, evict = [], []
        for lv in leaving:
            if not lv.generated:
                continue
            tokens = lv.handle.request.prompt_tokens + lv.generated[:-1]
            if self.index.covers(tokens):
                continue
            eid, dropped = self.index.add(tokens)
            evict += dropped
            if eid >= 0:
                keep.append([lv.uid, eid, len(tokens)])
        return keep, evict

    def _share(self, prompt: list[int], entry: int, cached: int, live: list[_Live], inserts: list[Insert],
               keep: list, evict: list) -> tuple[int, int]:
        """Rank 0: a prompt that shares more with a running sequence than with any cache entry
        (requests with one system prompt in flight together) reuses that sequence's KV: it is
        kept in this same decision (keeps apply before inserts). Only sequences whose prompt is
        all in their KV (they have produced a token); only for at least MIN_SHARE more tokens,
        since keeping copies the sequence's KV out of the batch."""
        best, n = None, cached
        for lv in live:
            m = min(common_prefix(lv.handle.request.prompt_tokens, prompt), len(prompt) - 1)
            if m > n:
                best, n = lv, m
        if best is None or n - cached < MIN_SHARE:
            return entry, cached
        protect = {i.entry for i in inserts if i.cached} | {k[1] for k in keep}
        eid, dropped = self.index.add(prompt[:n], protect=protect)
        evict += dropped
        if eid < 0:
            return entry, cached
        keep.append([best.uid, eid, n])
        self.index.shared(cached, n)
        return eid, n

    def _apply(self, d: StepDecision) -> list[int]:
        """Every rank: the same keeps, evictions, removals and inserts, in the same order."""
        for uid, eid, n in d.keep:
            caches = self._gen_finished.get(uid)
            if caches is None:  # still in the batch (a stop string, a cancel): copy it out first
                caches = self.gen.extract_cache([uid])[uid][0]
            self.store.keep(eid, caches, n)
        for uid in d.removes:  # gone from the batch: its held caches and draft statistics go too
            self._gen_finished.pop(uid, None)
            if self.spec is not None:
                self.spec.forget(uid)  # on every rank alike: its state steers what a rank drafts
        for eid in d.evict:
            self.store.drop(eid)
        if d.removes:
            self.gen.remove(d.removes)
        if d.prefill:
            # The chunk rank 0 chose for this step, on every rank alike: the generator slices each
            # prompt by its own size and its prompt batch chunks by the batch's.
            self.gen.prefill_step_size = self.gen._prompt_batch.prefill_step_size = d.prefill
        uids = []
        if d.inserts:
            ins = d.inserts
            uids = self.gen.insert(
                [i.tokens for i in ins],
                max_tokens=[i.max_tokens for i in ins],
                caches=[self.store.restore(i.entry, i.cached) if i.cached else self._make_cache() for i in ins],
                samplers=[sampling.make_sampler(i.temperature, i.top_p, i.top_k, i.seed, i.min_p) for i in ins],
                stop_sequences=[self._stop_eos if i.eos else self._stop_none for i in ins],
                logits_processors=[self._processors(i) for i in ins],
            )
        return uids

    # -- loops -------------------------------------------------------------------------
    def run_leader(self) -> None:
        with cpu_attention.engine_scope():
            self._lead()

    def run_follower(self, recv) -> None:
        """recv() returns the next encoded StepDecision from rank 0; the follower runs the
        decision's lease of steps, then reads the next one (rank 0 sent it during the last)."""
        with cpu_attention.engine_scope():
            self._follow(recv)

    def _lead(self) -> None:
        """Rank 0's loop. Pipelined: after the last step of a lease the next decision is made and
        sent before this step's tokens are detokenized and handed out, so the followers start the
        next step while rank 0 does its bookkeeping (a request that this step finished by a stop
        string runs one step more, whose token is discarded); within a lease no decision is sent
        at all. mlx-lm's generator keeps the next step's graph queued (async_eval) meanwhile."""
        self._measure_kv()
        self.ready = True
        trace = StepTrace(self.rank, self.model)
        try:
            trace.start()
            d = self._send(self._decide(), trace)
            while True:
                self._admit(d)
                trace.mark("apply")
                if d.stop:
                    self._close_open("the server is shutting down")
                    break
                nxt = None
                for i in range(d.steps):
                    pairs = self._record(self._step(trace))
                    if i == d.steps - 1:
                        nxt = self._decide(block=False)
                        trace.mark("decide")
                        if nxt is not None:
                            self._send(nxt, trace)
                    self._emit(pairs)
                    trace.mark("dispatch")
                    trace.end(batch=len(pairs))
                if nxt is None:
                    nxt = self._send(self._decide(), trace)
                d = nxt
        except Exception as e:  # a lost peer surfaces here as an mlx or socket error
            log.exception("engine step failed")
            self.fail(self.failed or f"engine failure on rank 0: {type(e).__name__}: {e}")
            raise
        finally:
            self.ready = False

    def _send(self, d: StepDecision, trace: StepTrace) -> StepDecision:
        if self.control is not None:
            self.control.broadcast(d.encode())
        trace.mark("send")
        return d

    def _admit(self, d: StepDecision) -> None:
        """Rank 0: apply the decision, and start following the requests it inserted."""
        uids = self._apply(d)
        with self._cv:
            for uid, h, ins in zip(uids, self._new_handles, d.inserts):
                self._live[uid] = _Live(h, uid, self._detokenizer(), list(h.request.params.stop),
                                        cached=ins.cached)
            self._new_handles = []

    def _step(self, trace: StepTrace) -> list:
        """Every rank: one batched step (prefill chunk and/or decode), timed."""
        t = time.perf_counter()
        c = self.gen._counters
        before = c.prompt_time, c.prompt_tokens
        responses = self.spec.next(self.gen)[1] if self.spec is not None else self.gen.next()[1]
        trace.mark("step")
        spent = time.perf_counter() - t
        self.stats.step(spent, waited=self._waited)
        self._waited = 0.0
        self.steps += 1
        self._step_ema = spent if self._step_ema == 0 else 0.8 * self._step_ema + 0.2 * spent
        self._hold_finished(responses)
        if self.rank == 0:
            self._size_chunk(c.prompt_time - before[0], c.prompt_tokens - before[1])
        return responses

    def _follow(self, recv) -> None:
        self._measure_kv()
        self.ready = True
        trace = StepTrace(self.rank, self.model)
        trace.start()
        busy = False
        while True:
            t0 = time.perf_counter()
            d = StepDecision.decode(recv())
            trace.mark("recv")
            self._apply(d)
            trace.mark("apply")
            if d.stop:
                return
            self._waited = time.perf_counter() - t0 if busy else 0.0  # lock-step cost while requests run
            for _ in range(d.steps):
                self._step(trace)
                trace.end()
            busy = d.steps > 0

    def _hold_finished(self, responses) -> None:
        """Every rank: the caches of sequences the generator ended this step, until the next
        decision says which of them the prefix cache keeps."""
        if self.prefix_cache_bytes:
            for r in responses:
                if r.finish_reason is not None and r.prompt_cache is not None:
                    self._gen_finished[r.uid] = r.prompt_cache

    def _size_chunk(self, prefill_s: float, tokens: int) -> None:
        """Rank 0: the next prefill chunk, so that a step's prefill takes about
        PREFILL_CHUNK_SECONDS (never more than prefill_step tokens per sequence)."""
        if prefill_s <= 0:
            return
        want = self._chunk * PREFILL_CHUNK_SECONDS / prefill_s
        want = min(self.prefill_step, max(MIN_PREFILL_CHUNK, int(want)))
        if want < self._chunk:
            self._chunk = want  # shrink at once
        elif tokens >= self._chunk:
            # Grow gently, and only on a step that filled a chunk: short prompts say nothing
            # about how long a full chunk of a long one takes.
            self._chunk = min(want, self._chunk * 2)

    def _measure_kv(self) -> None:
        """Every rank, once, before the first step (all ranks run it, so its collectives
        match): this rank's KV bytes per token, from one token through a fresh cache; then the
        largest over the ranks sizes rank 0's prefix cache index in tokens."""
        caches = self._make_cache()
        with mx.stream(generation_stream):
            self.model(mx.array([[0]]), cache=caches)
            mx.eval([c.state for c in caches if not c.empty()])
            self.kv_bytes_per_token = sum(cut(c, 1).nbytes for c in caches if not c.empty())
            worst = self.kv_bytes_per_token
            if self.group.size() > 1:
                mine = mx.zeros((self.group.size(),), dtype=mx.float32)
                mine[self.rank] = float(self.kv_bytes_per_token)
                worst = int(mx.distributed.all_sum(mine, group=self.group).max().item())
        if self.rank == 0 and self.prefix_cache_bytes and worst > 0:
            self.index = PrefixIndex(self.prefix_cache_bytes // worst)

    # -- rank 0: turning tokens into events -------------------------------------------
    def _processors(self, i: Insert) -> list:
        """The logits processors of an inserted sequence: bias and penalties, then the grammar's
        mask last, so that nothing lifts a token the grammar forbids."""
        out = sampling.processors(i.logit_bias, i.presence_penalty, i.frequency_penalty,
                                   i.repetition_penalty, i.penalty_prompt, i.penalty_window)
        if i.grammar:
            out.append(constrain.logits_processor(i.grammar, self.tokenizer))
        return out

    def _detokenizer(self):
        detok = self.tokenizer.detokenizer
        # mlx-lm's BPE detokenizer drops the first token's leading space, which glues a
        # completion to its prompt and disagrees with the token's bytes; keep the text as is.
        if hasattr(detok, "_maybe_trim_space"):
            detok._maybe_trim_space = lambda text: text
        return detok

    def _record(self, responses) -> list[tuple[_Live, object]]:
        """Rank 0, right after a step: note each running request's new tokens (what the next
        decision needs: which sequences the generator ended, what their KV holds); the text
        comes later, in _emit."""
        pairs = []
        with self._cv:
            for r in responses:
                lv = self._live.get(r.uid)
                if lv is None or lv.finished or lv.gen_done:
                    continue  # stopped by text or cancelled; its removal is in the next decision
                lv.generated.append(r.token)
                lv.gen_done = r.finish_reason is not None
                pairs.append((lv, r))
        return pairs

    def _emit(self, pairs) -> None:
        """Rank 0: detokenize, find stop strings and hand the tokens to the API."""
        for lv, r in pairs:
            if lv.finished:
                continue  # a stop string earlier in this step (several tokens per step: speculation)
            lv.completion += 1
            p = lv.handle.request.params
            logprob = top = None
            if p.logprobs:
                logprob, top = self._logprobs(r.logprobs, r.token, p.top_logprobs)
            eos_stop = r.finish_reason == "stop"
            if not eos_stop:
                lv.detok.add_token(r.token)
            text = lv.detok.text
            stop_hit, cut = self._find_stop(lv, text)
            if stop_hit is not None:
                lv.handle.push(TokenEvent(r.token, text[lv.emitted:cut], logprob, top))
                lv.emitted = cut
                self._finish(lv, "stop", stop_string=stop_hit)
                continue
            safe = self._safe_end(lv, text)
            lv.handle.push(TokenEvent(r.token, text[lv.emitted:safe], logprob, top))
            lv.emitted = max(lv.emitted, safe)
            if r.finish_reason is not None:
                lv.detok.finalize()
                self._finish(lv, r.finish_reason, tail=lv.detok.text[lv.emitted:])

    def _finish(self, lv: _Live, reason: str, tail: str = "", stop_string: str | None = None) -> None:
        lv.finished = True
        drafted, accepted = self.spec.stats(lv.uid) if self.spec is not None else (0, 0)
        lv.handle.push(FinishEvent(reason, len(lv.handle.request.prompt_tokens), lv.completion,
                                   text=tail, stop_string=stop_string, cached_tokens=lv.cached,
                                   draft_tokens=drafted, accepted_draft_tokens=accepted))

    @staticmethod
    def _find_stop(lv: _Live, text: str) -> tuple[str | None, int]:
        """Earliest stop string in the text not yet emitted (it may span token boundaries)."""
        if not lv.stops:
            return None, 0
        longest = max(len(s) for s in lv.stops)
        start = max(0, lv.emitted - longest + 1)
        best = None
        for s in lv.stops:
            i = text.find(s, start)
            if i != -1 and (best is None or i < best[1]):
                best = (s, i)
        return best if best else (None, 0)

    @staticmethod
    def _safe_end(lv: _Live, text: str) -> int:
        """How far text can be emitted: hold back a tail that could still begin a stop string.
        Only the last len(stop) - 1 characters can, and only from where the stop's first
        character occurs there, so the work per token is bounded by the stop strings' lengths
        (capped by the API), not by the length of the output."""
        end = len(text)
        for s in lv.stops:
            if not s:
                continue
            tail_start = max(len(text) - (len(s) - 1), lv.emitted)
            i = text.find(s[0], tail_start)
            while i != -1:
                if s.startswith(text[i:]):
                    end = min(end, i)
                    break
                i = text.find(s[0], i + 1)
        return max(end, lv.emitted)

    @staticmethod
    def _logprobs(logprobs: mx.array, token: int, k: int):
        lp = logprobs.astype(mx.float32)
        chosen = lp[token].item()
        if k <= 0:
            return chosen, []
        idx = mx.argpartition(-lp, kth=k - 1)[:k]
        vals = lp[idx]
        order = mx.argsort(-vals)
        return chosen, list(zip(idx[order].tolist(), vals[order].tolist()))

    # -- in-process use ------------------------------------------------------------------
    @classmethod
    def start_local(cls, model_path, model_id: str | None = None, **kw) -> "Engine":
        """A one-rank engine in this process, looping in a background thread."""
        from mlx_lm.utils import load as mlx_load

        from runtime.contract import context_length, read_config

        model_path = Path(model_path)
        model, tokenizer = mlx_load(str(model_path))
        group = mx.distributed.init(strict=False)
        eng = cls(model, tokenizer, model_id=model_id or model_path.name, model_path=model_path, group=group,
                  context_length=kw.pop("context_length", None) or context_length(read_config(model_path)), **kw)
        t = threading.Thread(target=eng.run_leader, name="exolaunch-engine", daemon=True)
        t.start()
        eng._thread = t
        return eng
