"""Free loopback ports for clusters a job starts itself (batch, bench, the anchor)."""

from __future__ import annotations

import random
import socket

from launcher.errors import LaunchError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """A first port such that n consecutive ports are free on loopback right now."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise LaunchError(f"anchor: found no {n} consecutive free ports. Fix: pass data_port.")
