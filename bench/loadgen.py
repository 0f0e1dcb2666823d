"""Load-generator worker: opens many authenticated WebSockets and measures every frame.

Run by ``bench/run.py`` (several of these processes share the sockets of one scenario);
it reads one JSON command per line on stdin and answers one JSON line on stdout:

- ``{"cmd": "connect", "port", "path", "tokens", "concurrency", "wait_hello", "deflate"}``: open one
  socket per token, at most ``concurrency`` handshakes at a time; answers how many opened,
  how many failed (and why), and how long it took. With ``wait_hello`` a socket counts as
  connected once the server's first frame arrived (the product sends ``hello`` after
  authenticating: that is an *authenticated* connect). Each client keeps its ``hello``'s
  ``cursor`` and ``epoch`` (the first frame's JSON is parsed, once per socket);
- ``{"cmd": "resume", "port", "path", "concurrency", "timeout", "subprotocol"}``: a resume storm.
  Abort every open socket at once (no close frame: as a deploy or a network cut drops them),
  then reconnect each client with ``path?since=<its hello cursor as stream:offset pairs>&epoch=
  <its hello epoch>`` (docs/protocol.md, "Resuming"), at most ``concurrency`` handshakes at a
  time. A resume is done when its ``resumed`` frame arrived (after ``hello`` and any replayed
  notifications); answers how many resumed, how many with ``"recovered": true`` (and the
  reasons of the others), the notifications replayed, the failures by kind, the elapsed time
  and the p50/p99 from the TCP connect to ``resumed``;
- ``{"cmd": "reset"}``: zero the counters (start of a measurement);
- ``{"cmd": "stats"}``: frames received, their latency histogram, close codes;
- ``{"cmd": "close"}``: close every socket and exit.

The client is a small ``asyncio.Protocol`` WebSocket client rather than the ``websockets``
library's: it does the real handshake (``Authorization: Bearer``, ``Sec-WebSocket-Key``
checked against ``Sec-WebSocket-Accept``, the ``notifications.v2`` subprotocol), answers
pings, records close codes, and parses server frames in one pass over each read, so it
spends less than half the CPU per frame of the ``websockets`` library's client (9 against 21 µs, measured in
docs/performance.md). It shares the machine's cores with the server, so it must be cheap.

Latency: every measured frame carries ``"ts": <unix time>`` in its ``data`` (the sender
puts the time the send was *scheduled* at, so a late sender counts against the system: no
coordinated omission); latency is the wall clock at the read minus ``ts``.
"""

import asyncio
import base64
import hashlib
import json
import math
import os
import resource
import struct
import sys
import time
import zlib
from urllib.parse import quote

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TS_MARK = b'"ts":'
BUCKETS_PER_E = 100  # latency histogram: log-spaced buckets 1% apart, in microseconds


def bucket(latency_s: float) -> int:
    us = latency_s * 1e6
    return int(math.log(us) * BUCKETS_PER_E) if us > 1 else 0


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.frames = 0  # measured frames (with a "ts")
        self.other = 0  # any other frame (hello, resumed, ...)
        self.hist: dict[int, int] = {}
        self.max_latency = 0.0
        self.first_recv = None
        self.last_recv = None
        self.cpu0 = time.process_time()


STATS = Stats()


