"""Emulated links between two ranks: network namespaces, tbf rate limits, a delaying TCP relay.

This kernel has no netem, so the one-way delay is added in user space: every rank-to-rank TCP
connection goes through `DelayRelay`, which holds each chunk until `delay` after it arrived
(order kept, TCP_NODELAY on both legs). tc's tbf limits the rate on the veths.

Layout (`EmulatedLink`; addresses exist only inside the namespaces made here):

    ns0 (rank 0)                  nsR (relay)                    ns1 (rank 1)
    X0 10.250.0.1 (listens)       X1 on r0, X0 on r1             X1 10.250.0.2 (listens)
    S0 10.250.0.11 (source) a0 ==== r0          r1 ==== a1 S1 10.250.0.12 (source)

Rank 0 reaches X1 over a0 and lands on the relay in nsR (X1 is local there); the relay opens
the other leg with a socket created *inside ns1* to X1 (local in ns1), so the rank's address in
the hostfile is the one it binds and the one its peer dials, and every rank->rank byte crosses
one rate-limited veth and the relay's delay. The same for rank 1 -> X0. Separate source
addresses (S0, S1) keep replies from looping back inside nsR, which holds X0 and X1 itself.

Only `ip` (iproute2) and `tc` are needed; the caller must be allowed to create namespaces
(root). `netns_unavailable()` says why not, for skips. Everything is removed in `close()`.

`python -m tests.netem rank-exec CMD...` is the per-rank wrapper: it enters the namespace
named by EXOLAUNCH_NETEM_NS (comma-separated, indexed by MLX_RANK) and execs CMD.
"""

from __future__ import annotations

import collections
import ctypes
import os
import secrets
import socket
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
X0, X1 = "10.250.0.1", "10.250.0.2"
S0, S1 = "10.250.0.11", "10.250.0.12"

