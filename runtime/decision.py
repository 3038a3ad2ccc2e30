"""The step decision: what rank 0 tells every rank the next step computes.

It is the data plane's one rank-to-rank message besides mx.distributed's collectives (see the
lock-step contract in runtime/engine.py), so it is typed, versioned, and encoded and decoded only
here; runtime/control.py frames the bytes. Bump VERSION when a field changes meaning: a rank that
speaks another version is refused at the control channel's hello instead of computing garbage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# 2: prefix cache (Insert.cached/entry, keep, evict), prefill chunk; 3: run (step leases);
# 4: min_p, logit_bias and the penalties
VERSION = 4


class VersionMismatch(ValueError):
    """A peer runs an exolaunch whose step messages differ from ours."""


@dataclass
class Insert:
    """A request joining the batch, with everything a rank needs to sample it identically."""

    tokens: list[int]  # the prompt tokens to prefill: those after the reused prefix
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    eos: bool  # stop at the tokenizer's end-of-sequence tokens
    grammar: dict | None = None  # constrained decoding (runtime/constrain.py)
    entry: int = -1  # prefix cache entry whose first `cached` tokens' KV this request reuses
    cached: int = 0
    min_p: float = 0.0
    logit_bias: list[list] | None = None  # [[token id, bias], ...]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    penalty_window: int = 0  # runtime/sampling.py: 0 OpenAI's convention, N the last N tokens
    penalty_prompt: list[int] | None = None  # the prompt's tokens the penalties count (sampling.py)


@dataclass
class StepDecision:
    inserts: list[Insert] = field(default_factory=list)
    removes: list[int] = field(default_factory=list)  # BatchGenerator uids, in order
    step: bool = False  # run batched forwards: `run` of them before the next decision
    stop: bool = False  # shut down after applying this decision
    # The prefix cache (runtime/prefix_cache.py), applied before removes and inserts: keep
    # [uid, entry id, tokens] stores the first `tokens` of a finished or leaving sequence's KV
    # as that entry; evict drops entries.
    keep: list[list[int]] = field(default_factory=list)
    evict: list[int] = field(default_factory=list)
    prefill: int = 0  # prompt tokens per sequence this step prefills (0: as before)
    # Steps every rank runs on this decision before reading the next (a lease): while nothing
    # changes, followers run on without a message per step (runtime/engine.py).
    run: int = 1
    version: int = VERSION

    @property
    def steps(self) -> int:
        return self.run if self.step and not self.stop else 0

    def encode(self) -> bytes:
        return json.dumps({"v": self.version, "ins": [vars(i) for i in self.inserts], "rm": self.removes,
                           "step": self.step, "stop": self.stop, "keep": self.keep, "evict": self.evict,
                           "prefill": self.prefill, "run": self.run}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "StepDecision":
        msg = json.loads(data)
        check_version(msg.get("v"))
        try:
            inserts = [Insert(**i) for i in msg["ins"]]
            return cls(inserts, list(msg["rm"]), bool(msg["step"]), bool(msg["stop"]),
                       [list(k) for k in msg["keep"]], list(msg["evict"]), int(msg["prefill"]), int(msg["run"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed step decision ({type(e).__name__}: {e})") from None


def check_version(version) -> None:
    if version != VERSION:
        raise VersionMismatch(f"step message version {version!r}, this rank speaks {VERSION}: "
                              "install the same exolaunch version on every host (`exolaunch doctor` checks)")