class Client(asyncio.Protocol):
    __slots__ = ("transport", "key", "token", "path", "host", "subprotocol", "opened", "buf", "count", "closed",
                 "close_code", "handshake", "first_frame", "error", "deflate", "inflater", "expect_hello",
                 "cursor", "epoch", "resumed")

    def __init__(self, token: str, host: str, path: str, subprotocol: str | None, deflate: bool = False):
        self.token, self.host, self.path, self.subprotocol = token, host, path, subprotocol
        self.deflate = deflate  # offer permessage-deflate (as browsers do)
        self.inflater = None
        self.expect_hello = False
        self.cursor = None  # hello's cursor {stream: offset} and epoch (for a resume)
        self.epoch = None
        self.resumed = None  # a future for the `resumed` frame, when this socket resumes
        self.key = base64.b64encode(os.urandom(16))
        self.opened = False
        self.buf = b""
        self.count = 0
        self.closed = False
        self.close_code = None
        self.error = None
        self.transport = None
        loop = asyncio.get_running_loop()
        self.handshake = loop.create_future()  # 101 received
        self.first_frame = loop.create_future()  # first server frame (hello) received

    def connection_made(self, transport):
        self.transport = transport
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key.decode()}",
            "Sec-WebSocket-Version: 13",
            f"Authorization: Bearer {self.token}",
        ]
        if self.subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {self.subprotocol}")
        if self.deflate:
            lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes):
        if not self.opened:
            data = self._handshake(data)
            if not data:
                return
        buf = self.buf + data if self.buf else data
        n = len(buf)
        pos = 0
        now = None
        stats = STATS
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            end = pos + head + length
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode == 1 or opcode == 2:
                src, start, stop = buf, pos + head, end
                if b0 & 0x40 and self.inflater is not None:  # RSV1: a compressed message
                    src = self.inflater.decompress(buf[start:end] + b"\x00\x00\xff\xff")
                    start, stop = 0, len(src)
                i = src.find(TS_MARK, start, stop)
                if i >= 0:
                    j = i + 5
                    k = src.find(b",", j, stop)
                    k2 = src.find(b"}", j, stop)
                    if k < 0 or (0 <= k2 < k):
                        k = k2
                    if now is None:
                        now = time.time()
                    latency = now - float(src[j:k])
                    stats.frames += 1
                    self.count += 1
                    b = bucket(latency)
                    stats.hist[b] = stats.hist.get(b, 0) + 1
                    if latency > stats.max_latency:
                        stats.max_latency = latency
                    if stats.first_recv is None:
                        stats.first_recv = now
                    stats.last_recv = now
                else:
                    stats.other += 1
                    resumed = self.resumed
                    if resumed is not None and not resumed.done() and src.startswith(b'{"type":"resumed"', start):
                        resumed.set_result(json.loads(src[start:stop]))
                if not self.first_frame.done():
                    if self.expect_hello and src.find(b'"type":"hello"', start, stop) < 0:
                        # An error frame (refused handshake) instead of hello: not an authenticated connect.
                        self.first_frame.set_exception(ConnectionError(bytes(src[start:stop][:80]).decode()))
                        self.first_frame.exception()
                    else:
                        if self.expect_hello:  # once per socket: where a resume would start from
                            hello = json.loads(src[start:stop])
                            self.cursor, self.epoch = hello.get("cursor") or {}, hello.get("epoch")
                        self.first_frame.set_result(None)
            elif opcode == 8:
                payload = buf[pos + head:end]
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self._send_frame(8, payload[:2])
                self.transport.close()
            elif opcode == 9:
                self._send_frame(10, buf[pos + head:end])
            pos = end
        self.buf = buf[pos:] if pos < n else b""

    def _handshake(self, data: bytes) -> bytes:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return b""
        head, rest = self.buf[:end].decode("latin-1"), self.buf[end + 4:]
        self.buf = b""
        status = head.split("\r\n", 1)[0]
        headers = {}
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(self.key + GUID).digest()).decode()
        if " 101 " not in status + " " or headers.get("sec-websocket-accept") != expected:
            self.error = status[:60] or "no status"
            if not self.handshake.done():
                self.handshake.set_exception(ConnectionError(self.error))
            self.transport.close()
            return b""
        extensions = headers.get("sec-websocket-extensions", "")
        if "permessage-deflate" in extensions:
            bits = 15
            for param in extensions.split(";"):
                name, _, value = param.strip().partition("=")
                if name == "server_max_window_bits" and value:
                    bits = int(value)
            # Context takeover unless the server said no: one decompressor per connection.
            self.inflater = zlib.decompressobj(-bits)
        self.opened = True
        self.handshake.set_result(None)
        return rest

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def connection_lost(self, exc):
        self.closed = True
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"closed before the handshake: {exc}"))
        if not self.first_frame.done():
            self.first_frame.set_exception(ConnectionError(f"closed with {self.close_code} before the first frame"))
            self.first_frame.exception()
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_exception(ConnectionError(f"closed with {self.close_code} before resumed"))
            self.resumed.exception()

    def close(self):
        if self.transport is not None and not self.closed:
            self._send_frame(8, struct.pack("!H", 1000))


CLIENTS: list[Client] = []


async def open_one(token, port, path, subprotocol, wait_hello, timeout, deflate=False, wait_resumed=False):
    """One socket; with ``wait_resumed`` it is open once its ``resumed`` frame arrived (else its
    ``hello``, with ``wait_hello``, else the 101)."""
    loop = asyncio.get_running_loop()
    client = Client(token, f"127.0.0.1:{port}", path, subprotocol, deflate)
    client.expect_hello = wait_hello or wait_resumed
    if wait_resumed:
        client.resumed = loop.create_future()
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: client, "127.0.0.1", port)
            await client.handshake
            if client.expect_hello:
                await client.first_frame
            if wait_resumed:
                await client.resumed
    except TimeoutError:
        if client.transport is not None:
            client.transport.abort()
        return client, "timeout"
    except Exception as exc:  # refused, reset, closed: count it by kind
        if client.transport is not None:
            client.transport.abort()
        return client, f"{type(exc).__name__}: {str(exc)[:60]}"
    return client, None


