"""Free loopback ports for clusters on this machine (`run` with every rank local, batch, bench,
the anchor)."""

from __future__ import annotations

import random
import socket

from launcher.errors import LaunchError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(n: int) -> int:
    """A first port such that n consecutive ports are free on loopback right now.

    Drawn from below the ephemeral ranges (Linux 32768-60999, macOS 49152-65535): no connect()
    on this machine gets one as its source port, so a rank retrying to reach one before it
    listens cannot end up connected to itself and holding the port."""
    for _ in range(200):
        base = random.randint(20000, 32768 - n)
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
    raise LaunchError(f"found no {n} consecutive free ports on loopback. Fix: pass --data-port.")


def free_data_port(listeners: int) -> int:
    """A data port for a cluster on this machine: it, the control port just below it and the
    ports above it that the ranks listen on (`listeners` in all) are free right now."""
    return free_port_run(listeners + 1) + 1