_libc = ctypes.CDLL(None, use_errno=True)
_ns_lock = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def socket_in(ns: str | None, family=socket.AF_INET, type=socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside network namespace `ns` (None: this thread's own). A socket keeps
    the namespace it was made in, so only creation needs the switch (setns is per thread)."""
    if ns is None:
        return socket.socket(family, type)
    with _ns_lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                return socket.socket(family, type)
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _run(ns: str, *args: str) -> None:
    p = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} in {ns}: {(p.stderr or p.stdout).strip()}")


def netns_unavailable() -> str | None:
    """None if this process may create network namespaces and veths; else the reason why not."""
    if sys.platform != "linux":
        return f"network namespaces are Linux-only (this is {sys.platform})"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"`{tool}` (iproute2) is not installed"
    name = "enprobe" + secrets.token_hex(3)
    try:
        p = _ip("netns", "add", name, check=False)
        if p.returncode != 0:
            return f"`ip netns add` is not permitted here: {p.stderr.strip() or p.returncode}"
        p = _ip("link", "add", f"v{name[-6:]}a", "type", "veth", "peer", "name", f"v{name[-6:]}b",
                "netns", name, check=False)
        if p.returncode != 0:
            return f"cannot create a veth pair: {p.stderr.strip()}"
        _ip("link", "del", f"v{name[-6:]}a", check=False)
    finally:
        _ip("netns", "del", name, check=False)
    return None


# ----------------------------------------------------------------------------- the relay


class DelayRelay:
    """TCP relay: accepts on (listen_ns, addr, port) and connects to (target_ns, addr, port),
    forwarding both directions with a fixed one-way `delay` (seconds) per chunk."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self._listeners: list[socket.socket] = []
        self._socks: list[socket.socket] = []
        self._closed = threading.Event()
        self.errors: list[str] = []

    def add_route(self, listen_ns: str | None, listen: tuple[str, int], target_ns: str | None,
                  target: tuple[str, int]) -> None:
        s = socket_in(listen_ns)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(listen)
        s.listen(16)
        self._listeners.append(s)
        threading.Thread(target=self._accept_loop, args=(s, target_ns, target), daemon=True,
                         name=f"relay-accept-{listen[1]}").start()

    def _accept_loop(self, ls: socket.socket, target_ns, target) -> None:
        while not self._closed.is_set():
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(c, target_ns, target), daemon=True).start()

    def _connect(self, c: socket.socket, target_ns, target) -> None:
        # The client already counts as connected; if the target is not listening yet (ranks
        # start in any order) keep trying, as mlx's ring does itself.
        deadline = time.monotonic() + 120
        while True:
            t = socket_in(target_ns)
            try:
                t.connect(target)
                break
            except OSError as e:
                t.close()
                if self._closed.is_set() or time.monotonic() > deadline:
                    self.errors.append(f"connect {target}: {e}")
                    c.close()
                    return
                time.sleep(0.05)
        for s in (c, t):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks.append(s)
        for a, b in ((c, t), (t, c)):
            if self.delay > 0:
                q: collections.deque = collections.deque()
                cv = threading.Condition()
                threading.Thread(target=self._reader, args=(a, b, q, cv), daemon=True).start()
                threading.Thread(target=self._writer, args=(a, b, q, cv), daemon=True).start()
            else:
                threading.Thread(target=self._direct, args=(a, b), daemon=True).start()

    def _direct(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 20):
                b.sendall(data)
        except OSError:
            pass
        self._half_close(b)

    def _reader(self, a, b, q, cv) -> None:
        try:
            while True:
                data = a.recv(1 << 20)
                with cv:
                    q.append((time.perf_counter() + self.delay, data))
                    cv.notify()
                if not data:
                    return
        except OSError:
            with cv:
                q.append((0.0, b""))
                cv.notify()

    def _writer(self, a, b, q, cv) -> None:
        while True:
            with cv:
                while not q:
                    cv.wait()
                due, data = q.popleft()
            if not data:
                self._half_close(b)
                return
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                b.sendall(data)
            except OSError:
                return

    @staticmethod
    def _half_close(s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._closed.set()
        for s in self._listeners + self._socks:
            try:
                s.close()
            except OSError:
                pass


# ----------------------------------------------------------------------------- the link


class EmulatedLink:
    """Two rank namespaces joined through a relay namespace: one-way `delay_us` added by the
    relay on every connection to the given ports, `rate_mbit` (tbf, both directions) on each veth.
    Use as a context manager; `ns` is [rank 0's namespace, rank 1's]."""

    def __init__(self, *, delay_us: float = 0.0, rate_mbit: float | None = None,
                 ports0: list[int] = (), ports1: list[int] = ()):
        self.delay_us, self.rate_mbit = delay_us, rate_mbit
        self.ports0, self.ports1 = list(ports0), list(ports1)
        tag = secrets.token_hex(3)
        self.nsr, self.ns = f"enr{tag}", [f"en0{tag}", f"en1{tag}"]
        self._veths = [(f"v{tag}a0", f"v{tag}r0"), (f"v{tag}a1", f"v{tag}r1")]
        self.addrs = [X0, X1]
        self.relay: DelayRelay | None = None
        self._made: list[str] = []

    def __enter__(self) -> "EmulatedLink":
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _setup(self) -> None:
        for ns in (self.nsr, *self.ns):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, (a, r) in enumerate(self._veths):
            _ip("link", "add", a, "netns", self.ns[i], "type", "veth", "peer", "name", r, "netns", self.nsr)
            _ip("-n", self.ns[i], "link", "set", a, "up")
            _ip("-n", self.nsr, "link", "set", r, "up")
        (a0, r0), (a1, r1) = self._veths
        ns0, ns1, nsr = self.ns[0], self.ns[1], self.nsr
        for ns, dev, own, src, peer in ((ns0, a0, X0, S0, X1), (ns1, a1, X1, S1, X0)):
            _ip("-n", ns, "addr", "add", f"{own}/32", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{src}/32", "dev", dev)
            _ip("-n", ns, "route", "add", f"{peer}/32", "dev", dev, "src", src)
        for dev, local, src in ((r0, X1, S0), (r1, X0, S1)):
            _ip("-n", nsr, "addr", "add", f"{local}/32", "dev", dev)
            _ip("-n", nsr, "route", "add", f"{src}/32", "dev", dev)
        if self.rate_mbit:
            rate_bps = self.rate_mbit * 1e6
            burst = max(int(rate_bps / 8 / 250), 32 * 1024)  # at least 4 ms of traffic per burst
            for ns, dev in ((ns0, a0), (nsr, r0), (ns1, a1), (nsr, r1)):
                _run(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate_bps)}bit",
                     "burst", str(burst), "latency", "50ms")
        self.relay = DelayRelay(self.delay_us * 1e-6)
        for p in self.ports0:
            self.relay.add_route(nsr, (X0, p), ns0, (X0, p))
        for p in self.ports1:
            self.relay.add_route(nsr, (X1, p), ns1, (X1, p))

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        for ns in reversed(self._made):  # deleting a namespace deletes its veths (and their peers)
            _ip("netns", "del", ns, check=False)
        self._made = []


# ----------------------------------------------------------------------------- measurements


def echo_server(ns: str | None, addr: tuple[str, int]) -> socket.socket:
    """Echo every byte back, one thread per connection, inside namespace `ns`."""
    ls = socket_in(ns)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(addr)
    ls.listen(4)

    def serve(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with c:
            try:
                while data := c.recv(1 << 20):
                    c.sendall(data)
            except OSError:
                pass

    def accept():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return ls


def rtt_us(ns: str | None, addr: tuple[str, int], n: int = 50) -> float:
    """Median round trip of a 64-byte message over a fresh connection to an echo server."""
    s = socket_in(ns)
    s.settimeout(30)
    s.connect(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    with s:
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(s.recv(64 - got))
            out.append((time.perf_counter() - t) * 1e6)
    out.sort()
    return out[len(out) // 2]


def sink_server(ns: str | None, addr: tuple[str, int]) -> socket.socket:
    """Read everything, then answer one byte (so the sender knows it all arrived)."""
    ls = socket_in(ns)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(addr)
    ls.listen(4)

    def serve(c):
        with c:
            try:
                need = int.from_bytes(c.recv(8, socket.MSG_WAITALL), "big")
                while need > 0:
                    data = c.recv(min(need, 1 << 20))
                    if not data:
                        return
                    need -= len(data)
                c.sendall(b"k")
            except OSError:
                pass

    def accept():
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return ls


def throughput_mbit(ns: str | None, addr: tuple[str, int], nbytes: int) -> float:
    """Send `nbytes` to a sink server and wait for its acknowledgement; Mbit/s."""
    s = socket_in(ns)
    s.settimeout(60)
    s.connect(addr)
    with s:
        t = time.perf_counter()
        s.sendall(nbytes.to_bytes(8, "big"))
        chunk = b"\0" * (1 << 16)
        left = nbytes
        while left > 0:
            s.sendall(chunk[:left])
            left -= min(left, len(chunk))
        s.recv(1)
        return nbytes * 8 / (time.perf_counter() - t) / 1e6


def rank_exec(argv: list[str]) -> None:
    """Enter this rank's namespace (EXOLAUNCH_NETEM_NS[MLX_RANK]) and exec argv."""
    names = [n for n in os.environ.get("EXOLAUNCH_NETEM_NS", "").split(",") if n]
    rank = int(os.environ.get("MLX_RANK", os.environ.get("EXOLAUNCH_RANK", "0")))
    if names:
        fd = os.open(f"/var/run/netns/{names[rank]}", os.O_RDONLY)
        _setns(fd)
        os.close(fd)
    if argv and argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "rank-exec":
        rank_exec(sys.argv[2:])
    sys.exit("usage: python -m tests.netem rank-exec CMD [ARGS...]")
