"""The step channel: rank 0 tells every other rank what the next step computes.

Plain TCP, length-prefixed frames, separate from mx.distributed on purpose:
- ranks waiting for work block in recv() and use no CPU (a rank waiting inside an mlx
  collective busy-polls: 50-95% of a core on ring and MPI);
- no collective is ever issued outside the generation stream's forward passes, so nothing
  races the async forward (collectives issued on two streams are not ordered against each
  other: a control all_sum during an async forward returned garbage, silently);
- rank 0 learns at once when a peer's process dies (its connection closes), even while its
  own thread is blocked in a collective, and can fail in-flight requests promptly.

Frames: a follower's hello ({"rank", "version"}) and error report ({"error"}) are small JSON
objects; after the hello, rank 0 sends encoded step decisions (runtime/decision.py), which this
module frames without reading.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Callable

from runtime.decision import VERSION, check_version

_LEN = struct.Struct("!I")


def _frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def _send(sock: socket.socket, obj) -> None:
    sock.sendall(_frame(json.dumps(obj, separators=(",", ":")).encode()))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("control channel closed")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return _recv_exact(sock, n)


def _recv(sock: socket.socket):
    return json.loads(_recv_frame(sock))


class Leader:
    """Rank 0's end: accepts one connection per other rank, then broadcasts step decisions."""

    def __init__(self, host: str, port: int, world: int):
        self.world = world
        self.peers: dict[int, socket.socket] = {}
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.on_peer_lost: Callable[[int, dict], None] | None = None

    def accept_all(self, timeout: float) -> dict[int, dict]:
        """Wait for every other rank's hello (sent once it has loaded its shard)."""
        hellos: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(hellos) < self.world - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, self.world)) - set(hellos))
                raise TimeoutError(f"ranks {missing} did not connect to the control channel within {timeout:g} s")
            self.listener.settimeout(left)
            conn, _ = self.listener.accept()
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = _recv(conn)
            if hello.get("rank") in hellos or not 0 < hello.get("rank", -1) < self.world:
                conn.close()
                continue
            try:
                check_version(hello.get("version"))
            except ValueError as e:
                conn.close()
                raise RuntimeError(f"rank {hello['rank']}: {e}") from None
            hellos[hello["rank"]] = hello
            self.peers[hello["rank"]] = conn
        self.listener.close()
        for rank, conn in self.peers.items():
            threading.Thread(target=self._watch, args=(rank, conn), daemon=True).start()
        return hellos

    def _watch(self, rank: int, conn: socket.socket) -> None:
        """Followers send only two things after hello: an error report, or nothing until they
        close. Either way rank 0 hears about a dead or failing peer here."""
        try:
            msg = _recv(conn)
        except (ConnectionError, OSError, ValueError):
            msg = {}
        if self.on_peer_lost:
            self.on_peer_lost(rank, msg)

    def broadcast(self, data: bytes) -> None:
        """Send one encoded step decision to every follower."""
        frame = _frame(data)
        for rank, conn in self.peers.items():
            try:
                conn.sendall(frame)
            except OSError as e:
                raise ConnectionError(f"rank {rank} is gone ({e})") from None

    def close(self) -> None:
        for conn in self.peers.values():
            try:
                conn.close()
            except OSError:
                pass


class Follower:
    def __init__(self, host: str, port: int, rank: int, timeout: float, hello: dict | None = None):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {rank}: could not reach rank 0's control channel at "
                                       f"{host}:{port} within {timeout:g} s") from None
                time.sleep(0.1)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _send(self.sock, {"rank": rank, "version": VERSION, **(hello or {})})

    def recv(self) -> bytes:
        """The next encoded step decision (blocks, using no CPU, until rank 0 sends one)."""
        return _recv_frame(self.sock)

    def report_error(self, message: str) -> None:
        try:
            _send(self.sock, {"error": message})
        except OSError:
            pass
