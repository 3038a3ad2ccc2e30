"""`--draft MODEL`: a small model's greedy tokens as the speculative drafts that
runtime/speculative.py verifies in one forward of the served model.

Rank 0 alone holds the draft model (whole, not sharded) and runs it. Its drafts reach every rank
in one all_sum of a [1 + k] int32 vector (rank 0's count and tokens, zeros elsewhere): n-gram
lookup gives every rank the same tokens by itself, but a model's argmax can differ between
machines in a near tie, and ranks that verify different drafts run different collectives. Every
rank calls propose() at the same point with the same k (both come from the Speculator's state,
which is equal everywhere), so the collective's shape agrees.

The draft's KV cache follows the sequence it last drafted for: anything beyond the longest
common prefix with the tokens it is asked about now (rejected drafts, another sequence) is
trimmed, the rest is fed in chunks of CHUNK tokens.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

CHUNK = 512  # prompt tokens per draft forward: bounds the draft's activation memory


class DraftModel:
    """`propose(tokens, k)` on every rank: up to k greedy tokens of the draft model after
    `tokens`, the same list everywhere. `model` is None on the ranks other than 0."""

    def __init__(self, model, group=None, vocab_size: int | None = None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.model = model if self.rank == 0 else None
        self.vocab_size = vocab_size  # the served model's: a draft token beyond it ends the draft
        self.cache = None
        self.tokens: list[int] = []  # what self.cache holds
        if self.model is not None:
            self.cache = make_prompt_cache(self.model)
            if not can_trim_prompt_cache(self.cache):
                raise ValueError("--draft: the draft model's KV cache cannot take back rejected tokens "
                                 "(a sliding-window or recurrent model). Fix: a draft model with plain attention.")

    def propose(self, tokens: list[int], k: int) -> list[int]:
        draft = self._draft(tokens, k) if self.model is not None else []
        if self.group is None or self.group.size() == 1:
            return draft
        vec = np.zeros(k + 1, dtype=np.int32)
        if self.rank == 0:
            vec[0] = len(draft)
            vec[1:1 + len(draft)] = draft
        shared = np.array(mx.distributed.all_sum(mx.array(vec), group=self.group))
        return shared[1:1 + int(shared[0])].tolist()

    def _draft(self, tokens: list[int], k: int) -> list[int]:
        held = np.asarray(self.tokens[:len(tokens) - 1], dtype=np.int64)  # feed at least one token
        differ = np.flatnonzero(held != np.asarray(tokens[:len(held)], dtype=np.int64))
        common = int(differ[0]) if len(differ) else len(held)
        trim_prompt_cache(self.cache, len(self.tokens) - common)
        feed = tokens[common:]
        for start in range(0, len(feed), CHUNK):
            logits = self.model(mx.array([feed[start:start + CHUNK]]), cache=self.cache)
            if start + CHUNK < len(feed):
                mx.eval([c.state for c in self.cache])
        self.tokens = list(tokens)
        draft: list[int] = []
        while True:
            t = int(mx.argmax(logits[0, -1]).item())
            if self.vocab_size is not None and t >= self.vocab_size:
                break  # a padded row of a bigger embedding: no token the served model knows
            draft.append(t)
            if len(draft) == k:
                break
            logits = self.model(mx.array([[t]]), cache=self.cache)
            self.tokens.append(t)
        return draft


def load_draft(name: str, group, tokenizer, config: dict) -> DraftModel:
    """--draft NAME for the served model (`tokenizer`, `config`): the draft model loads whole on
    rank 0 only; the other ranks only join its collective. Its tokenizer must be the served
    model's, since token ids are what it proposes (ModelError otherwise)."""
    from runtime.contract import ModelError, resolve_model

    model = None
    if group.rank() == 0:
        from mlx_lm.utils import load as mlx_lm_load

        path, _ = resolve_model(name)
        model, draft_tokenizer = mlx_lm_load(str(path))
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"--draft {name}: its tokenizer differs from the served model's, so its token "
                             "ids mean other text. Fix: a draft model of the same family (same tokenizer).")
    return DraftModel(model, group, vocab_size=config.get("vocab_size"))
