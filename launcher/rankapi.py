"""What a rank's program can tell exolaunch (through the agent's control pipe).

    from launcher.rankapi import phase, ready
    group = mx.distributed.init(strict=True)
    phase("up")      # optional milestones: `run` prints when every rank reached each
    ready()          # exolaunch --ready-timeout waits for this from every rank

Outside exolaunch these are no-ops, so scripts still run on their own.
"""

from __future__ import annotations

import os

from runtime.contract import ENV_CONTROL_FD

# A milestone travels as the word "phase:NAME"; the agent passes it on as an event of that
# name (launcher/agent.py) and run's timeline (launcher/timeline.py) shows when the last rank
# reached it. The names the runtime reports, in the order it reaches them:
PHASE_PREFIX = "phase:"
PHASES = ("up", "weights", "warm")  # group formed, shard loaded, first request's costs paid


def _send(word: str) -> None:
    fd = os.environ.get(ENV_CONTROL_FD)
    if not fd:
        return
    try:
        os.write(int(fd), (word + "\n").encode())
    except (OSError, ValueError):
        pass


def ready() -> None:
    """This rank is up: distributed init finished and it can do its work."""
    _send("ready")


def phase(name: str) -> None:
    """This rank reached milestone `name` (one word, e.g. one of PHASES)."""
    if name and not any(c.isspace() for c in name):
        _send(PHASE_PREFIX + name)
