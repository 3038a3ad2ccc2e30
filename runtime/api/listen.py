"""The listening socket rank 0's API and the launcher's front door serve from.

Bound before uvicorn starts, so a port in use raises OSError in the caller (uvicorn itself would
sys.exit) and port 0 picks a free port. Its own module: the front door binds its public port
before the ranks start, and importing the API server for it cost the launch half a second.
"""

from __future__ import annotations

import contextlib
import socket


def listen(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    err: OSError | None = None
    for family, socktype, proto, _, addr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(2048)
            sock.setblocking(False)
            sock.set_inheritable(True)
            return sock
        except OSError as e:
            sock.close()
            err = e
    raise OSError(f"cannot listen on {host}:{port}: {err}") from err
