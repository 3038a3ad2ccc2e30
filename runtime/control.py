"""The step channel: rank 0 tells every other rank what the next step computes.

Plain TCP, length-prefixed frames, separate from mx.distributed on purpose:
- ranks waiting for work block in recv() and use no CPU (a rank waiting inside an mlx
  collective busy-polls: 50-95% of a core on ring and MPI);
- no collective is ever issued outside the generation stream's forward passes, so nothing
  races the async forward (collectives issued on two streams are not ordered against each
  other: a control all_sum during an async forward returned garbage, silently);
- rank 0 learns at once when a peer's process dies (its connection closes), even while its
  own thread is blocked in a collective, and can fail in-flight requests promptly.

Only the job's ranks get in. The launcher gives every rank a random per-job secret in the
environment (contract.ENV_JOB_SECRET, never on a command line), and each connection proves it
both ways with an HMAC over nonces fresh for that connection:

    rank 0 -> peer    {"nonce": N0}
    peer   -> rank 0  {"rank", "version", "nonce": N1, "mac": HMAC(hello N0 N1 rank version)}
    rank 0 -> peer    {"mac": HMAC(welcome N1 N0 rank)}, or {"error": why} to a rank it refuses

A hello recorded on one connection proves nothing on another, whose N0 differs. Rank 0 runs each
pending handshake on its own thread with its own deadline, so garbage, silence or a bad MAC only
drops that connection; a duplicate rank is refused (and exits non-zero); frames from peers are
capped in size. After the handshake a follower sends its step stats every second ({"stats"})
and at most one error report ({"error"}), and rank 0 sends encoded step decisions
(runtime/decision.py), which this module frames without reading.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Callable

from runtime.contract import ENV_JOB_SECRET
from runtime.decision import VERSION, check_version

log = logging.getLogger("exolaunch.control")

_LEN = struct.Struct("!I")
HANDSHAKE_TIMEOUT = 10.0  # rank 0 drops a connection that has not proved the secret by then
MAX_PENDING = 64  # handshakes in progress at once; more connections are closed at once
MAX_PEER_FRAME = 64 << 10  # anything rank 0 reads from a peer: a hello, an error report
MAX_DECISION_FRAME = 1 << 30  # a step decision (a batch of prompts' token ids)


class ControlRefused(ConnectionError):
    """This rank could not join rank 0's control channel: refused, or the handshake failed."""


def job_secret() -> bytes:
    value = os.environ.get(ENV_JOB_SECRET)
    if not value:
        raise ControlRefused(f"{ENV_JOB_SECRET} is not set: start the ranks with exolaunch, which makes one "
                             "secret per job for the control channel")
    return value.encode()


def _mac(secret: bytes, *parts) -> str:
    return hmac.new(secret, "|".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


def _proves(mac, secret: bytes, *parts) -> bool:
    return hmac.compare_digest(str(mac).encode(), _mac(secret, *parts).encode())


def _frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def _send(sock: socket.socket, obj) -> None:
    sock.sendall(_frame(json.dumps(obj, separators=(",", ":")).encode()))


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the control handshake timed out")
            sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("control channel closed")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock: socket.socket, limit: int, deadline: float | None = None) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size, deadline))
    if n > limit:
        raise ValueError(f"a control frame of {n} bytes (the limit is {limit})")
    return _recv_exact(sock, n, deadline)


def _recv(sock: socket.socket, deadline: float | None = None) -> dict:
    msg = json.loads(_recv_frame(sock, MAX_PEER_FRAME, deadline))
    if not isinstance(msg, dict):
        raise ValueError("a control message that is not an object")
    return msg


def _nonce(msg: dict) -> str:
    n = msg.get("nonce")
    if not (isinstance(n, str) and len(n) == 32 and all(c in "0123456789abcdef" for c in n)):
        raise ValueError("no valid nonce")
    return n


