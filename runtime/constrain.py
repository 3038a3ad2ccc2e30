"""Constrained decoding: a grammar every rank compiles identically and applies as a logits mask.

A grammar travels as a small JSON-able dict (inside SamplingParams and the step decision):

    {"type": "json_schema", "schema": {...}}   JSON valid for the schema
    {"type": "json_object"}                    any JSON object
    {"type": "lark", "grammar": "..."}         llguidance Lark (may embed %json {...})
    {"type": "regex", "pattern": "..."}        a regular expression

Rank 0 calls `validate()` before submitting (a grammar llguidance cannot compile is refused with
`UnsupportedGrammar`, whose message says why: the API turns it into a 400). Every rank then builds
one `logits_processor()` per request from the same dict. The processor owns an llguidance
matcher; it is fed the same sampled tokens on every rank, so the masks (and thus the sampled
tokens) are identical everywhere without any extra communication.

Ending: once the grammar is complete (the matcher is accepting and cannot continue, or it is
stopped) only the tokenizer's EOS tokens are allowed, so a request with EOS stopping on (the
default, `ignore_eos=False`) finishes with reason "stop". While the grammar is accepting but could
still continue (e.g. after a top-level number), EOS is allowed alongside the continuations.
A request that reaches max_tokens first finishes with "length", and its text is then a
*prefix* of a valid output (e.g. truncated JSON): callers must check finish_reason.

JSON is generated compactly by default (", " and ": " separators, no other whitespace): flexible
whitespace lets a weak model emit whitespace forever. A schema's "x-guidance" key can override
this (llguidance JsonCompileOptions).

Per-step cost: the matcher computes the bitmask into a preallocated int32 numpy array
(llguidance releases the GIL), numpy unpacks it into a preallocated bool array, and one
`mx.array` plus `mx.where` applies it lazily to the logits (the forward pass is not forced).
"""

from __future__ import annotations

import threading
from typing import Any

import mlx.core as mx
import numpy as np

__all__ = ["UnsupportedGrammar", "validate", "logits_processor", "json_schema", "json_object",
           "compile_grammar", "llg_tokenizer"]

# Compact JSON unless the schema's x-guidance says otherwise.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class UnsupportedGrammar(ValueError):
    """The grammar (or JSON schema) cannot be enforced; the message says exactly why."""


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "schema": schema}


def json_object() -> dict:
    return {"type": "json_object"}


# ------------------------------------------------------------------------------------------------
# tokenizer (cached: building it takes ~1 s for a large vocabulary)
# ------------------------------------------------------------------------------------------------

_tok_lock = threading.Lock()
_tok_cache: dict[int, tuple[Any, Any]] = {}  # id(tokenizer) -> (tokenizer, LLTokenizer)


def _eos_ids(tokenizer) -> list[int]:
    ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
    if not ids:
        e = getattr(tokenizer, "eos_token_id", None)
        if e is not None:
            ids = [e]
    return sorted({int(i) for i in ids})


def llg_tokenizer(tokenizer):
    """The llguidance tokenizer for an mlx-lm TokenizerWrapper (or a HF fast tokenizer),
    built once per tokenizer object. EOS = the tokenizer's EOS ids (mlx-lm's eos_token_ids,
    which the engine also stops on)."""
    key = id(tokenizer)
    hit = _tok_cache.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    with _tok_lock:
        hit = _tok_cache.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        import llguidance.hf

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = _eos_ids(tokenizer)
        try:
            llg = llguidance.hf.from_tokenizer(hf, eos_token=eos or None)
        except Exception as e:
            raise UnsupportedGrammar(f"constrained decoding is not available for this tokenizer: {e}") \
                from None
        _tok_cache[key] = (tokenizer, llg)  # keeps the tokenizer alive: id() stays unique
        return llg


# ------------------------------------------------------------------------------------------------
# grammar dict -> llguidance grammar string
# ------------------------------------------------------------------------------------------------


def compile_grammar(grammar: dict) -> str:
    """The llguidance grammar string for a grammar dict (no tokenizer needed; not yet checked
    beyond its shape: `validate` compiles it)."""
    from llguidance import LLMatcher

    if not isinstance(grammar, dict):
        raise UnsupportedGrammar(f"a grammar must be an object, got {type(grammar).__name__}")
    kind = grammar.get("type")
    try:
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
        if kind == "json_schema":
            schema = grammar.get("schema")
            if isinstance(schema, bool):
                schema = {} if schema else {"not": {}}
            if not isinstance(schema, dict):
                raise UnsupportedGrammar(
                    f"the JSON schema must be an object, got {type(schema).__name__}")
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        if kind == "lark":
            text = grammar.get("grammar")
            if not isinstance(text, str) or not text.strip():
                raise UnsupportedGrammar("a lark grammar needs a non-empty 'grammar' string")
            return LLMatcher.grammar_from_lark(text)
        if kind == "regex":
            pat = grammar.get("pattern")
            if not isinstance(pat, str):
                raise UnsupportedGrammar("a regex grammar needs a 'pattern' string")
            return LLMatcher.grammar_from_regex(pat)
    except UnsupportedGrammar:
        raise
    except (ValueError, TypeError) as e:
        raise UnsupportedGrammar(f"invalid {kind} grammar: {e}") from None
    raise UnsupportedGrammar(
        f"unknown grammar type {kind!r} (expected json_schema, json_object, lark or regex)")


