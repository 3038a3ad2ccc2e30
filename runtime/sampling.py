"""How a token is chosen, the same on every rank: per-request samplers (temperature, top-k,
min-p, top-p, a seeded PRNG key), and logits processors for logit_bias and the repetition
penalties, built from the step decision (runtime/decision.Insert) so sampled tokens stay identical
everywhere.

Penalties follow one of two conventions, both in use by the clients we serve:
- OpenAI / vLLM (`window` 0): presence_penalty and frequency_penalty count the tokens generated
  so far; repetition_penalty (vLLM's extension) covers the prompt's tokens and those.
- llama.cpp / Ollama (`window` N > 0, Ollama's repeat_last_n): all three count the last N tokens
  of prompt and output together.
Then: presence subtracts `presence` from every token seen, frequency `frequency` x its count, and
repetition divides a positive logit by `repetition` and multiplies a negative one (HF's rule).
logit_bias is added first, as OpenAI describes it: to the logits before anything else.

A processor sees the sequence's token context, whose last entry is the token fed to this step:
the last prompt token at the first step, the previously sampled token after. Counts are kept as
mx arrays and updated lazily, so nothing here waits for a step to finish (the engine keeps the
next step queued while it reads this one).
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

from runtime.requests import SamplingParams


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens. Not mlx-lm's apply_top_k: that one raises for k >= the
    vocabulary (inside every rank's step, which ends the cluster) and, compiled with k as a
    constant, compiles anew for every distinct k."""
    if k >= logprobs.shape[-1]:
        return logprobs
    drop = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, drop, mx.array(-float("inf"), logprobs.dtype), axis=-1)


def make_sampler(temperature: float, top_p: float, top_k: int, seed: int, min_p: float = 0.0):
    """A per-request sampler with its own PRNG key: the same seed gives the same tokens on
    every rank and in every batch composition. Greedy requests share one function so the
    generator can sample them in one batched call. The API validates the values; out-of-range
    ones are still made harmless here, since a sampler that raises stops every rank."""
    if not temperature > 0 or not math.isfinite(temperature):  # NaN, 0, negative: greedy
        return _greedy
    state = [mx.random.key(seed)]
    inv_t = 1.0 / max(temperature, 1e-6)
    # top_p as an array: mlx compiles apply_top_p once per distinct Python float otherwise
    # (0.7 s each on the CPU build), and a client sweeping top_p would stall every request.
    p = mx.array(top_p, dtype=mx.float32) if 0 < top_p < 1 else None
    # min_p: keep log p >= log p_max + log min_p (mlx-lm's apply_min_p compiles per value too)
    floor = mx.array(math.log(min_p), dtype=mx.float32) if 0 < min_p <= 1 else None

    def sample(logprobs: mx.array) -> mx.array:
        if top_k > 0:
            logprobs = _top_k(logprobs, top_k)
        if floor is not None:
            low = logprobs < logprobs.max(axis=-1, keepdims=True) + floor
            logprobs = mx.where(low, mx.array(-float("inf"), logprobs.dtype), logprobs)
        if p is not None:
            logprobs = apply_top_p(logprobs, p)
        state[0], sub = mx.random.split(state[0])
        return mx.random.categorical(logprobs * inv_t, key=sub)

    return sample


def _penalized(presence: float, frequency: float, repetition: float) -> bool:
    return bool(presence or frequency or repetition != 1.0)


def insert_fields(p: SamplingParams, prompt: list[int]) -> dict:
    """Insert's min_p, logit_bias and penalty fields for a request; the prompt's tokens the
    penalties count travel with it, since a follower restores a cached prefix without them."""
    out: dict = {}
    if p.min_p:
        out["min_p"] = p.min_p
    if p.logit_bias:
        out["logit_bias"] = [[int(t), float(b)] for t, b in p.logit_bias.items()]
    if _penalized(p.presence_penalty, p.frequency_penalty, p.repetition_penalty):
        out.update(presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                   repetition_penalty=p.repetition_penalty, penalty_window=p.penalty_window)
        if p.penalty_window:
            out["penalty_prompt"] = list(prompt[-p.penalty_window:])
        elif p.repetition_penalty != 1.0:
            out["penalty_prompt"] = sorted(set(prompt))
    return out


def processors(bias: list[list] | None, presence: float, frequency: float, repetition: float,
               prompt: list[int] | None, window: int) -> list:
    """The processors one sequence needs (none when nothing is asked). `prompt`: with window 0
    the prompt's distinct token ids (used by repetition only), else its last `window` tokens."""
    out = []
    if bias:
        out.append(_Bias(bias))
    if _penalized(presence, frequency, repetition):
        out.append(_Penalties(presence, frequency, repetition, prompt or [], window))
    return out


class _Bias:
    def __init__(self, bias: list[list]):
        self.ids = mx.array([int(t) for t, _ in bias], dtype=mx.int32)
        self.values = mx.array([float(v) for _, v in bias], dtype=mx.float32)

    def __call__(self, _context: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, self.ids].add(self.values.astype(logits.dtype))


class _Penalties:
    def __init__(self, presence: float, frequency: float, repetition: float, prompt: list[int], window: int):
        self.presence, self.frequency, self.repetition = presence, frequency, repetition
        self.window = window
        self.prompt = mx.array(prompt, dtype=mx.int32)
        self.started = False
        self.counts: mx.array | None = None  # window 0: per token id, how often generated so far
        self.in_prompt: mx.array | None = None  # window 0: the prompt's tokens (repetition only)
        self.recent = self.prompt  # window N: the last N tokens of prompt and output, in order

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        vocab = logits.shape[-1]
        fed = context[-1:]  # the sampled token this step feeds (after the first step)
        if self.window:
            if self.started:
                self.recent = mx.concatenate([self.recent, fed])[-self.window:]
            counts = mx.zeros((vocab,), dtype=mx.float32).at[self.recent].add(1.0)
            seen = counts > 0
        else:
            if not self.started:
                self.counts = mx.zeros((vocab,), dtype=mx.float32)
                marks = mx.zeros((vocab,), dtype=mx.float32)
                if self.repetition != 1.0 and self.prompt.size:
                    marks = marks.at[self.prompt].add(1.0)
                self.in_prompt = marks > 0
            else:
                self.counts = self.counts.at[fed].add(1.0)
            counts = self.counts
            seen = self.in_prompt | (counts > 0)
        self.started = True
        x = logits.astype(mx.float32)
        if self.repetition != 1.0:
            x = mx.where(seen, mx.where(x > 0, x / self.repetition, x * self.repetition), x)
        if self.frequency:
            x = x - self.frequency * counts
        if self.presence:
            x = x - self.presence * (counts > 0)
        return x.astype(logits.dtype)