class Leader:
    """Rank 0's end: admits one connection per other rank, then broadcasts step decisions."""

    def __init__(self, host: str, port: int, world: int, secret: bytes | None = None):
        self.world = world
        self.secret = job_secret() if secret is None else secret
        self.peers: dict[int, socket.socket] = {}
        self.hellos: dict[int, dict] = {}
        self.peer_stats: dict[int, dict] = {}  # rank -> its last runtime/stepstats.py snapshot
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.on_peer_lost: Callable[[int, dict], None] | None = None
        self.dropped = 0  # connections that did not prove the secret, or were refused
        self._lock = threading.Lock()
        self._pending = 0
        self._admitting = True
        self._closed = False
        self._fatal: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()  # a handshake ended, or close(): look again
        self._wake_w.setblocking(False)

    def accept_all(self, timeout: float) -> dict[int, dict]:
        """Admit every other rank (each connects once it has loaded its shard); its hello by rank.

        The port stays open afterwards, only to refuse: a rank that comes late (a duplicate, or
        one displaced by a process holding the secret) hears why and exits non-zero, instead of
        retrying a closed port until its own deadline."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                with self._lock:
                    if self._fatal:
                        raise RuntimeError(self._fatal)
                    if len(self.peers) == self.world - 1:
                        self._admitting = False
                        break
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, self.world)) - set(self.peers))
                    raise TimeoutError(f"ranks {missing} did not connect to the control channel within {timeout:g} s")
                self._accept_ready(left)
        except BaseException:
            with self._lock:
                self._admitting = False
            self.close()
            self._close_ports()
            raise
        threading.Thread(target=self._refuse_latecomers, daemon=True, name="exolaunch-control-listener").start()
        for rank, conn in self.peers.items():
            threading.Thread(target=self._watch, args=(rank, conn), daemon=True).start()
        return dict(self.hellos)

    def _accept_ready(self, timeout: float | None) -> None:
        ready, _, _ = select.select([self.listener, self._wake_r], [], [], timeout)
        if self._wake_r in ready:
            self._wake_r.recv(4096)
        if self.listener in ready:
            self._accept_one()

    def _refuse_latecomers(self) -> None:
        try:
            while not self._closed:
                self._accept_ready(None)
        except (OSError, ValueError):
            pass
        finally:
            self._close_ports()

    def _close_ports(self) -> None:
        for s in (self.listener, self._wake_r, self._wake_w):
            s.close()

    def _accept_one(self) -> None:
        try:
            conn, addr = self.listener.accept()
        except OSError:
            return
        with self._lock:
            full = self._pending >= MAX_PENDING
            self._pending += not full
        if full:
            conn.close()
            self._dropped(addr, f"{MAX_PENDING} handshakes already in progress")
            return
        threading.Thread(target=self._handshake, args=(conn, addr), daemon=True,
                         name="exolaunch-control-handshake").start()

    def _handshake(self, conn: socket.socket, addr) -> None:
        """One connection: admitted as a rank, refused with a reason (it proved the secret), or
        dropped (anything else), within HANDSHAKE_TIMEOUT and without touching the others."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        admitted = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(HANDSHAKE_TIMEOUT)
            n0 = os.urandom(16).hex()
            _send(conn, {"nonce": n0})
            hello = _recv(conn, deadline)
            rank, version, n1 = hello.get("rank"), hello.get("version"), _nonce(hello)
            if type(rank) is not int or not _proves(hello.get("mac"), self.secret, "hello", n0, n1, rank, version):
                raise ValueError("it did not prove the job secret")
            with self._lock:
                why = self._refusal(rank, version)
                if why is None:
                    _send(conn, {"mac": _mac(self.secret, "welcome", n1, n0, rank)})
                    conn.settimeout(None)  # from now on broadcast() may wait on a busy rank
                    self.peers[rank], self.hellos[rank] = conn, hello
                    admitted = True
            if why is not None:
                _send(conn, {"error": why})
                self._dropped(addr, why)
        except Exception as e:  # garbage, silence, a bad MAC, a closed connection: drop it
            self._dropped(addr, f"{type(e).__name__}: {e}")
        finally:
            if not admitted:
                conn.close()
            with self._lock:
                self._pending -= 1
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass

    def _refusal(self, rank: int, version) -> str | None:
        """Why an authenticated peer cannot join (called under the lock), or None."""
        if not 0 < rank < self.world:
            return f"rank {rank} is not a rank of this job ({self.world} ranks)"
        if rank in self.peers:
            return f"rank {rank} is already connected"
        if not self._admitting:
            return "the job has stopped admitting ranks"
        try:
            check_version(version)
        except ValueError as e:  # the job cannot run: rank 0 stops with this reason
            self._fatal = f"rank {rank}: {e}"
            return str(e)
        return None

    def _dropped(self, addr, why: str) -> None:
        self.dropped += 1
        log.warning("control channel: dropped a connection from %s:%s: %s", addr[0], addr[1], why)

    def _watch(self, rank: int, conn: socket.socket) -> None:
        """After hello a follower sends its step stats every second ({"stats"}: kept in
        `peer_stats` for /metrics), then an error report or nothing until it closes. Either way
        rank 0 hears about a dead or failing peer here."""
        while True:
            try:
                msg = _recv(conn)
            except (ConnectionError, OSError, ValueError):
                msg = {}
            if not isinstance(msg.get("stats"), dict):
                break
            self.peer_stats[rank] = {**msg["stats"], "received": time.monotonic()}
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
        self._closed = True
        try:
            self._wake_w.send(b"x")  # the listener thread ends and closes the port
        except OSError:
            pass
        for conn in self.peers.values():
            try:
                conn.close()
            except OSError:
                pass


