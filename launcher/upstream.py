"""The front door's client for rank 0: plain HTTP/1.1 over asyncio streams, kept-alive.

Rank 0 is uvicorn on loopback or the cluster's LAN, so the proxy needs none of a general
client's features (TLS, redirects, decoding); what it needs is little work per streamed token.
Measured with a 2000-event SSE stream: httpx cost the proxy ~2x the CPU per event of this.

    resp = await pool.request("POST", host, port, "/v1/chat/completions", headers, body)
    resp.status, resp.headers; async for chunk in resp.chunks(): ...; await resp.release()
"""

from __future__ import annotations

import asyncio


class UpstreamError(OSError):
    """Rank 0 refused, reset or closed the connection before its response head."""


class Response:
    def __init__(self, pool: "Pool", key, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 status: int, headers: list[tuple[bytes, bytes]], bodiless: bool):
        self.pool, self.key, self.reader, self.writer = pool, key, reader, writer
        self.status, self.headers = status, headers
        lower = {k.lower(): v for k, v in headers}
        self.chunked = b"chunked" in lower.get(b"transfer-encoding", b"").lower()
        self.length = None if bodiless else (int(lower[b"content-length"]) if b"content-length" in lower else None)
        self.bodiless = bodiless or self.length == 0
        self.reusable = lower.get(b"connection", b"").lower() != b"close" and (self.chunked or self.length is not None
                                                                             or self.bodiless)
        self.done = self.bodiless

    async def chunks(self):
        """The body as it arrives (chunked framing removed, nothing decoded)."""
        r = self.reader
        if self.bodiless:
            return
        if self.chunked:
            while True:
                size = int((await r.readline()).split(b";", 1)[0], 16)
                if size == 0:
                    while (await r.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                data = await r.readexactly(size + 2)
                yield data[:-2]
        elif self.length is not None:
            left = self.length
            while left:
                data = await r.read(min(left, 65536))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                yield data
        else:  # until the server closes
            while data := await r.read(65536):
                yield data
        self.done = True

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def release(self) -> None:
        """Back to the pool when the body was read whole on a kept-alive connection, else closed
        (a client that left mid-stream: rank 0 sees the close and cancels the request)."""
        if self.done and self.reusable:
            self.pool.idle.setdefault(self.key, []).append((self.reader, self.writer))
        else:
            self.writer.close()


class Pool:
    def __init__(self, connect_timeout: float = 3.0):
        self.connect_timeout = connect_timeout
        self.idle: dict[tuple[str, int], list] = {}

    def forget_others(self, key) -> None:
        """Close kept-alive connections to a rank 0 that is no longer the upstream."""
        for k in [k for k in self.idle if k != key]:
            for _, w in self.idle.pop(k):
                w.close()

    async def request(self, method: str, host: str, port: int, target: str,
                      headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        key = (host, port)
        self.forget_others(key)
        head = [f"{method} {target} HTTP/1.1\r\nhost: {host}:{port}\r\n".encode("latin-1")]
        head += [k + b": " + v + b"\r\n" for k, v in headers]
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        data = b"".join(head) + body
        while True:
            reused = bool(self.idle.get(key))
            if reused:
                reader, writer = self.idle[key].pop()
            else:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                            self.connect_timeout)
                except (OSError, asyncio.TimeoutError) as e:
                    raise UpstreamError(f"cannot connect to {host}:{port}: {e or type(e).__name__}") from e
            try:
                writer.write(data)
                await writer.drain()
                line = await reader.readline()
                if not line:
                    raise ConnectionResetError("closed before answering")
                status = int(line.split(b" ", 2)[1])
                hdrs = []
                while (h := await reader.readline()) not in (b"\r\n", b"\n"):
                    if not h:
                        raise ConnectionResetError("closed in the response head")
                    k, _, v = h.partition(b":")
                    hdrs.append((k.strip(), v.strip()))
            except (OSError, ValueError, IndexError) as e:
                writer.close()
                if reused:  # a kept-alive connection the server had closed meanwhile: once more, fresh
                    continue
                raise UpstreamError(f"{host}:{port} did not answer: {e or type(e).__name__}") from e
            bodiless = method == "HEAD" or status in (204, 304) or 100 <= status < 200
            return Response(self, key, reader, writer, status, hdrs, bodiless)

    def close(self) -> None:
        self.forget_others(None)