def _clean(msg: str) -> str:
    msg = msg.strip()
    for prefix in ("Error: ", "error: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


_valid_lock = threading.Lock()
_valid: dict[tuple[int, str], None] = {}  # (id(tokenizer), grammar string) known to compile
_VALID_MAX = 256


def validate(grammar: dict, tokenizer) -> None:
    """Compile the grammar against the tokenizer; raise UnsupportedGrammar saying why it
    cannot be enforced. Rank 0 calls this before submitting (the API adapters, and again
    Engine.submit: grammars that compiled are remembered, so the second check is free)."""
    text = compile_grammar(grammar)
    key = (id(tokenizer), text)
    if key in _valid:
        return
    _validate(grammar, text, tokenizer)
    with _valid_lock:
        if len(_valid) >= _VALID_MAX:
            _valid.clear()
        _valid[key] = None


def _validate(grammar: dict, text: str, tokenizer) -> None:
    from llguidance import LLMatcher

    llg = llg_tokenizer(tokenizer)
    err = LLMatcher.validate_grammar(text, llg)
    if err and not err.startswith("WARNING"):
        what = {"json_schema": "the JSON schema", "json_object": "the JSON object grammar",
                "lark": "the lark grammar", "regex": "the regex"}.get(grammar.get("type"), "the grammar")
        raise UnsupportedGrammar(f"{what} cannot be enforced: {_clean(err)}")
    m = LLMatcher(llg, text, log_level=0)
    if m.is_error():
        raise UnsupportedGrammar(f"the grammar cannot be enforced: {_clean(m.get_error())}")


# ------------------------------------------------------------------------------------------------
# the per-request logits processor
# ------------------------------------------------------------------------------------------------


class GrammarProcessor:
    """mlx-lm logits processor: `proc(tokens_context, logits) -> logits`.

    mlx-lm's GenerationBatch calls it once per decode step with the token context whose last
    element is the token being fed: on the first call that is the prompt's last token (nothing
    generated yet), afterwards it is the token sampled at the previous step. So the first call
    only computes the mask; each later call first consumes context[-1]."""

    def __init__(self, grammar: dict, tokenizer):
        from llguidance import LLMatcher

        self.llg = llg_tokenizer(tokenizer)
        self.matcher = LLMatcher(self.llg, compile_grammar(grammar), log_level=0)
        if self.matcher.is_error():  # validate() on rank 0 refuses these before submission
            raise UnsupportedGrammar(_clean(self.matcher.get_error()))
        self.n_llg = int(self.llg.vocab_size)
        self.eos = _eos_ids(tokenizer) or [int(self.llg.eos_token)]
        self.bitmask = np.full((1, (self.n_llg + 31) // 32), -1, dtype=np.int32)
        self._bytes = self.bitmask.view(np.uint8).reshape(-1)
        self.allowed: np.ndarray | None = None  # bool[vocab of the logits], allocated on first call
        self.started = False
        self.consumed = 0
        self.error: str | None = None

    def _advance(self, token: int) -> None:
        m = self.matcher
        if self.error is not None:
            return
        if m.is_stopped():
            return  # finished: only EOS was allowed; nothing more to consume
        if token in self.eos and m.is_accepting():
            return
        if not m.consume_token(token):
            self.error = _clean(m.get_error()) or f"token {token} rejected"
        else:
            self.consumed += 1

    def mask(self, vocab: int) -> np.ndarray:
        """The allowed-token mask (bool[vocab]) for the next token."""
        if self.allowed is None or self.allowed.shape[0] != vocab:
            self.allowed = np.zeros(vocab, dtype=np.bool_)
        out = self.allowed
        m = self.matcher
        if self.error is not None or m.is_stopped() or m.is_error():
            out[:] = False
            for e in self.eos:
                if e < vocab:
                    out[e] = True
            return out
        m.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        n = min(vocab, self.n_llg)
        out[:n] = np.unpackbits(self._bytes, count=n, bitorder="little").view(np.bool_)
        if vocab > n:
            out[n:] = False
        if m.is_accepting():
            for e in self.eos:
                if e < vocab:
                    out[e] = True
        if not out.any():  # cannot happen for a valid grammar; never leave nothing to sample
            for e in self.eos:
                if e < vocab:
                    out[e] = True
        return out

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            self._advance(int(tokens[-1].item()))
        self.started = True
        allowed = mx.array(self.mask(logits.shape[-1]))
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


def logits_processor(grammar: dict, tokenizer) -> GrammarProcessor:
    """A fresh processor for one request (every rank builds its own from the same dict)."""
    return GrammarProcessor(grammar, tokenizer)