class Follower:
    """Another rank's end: joins rank 0's channel (both prove the job secret), then receives."""

    def __init__(self, host: str, port: int, rank: int, timeout: float, secret: bytes | None = None):
        secret = job_secret() if secret is None else secret
        # One deadline for reaching rank 0 and for its answers: rank 0 may still be loading or
        # starting its API before it reads this connection, which is slowness, not hostility.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=5)
                if self.sock.getsockname() == self.sock.getpeername():
                    # Nothing listened yet and the kernel picked the port itself as the source
                    # (TCP simultaneous open): that would hold the port rank 0 is about to bind.
                    self.sock.close()
                    raise ConnectionRefusedError("connected to itself")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {rank}: could not reach rank 0's control channel at "
                                       f"{host}:{port} within {timeout:g} s") from None
                time.sleep(0.1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        where = f"rank 0's control channel at {host}:{port}"
        try:
            n0 = _nonce(_recv(self.sock, deadline))
            n1 = os.urandom(16).hex()
            _send(self.sock, {"rank": rank, "version": VERSION, "nonce": n1,
                              "mac": _mac(secret, "hello", n0, n1, rank, VERSION)})
            answer = _recv(self.sock, deadline)
        except Exception as e:  # noqa: BLE001 - whatever answered is not a rank 0 we can follow
            self.sock.close()
            raise ControlRefused(f"rank {rank}: the handshake with {where} failed ({type(e).__name__}: {e}); "
                                 "rank 0 ended, or the listener there is not this job's") from None
        if "error" in answer:
            self.sock.close()
            raise ControlRefused(f"rank {rank}: {where} refused this rank: {answer['error']}")
        if not _proves(answer.get("mac"), secret, "welcome", n1, n0, rank):
            self.sock.close()
            raise ControlRefused(f"rank {rank}: {where} did not prove this job's secret")
        self.sock.settimeout(None)
        self._send_lock = threading.Lock()  # the stats thread and report_error share the socket

    def recv(self) -> bytes:
        """The next encoded step decision (blocks, using no CPU, until rank 0 sends one)."""
        return _recv_frame(self.sock, MAX_DECISION_FRAME)

    def report_every(self, interval: float, snapshot: Callable[[], dict]) -> None:
        """Send snapshot() to rank 0 every `interval` seconds from a daemon thread, until the
        channel closes (what rank 0's /metrics shows for this rank)."""
        def loop() -> None:
            while True:
                try:
                    msg = {"stats": snapshot()}
                    with self._send_lock:
                        _send(self.sock, msg)
                except (OSError, ValueError, TypeError):
                    return
                time.sleep(interval)

        threading.Thread(target=loop, daemon=True, name="exolaunch-stats").start()

    def report_error(self, message: str) -> None:
        try:
            with self._send_lock:
                _send(self.sock, {"error": message[:MAX_PEER_FRAME // 8]})
        except OSError:
            pass
