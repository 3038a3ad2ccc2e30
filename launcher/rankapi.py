"""What a rank's program can tell exolaunch (through the agent's control pipe).

    from launcher.rankapi import ready
    group = mx.distributed.init(strict=True)
    ready()          # exolaunch --ready-timeout waits for this from every rank

Outside exolaunch these are no-ops, so scripts still run on their own.
"""

from __future__ import annotations

import os


def _send(word: str) -> None:
    fd = os.environ.get("EXOLAUNCH_CONTROL_FD")
    if not fd:
        return
    try:
        os.write(int(fd), (word + "\n").encode())
    except (OSError, ValueError):
        pass


def ready() -> None:
    """This rank is up: distributed init finished and it can do its work."""
    _send("ready")


def rank() -> int:
    return int(os.environ.get("EXOLAUNCH_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("EXOLAUNCH_WORLD_SIZE", "1"))
