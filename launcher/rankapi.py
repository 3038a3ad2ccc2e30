"""What a rank's program can tell exolaunch (through the agent's control pipe).

    from launcher.rankapi import ready
    group = mx.distributed.init(strict=True)
    ready()          # exolaunch --ready-timeout waits for this from every rank

Outside exolaunch these are no-ops, so scripts still run on their own.
"""

from __future__ import annotations

import os

from runtime.contract import ENV_CONTROL_FD


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

