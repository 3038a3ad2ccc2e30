"""logit_bias and the repetition penalties, as mlx-lm logits processors every rank builds alike
from the step decision (runtime/decision.Insert), so sampled tokens stay identical everywhere.

Two conventions, both in use by the clients we serve:
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

import mlx.core as mx


def processors(bias: list[list] | None, presence: float, frequency: float, repetition: float,
               prompt: list[int] | None, window: int) -> list:
    """The processors one sequence needs (none when nothing is asked). `prompt`: with window 0
    the prompt's distinct token ids (used by repetition only), else its last `window` tokens."""
    out = []
    if bias:
        out.append(_Bias(bias))
    if presence or frequency or repetition != 1.0:
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
        self.counts: mx.array | None = None  # window 0: per token id, how often generated so far
        self.recent = self.prompt  # window N: the last N tokens of prompt and output, in order
        self.seen: mx.array | None = None  # window 0: the prompt's tokens (repetition only)

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        vocab = logits.shape[-1]
        first = self.counts is None
        if first:
            self.counts = mx.zeros((vocab,), dtype=mx.float32)
            in_prompt = mx.zeros((vocab,), dtype=mx.float32)
            if self.window == 0 and self.repetition != 1.0 and self.prompt.size:
                in_prompt = in_prompt.at[self.prompt].add(1.0)
            self.seen = in_prompt > 0
        elif self.window == 0:
            self.counts = self.counts.at[context[-1:]].add(1.0)
        if self.window:
            if not first:
                self.recent = mx.concatenate([self.recent, context[-1:]])[-self.window:]
            counts = mx.zeros((vocab,), dtype=mx.float32).at[self.recent].add(1.0)
            seen = counts > 0
        else:
            counts = self.counts
            seen = self.seen | (counts > 0)
        x = logits.astype(mx.float32)
        if self.repetition != 1.0:
            x = mx.where(seen, mx.where(x > 0, x / self.repetition, x * self.repetition), x)
        if self.frequency:
            x = x - self.frequency * counts
        if self.presence:
            x = x - self.presence * (counts > 0)
        return x.astype(logits.dtype)
