"""What one request may ask for: every bound the API enforces, stated once.

Nothing a client sends may reach a rank unless it is safe there: a sampler that raises, or
samples garbage, does so inside every rank's step. `Serving.submit` (the only door to the
engine) passes every SamplingParams through `checked` below, whatever the dialect; the dialects'
body models state the same ranges for their wire fields (so the OpenAPI schema and the error's
field name are right), using the constants here.

    checked(params, vocab, names)   the engine-bound values: refused (400) or clamped
    MAX_STOP, MAX_STOP_CHARS        stop strings per request, characters per stop string
    MAX_SEQUENCES                   engine sequences one request may start (prompts x n)
    MAX_REQUEST_TOKENS              a max_tokens beyond it is refused; below, one larger than
                                    the context leaves is clamped (core.output_budget)
    CHARS_PER_TOKEN                 prompt text denser than this cannot fit: refused before
                                    tokenizing (`check_prompt_chars`)
    MAX_JSON_DEPTH                  nesting of a request body (runtime/api/body.py)
    DEFAULT_MAX_BODY_MB             request body size (413 beyond; `--max-body-mb`)
    MAX_LOGIT_BIAS                  logit_bias entries per request
    PENALTY_MAX                     presence / frequency penalties: -2..2 (OpenAI's range)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ..requests import SamplingParams
from .errors import bad_request

MAX_STOP = 16
# A stop string longer than a few lines is not a stop string; every token of the request
# scans for each one (runtime/engine.py), so their length is part of every token's cost.
MAX_STOP_CHARS = 256
# prompts x n: each is one engine sequence; 100,000 prompts x 16 would be 1.6 M inserts in
# one step decision on every rank. 128 covers batch clients (8 x the largest n).
MAX_SEQUENCES = 128
MAX_CHOICES = 16  # n, best_of
MAX_TOP_LOGPROBS = 20
# A max_tokens above this is refused, not clamped to the context (core.output_budget): int32's
# limit, beyond every context; what a client sends there is garbage, not a budget.
MAX_REQUEST_TOKENS = (1 << 31) - 1
# Below this a positive temperature is greedy in all but name, and under ~3e-38 its inverse
# overflows float32 and the sampler returns garbage: 0 is how to ask for greedy.
MIN_TEMPERATURE = 1e-6
# Above this, 1/temperature underflows towards float32 zero and masked tokens (top-k, top-p,
# grammars: -inf) turn into NaN; far beyond any useful randomness anyway.
MAX_TEMPERATURE = 100.0
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what fits an int64 or a uint64
SEED_MOD = 1 << 63  # seeds travel to every rank as int64
LOGIT_BIAS_MAX = 100.0  # OpenAI's range, -100..100
MAX_LOGIT_BIAS = 1024  # entries: each travels to every rank with the request
PENALTY_MAX = 2.0  # OpenAI's presence / frequency range, -2..2
# repetition_penalty divides (or multiplies) logits: within these bounds they stay finite in
# float32 and bfloat16 (a divisor near 0 made them inf, then NaN, on every rank); beyond them
# every seen token is gone, or favoured, anyway
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# No natural text averages more than ~6 characters per token (English ~4, code ~3.5, CJK
# ~1.5): a prompt with more characters than context x 16 cannot fit and is refused before it
# occupies the tokenizer thread (8 MB of text takes ~16 s to tokenize on a 2-core host).
CHARS_PER_TOKEN = 16
MAX_JSON_DEPTH = 64
DEFAULT_MAX_BODY_MB = 8.0


def _name(names: Mapping[str, str], field: str) -> str:
    return names.get(field, field)


def check_number(value: Any, param: str, *, lo: float | None = None, hi: float | None = None,
                 integer: bool = False) -> None:
    """A finite number (an integer if asked) within [lo, hi]; else a 400 naming `param`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if not ok:
        raise bad_request(f"{param}: must be {'an integer' if integer else 'a number'} "
                          f"(got {_show(value)})", param)
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_request(f"{param}: must be a finite number (got {value})", param)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            rng = f"between {lo:g} and {hi:g}" if not integer else f"between {lo} and {hi}"
        else:
            rng = f">= {lo:g}" if lo is not None else f"<= {hi:g}"
        raise bad_request(f"{param}: must be {rng} (got {_show(value)})", param)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def checked(p: SamplingParams, vocab: int | None, names: Mapping[str, str] = {}
            ) -> SamplingParams:
    """`p` as every rank may safely run it: a 400 (naming the dialect's field, `names` maps
    temperature / top_p / top_k / seed / stop / max_tokens / top_logprobs to it) for a value
    no sampler can use; top_k >= the vocabulary keeps every token, so it becomes 0 (off)."""
    check_number(p.max_tokens, _name(names, "max_tokens"), lo=1, integer=True)
    t = _name(names, "temperature")
    check_number(p.temperature, t, lo=0, hi=MAX_TEMPERATURE)
    if 0 < p.temperature < MIN_TEMPERATURE:
        raise bad_request(f"{t}: must be 0 (greedy) or at least {MIN_TEMPERATURE:g} "
                          f"(got {p.temperature:g})", t)
    check_number(p.top_p, _name(names, "top_p"), lo=0, hi=1)
    check_number(p.top_k, _name(names, "top_k"), lo=0, integer=True)
    if p.seed is not None:
        check_number(p.seed, _name(names, "seed"), lo=SEED_MIN, hi=SEED_MAX, integer=True)
    check_number(p.top_logprobs, _name(names, "top_logprobs"), lo=0, hi=MAX_TOP_LOGPROBS,
                 integer=True)
    check_stops(p.stop, _name(names, "stop"))
    top_k = int(p.top_k)
    if vocab and top_k >= vocab:
        top_k = 0
    seed = None if p.seed is None else int(p.seed) % SEED_MOD
    check_number(p.min_p, _name(names, "min_p"), lo=0, hi=1)
    for field in ("presence_penalty", "frequency_penalty"):
        check_number(getattr(p, field), _name(names, field), lo=-PENALTY_MAX, hi=PENALTY_MAX)
    check_number(p.repetition_penalty, _name(names, "repetition_penalty"), lo=MIN_REPETITION_PENALTY,
                 hi=MAX_REPETITION_PENALTY)
    check_number(p.penalty_window, _name(names, "penalty_window"), lo=0, integer=True)
    bias = check_logit_bias(p.logit_bias, vocab, _name(names, "logit_bias"))
    return dataclasses.replace(p, max_tokens=int(p.max_tokens), temperature=float(p.temperature),
                               top_p=float(p.top_p), top_k=top_k, seed=seed,
                               top_logprobs=int(p.top_logprobs), min_p=float(p.min_p),
                               presence_penalty=float(p.presence_penalty),
                               frequency_penalty=float(p.frequency_penalty),
                               repetition_penalty=float(p.repetition_penalty),
                               penalty_window=int(p.penalty_window), logit_bias=bias or None)