async def connect(cmd):
    sem = asyncio.Semaphore(cmd.get("concurrency", 100))
    errors: dict[str, int] = {}
    latencies = []

    async def one(token):
        async with sem:
            t = time.perf_counter()
            client, error = await open_one(token, cmd["port"], cmd.get("path", "/"), cmd.get("subprotocol"),
                                           cmd.get("wait_hello", False), cmd.get("timeout", 30),
                                           cmd.get("deflate", False))
            if error is None:
                CLIENTS.append(client)
                latencies.append(time.perf_counter() - t)
            else:
                errors[error] = errors.get(error, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(one(t) for t in cmd["tokens"]))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def q(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None
    return {"connected": len(latencies), "failed": sum(errors.values()), "errors": errors, "elapsed": elapsed,
            "connect_p50": q(0.5), "connect_p99": q(0.99), "start": time.time() - elapsed}


def quantile(values: list[float], p: float):
    return values[min(len(values) - 1, int(p * len(values)))] if values else None


def resume_path(path: str, cursor: dict, epoch) -> str:
    """``path?since=u.1:17,b:3&epoch=...`` (docs/protocol.md): an empty cursor is ``since=``."""
    since = ",".join(f"{stream}:{offset}" for stream, offset in cursor.items())
    return f"{path}?since={quote(since, safe='')}&epoch={quote(epoch or '', safe='')}"


async def resume(cmd):
    """Drop every socket at once, then reconnect each from its hello's cursor and epoch."""
    clients = list(CLIENTS)
    CLIENTS.clear()
    dropped = 0
    for c in clients:  # all at once, no close frame: what a deploy or a network cut does
        if c.transport is not None and not c.closed:
            c.transport.abort()
            dropped += 1
    sem = asyncio.Semaphore(cmd.get("concurrency", 100))
    errors: dict[str, int] = {}
    reasons: dict[str, int] = {}
    latencies = []
    replayed = 0
    recovered = 0
    path = cmd.get("path", "/")

    async def one(old):
        nonlocal replayed, recovered
        if old.cursor is None:
            errors["no hello cursor"] = errors.get("no hello cursor", 0) + 1
            return
        async with sem:
            t = time.perf_counter()
            client, error = await open_one(old.token, cmd["port"], resume_path(path, old.cursor, old.epoch),
                                           cmd.get("subprotocol"), True, cmd.get("timeout", 30),
                                           wait_resumed=True)
            if error is not None:
                errors[error] = errors.get(error, 0) + 1
                return
            latencies.append(time.perf_counter() - t)
            CLIENTS.append(client)
            frame = client.resumed.result()
            replayed += frame.get("count", 0)
            if frame.get("recovered"):
                recovered += 1
            else:
                reason = str(frame.get("reason"))
                reasons[reason] = reasons.get(reason, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(one(c) for c in clients))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"dropped": dropped, "resumed": len(latencies), "recovered": recovered, "not_recovered": reasons,
            "replayed": replayed, "failed": sum(errors.values()), "errors": errors, "elapsed": elapsed,
            "resume_p50": quantile(latencies, 0.5), "resume_p99": quantile(latencies, 0.99),
            "start": time.time() - elapsed}


def stats():
    codes: dict[str, int] = {}
    open_count = 0
    counts = []
    for c in CLIENTS:
        if c.closed:
            codes[str(c.close_code)] = codes.get(str(c.close_code), 0) + 1
        else:
            open_count += 1
        counts.append(c.count)
    return {"frames": STATS.frames, "other": STATS.other, "hist": STATS.hist, "max_latency": STATS.max_latency,
            "first_recv": STATS.first_recv, "last_recv": STATS.last_recv, "open": open_count, "close_codes": codes,
            "per_socket_min": min(counts, default=0), "per_socket_max": max(counts, default=0),
            "cpu": time.process_time() - STATS.cpu0}


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "connect":
            reply = await connect(cmd)
        elif cmd["cmd"] == "resume":
            reply = await resume(cmd)
        elif cmd["cmd"] == "reset":
            STATS.reset()
            for c in CLIENTS:
                c.count = 0
            reply = {"ok": True}
        elif cmd["cmd"] == "stats":
            reply = stats()
        elif cmd["cmd"] == "close":
            for c in CLIENTS:
                c.close()
            await asyncio.sleep(0.5)
            for c in CLIENTS:
                if c.transport is not None:
                    c.transport.abort()
            reply = {"ok": True}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
            break
        else:
            reply = {"error": f"unknown command {cmd['cmd']!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