def check_stops(stops: Any, param: str) -> list[str]:
    """At most MAX_STOP strings of at most MAX_STOP_CHARS characters each."""
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"{param}: must be a string or a list of strings", param)
    if len(stops) > MAX_STOP:
        raise bad_request(f"{param}: at most {MAX_STOP} stop sequences (got {len(stops)})", param)
    for s in stops:
        if len(s) > MAX_STOP_CHARS:
            raise bad_request(f"{param}: a stop sequence may have at most {MAX_STOP_CHARS} "
                              f"characters (got {len(s)})", param)
    return stops


def check_sequences(prompts: int, n: int, param: str = "prompt") -> None:
    """prompts x n engine sequences for one request: at most MAX_SEQUENCES."""
    if prompts * n > MAX_SEQUENCES:
        raise bad_request(f"{param}: {prompts} prompt(s) x n={n} would start {prompts * n} "
                          f"sequences; at most {MAX_SEQUENCES} per request (send the rest in "
                          "further requests)", param, "too_many_sequences")


def check_prompt_chars(chars: int, context_length: int, param: str) -> None:
    """Refuse, before tokenizing, text that cannot fit the context at any natural density."""
    limit = context_length * CHARS_PER_TOKEN
    if chars > limit:
        raise bad_request(f"{param}: the prompt has {chars} characters, more than the model's "
                          f"context of {context_length} tokens can hold ({limit} characters at "
                          f"{CHARS_PER_TOKEN} per token)", param, "context_length_exceeded")


def check_logit_bias(bias: Mapping[Any, Any] | None, vocab: int | None,
                     param: str = "logit_bias") -> dict[int, float]:
    """{token id: bias} (ids as JSON's string keys or ints): at most MAX_LOGIT_BIAS of them, ids
    in the vocabulary, biases in -100..100. Returns it with int ids and float biases."""
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        raise bad_request(f"{param}: must be an object of token id -> bias", param)
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad_request(f"{param}: at most {MAX_LOGIT_BIAS} entries (got {len(bias)})", param)
    out: dict[int, float] = {}
    for key, value in bias.items():
        where = f"{param}.{key}"
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad_request(f"{param}: keys must be token ids (got {_show(key)})", param) \
                from None
        if token < 0 or (vocab and token >= vocab):
            raise bad_request(f"{param}: token id {token} is out of range (vocabulary: "
                              f"{vocab})", param)
        check_number(value, where, lo=-LOGIT_BIAS_MAX, hi=LOGIT_BIAS_MAX)
        out[token] = float(value)
    return out
