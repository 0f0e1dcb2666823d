"""The limits of the server itself (``notifications/serving.py``, docs/deployment.md "Limits of the
server itself") against a real ``bin/serve`` attacked directly, with raw sockets on loopback: a ping
flood from a client that never reads, a header that never ends, slowloris connections; and a
legitimate slow consumer still closed by the application with 4008.

Memory is the worker's resident set (``VmRSS`` of ``/proc/<pid>/status``; with ``--workers 1``
uvicorn serves in the process ``bin/serve`` execs), sampled every few milliseconds while the attack
runs. A connection is gone once the client's TCP state has left ESTABLISHED (the server's FIN or RST
arrived): ``TCP_INFO``, so the client needs to read nothing to find out."""

import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.sync.client import connect
from websockets.uri import parse_uri

from .serving import SERVE

pytestmark = [pytest.mark.server, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

CLOSE_TIMEOUT = 2.0  # SERVE_WS_CLOSE_TIMEOUT in these tests (documented default: 5 s)
HEADER_TIMEOUT = 2.0  # SERVE_HEADER_TIMEOUT in these tests (documented default: 10 s)
MAX_HEADER_BYTES = 16 * 1024  # SERVE_MAX_HEADER_BYTES's documented default (not set here)
SLACK = 3.0  # seconds past a deadline for the server to act (loopback, a loaded test machine)
# The bound on a worker's growth during one attack. What the fixed server keeps for an attacking
# connection: a write buffer at its high-water mark (64 KiB) plus the replies to one read (uvloop
# reads at most 256,000 bytes), and that read: under 1 MiB. The rest is the allocator's and the
# application's noise (a handshake, a log line). Without the limits the worker keeps about what
# the attacker sent, minus what the kernel's socket buffers hold (a few MB).
RSS_BOUND = 8 * 1024 * 1024
FLOOD_BYTES = 48 * 1024 * 1024  # pings sent at most (the attack in the report sent 64 MB)
HEADER_BYTES = 32 * 1024 * 1024  # header bytes sent at most by the never-ending header
STALL = 1.0  # seconds without progress: the server has stopped reading
ESTABLISHED = 1  # tcpi_state


# Measuring


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class PeakRss:
    """``with PeakRss(pid) as peak:`` samples the process's RSS every 5 ms; ``peak.growth`` is the
    highest sample minus the RSS at the start."""

    def __init__(self, pid: int):
        self.pid = pid
        self.before = self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.before

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss(self.pid))


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def established(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == ESTABLISHED


def wait_gone(sock: socket.socket, deadline: float) -> float | None:
    """When (``time.monotonic()``) the server closed or aborted ``sock``; None if not by ``deadline``."""
    while True:
        if not established(sock):
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def stream(sock: socket.socket, block: bytes, total: int) -> tuple[int, str]:
    """Send ``block`` again and again, as fast as the server takes it, up to ``total`` bytes.
    Returns the bytes sent and why it stopped: ``done``, ``stalled`` (nothing taken for STALL
    seconds: the server stopped reading) or ``reset`` (the server closed the connection)."""
    sock.setblocking(False)
    view, offset, sent = memoryview(block), 0, 0
    try:
        while sent < total:
            if not select.select([], [sock], [], STALL)[1]:
                return sent, "stalled"
            try:
                n = sock.send(view[offset:])
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return sent, "reset"
            sent += n
            offset = (offset + n) % len(block)
        return sent, "done"
    finally:
        sock.setblocking(True)


# WebSocket by hand


def ws_open(server, *, token: str | None = None,
            rcvbuf: int | None = None) -> tuple[socket.socket, ClientProtocol, list[Frame]]:
    """A WebSocket handshake on a raw socket; reads only up to the end of the 101 response.
    Returns the socket, the client protocol (to parse what is read later) and the frames that
    arrived with the response."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect((server.host, server.port))
    client = ClientProtocol(parse_uri(server.ws_url()), max_size=None)
    request = client.connect()
    if token:
        request.headers["Authorization"] = f"Bearer {token}"
    client.send_request(request)
    sock.sendall(b"".join(client.data_to_send()))
    events: list = []
    while client.handshake_exc is None and not any(isinstance(e, Response) for e in events):
        data = sock.recv(1024)
        assert data, "the server closed the connection during the handshake"
        client.receive_data(data)
        events += client.events_received()
    assert client.handshake_exc is None, client.handshake_exc
    return sock, client, [e for e in events if isinstance(e, Frame)]


def masked_ping(payload: bytes, mask: bytes = b"\x1f\x2e\x3d\x4c") -> bytes:
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x89, 0x80 | len(payload)) + mask + masked


PING = masked_ping(b"p" * 125)  # the largest control frame: a 127-byte pong for 131 bytes sent
PINGS = PING * (1048576 // len(PING))  # about 1 MiB of whole frames


def refused_once(server) -> None:
    """One refused handshake, read to its end: warms the worker up before a measurement."""
    with connect(server.ws_url(), open_timeout=5, close_timeout=2) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "error"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


def ping_flood(server) -> tuple[PeakRss, float | None, int, str]:
    """An unauthenticated handshake (the application accepts, sends an error frame and closes
    with 4001 at once), then pings as fast as possible, never reading. Returns the RSS, how long
    after the handshake the connection was gone (None: still open after the close timeout plus
    slack), the bytes sent and how the sending stopped."""
    refused_once(server)
    with PeakRss(server.process.pid) as peak:
        sock, _, _ = ws_open(server)
        with sock:
            opened = time.monotonic()
            sent, outcome = stream(sock, PINGS, FLOOD_BYTES)
            gone = wait_gone(sock, opened + CLOSE_TIMEOUT + SLACK)
    return peak, None if gone is None else gone - opened, sent, outcome


def test_a_ping_flood_from_a_client_that_never_reads_is_cut_off_after_the_close(serve):
    server = serve("flood", SERVE_WS_CLOSE_TIMEOUT=str(CLOSE_TIMEOUT))
    peak, gone_after, sent, outcome = ping_flood(server)
    print(f"\nping flood: sent {mib(sent)} ({outcome}), worker RSS {mib(peak.before)} -> peak {mib(peak.peak)} "
          f"(+{mib(peak.growth)}), gone after {gone_after} s")
    assert "close_code=4001" in server.log()  # the application refused it, as in the report
    assert gone_after is not None, f"still open {CLOSE_TIMEOUT + SLACK} s after the 4001 close ({mib(sent)} sent)"
    assert gone_after < CLOSE_TIMEOUT + SLACK
    assert peak.growth < RSS_BOUND, f"the worker grew by {mib(peak.growth)} ({mib(sent)} of pings sent)"


def test_unsent_bytes_over_the_limit_abort_the_connection(serve):
    """With a limit under the write buffer's high-water mark (64 KiB), the pongs pass it as soon as
    the kernel's buffers are full: the connection is aborted long before its close timeout."""
    server = serve("unsent", SERVE_WS_MAX_UNSENT_BYTES="16384", SERVE_WS_CLOSE_TIMEOUT="30")
    peak, gone_after, sent, outcome = ping_flood(server)
    print(f"\nunsent limit: sent {mib(sent)} ({outcome}), +{mib(peak.growth)}, gone after {gone_after} s")
    assert gone_after is not None, f"still open {CLOSE_TIMEOUT + SLACK} s after the handshake ({mib(sent)} sent)"
    assert "WebSocket aborted: over 16384 bytes unsent" in server.log()


# HTTP by hand


def raw_request(server, head: bytes) -> tuple[int, bytes]:
    """Send ``head`` (a whole request, no body) and read the answer to its end or the close."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data, "closed without an answer"
    return int(data.split(b" ", 2)[1]), data


def content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def get_with(header_value_bytes: int, *, keep_alive: bool = False) -> bytes:
    connection = b"" if keep_alive else b"Connection: close\r\n"
    return (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + connection
            + b"X-Pad: " + b"a" * header_value_bytes + b"\r\n\r\n")


def test_request_headers_over_the_limit_get_431_and_a_header_that_never_ends_is_cut_off(serve):
    server = serve("headers")  # the default limit, 16 KiB
    assert raw_request(server, get_with(MAX_HEADER_BYTES - 1024))[0] == 200  # a big cookie still fits
    status, answer = raw_request(server, get_with(MAX_HEADER_BYTES + 1024))
    assert status == 431, answer[:300]
    assert b"connection: close" in answer.lower()

    with PeakRss(server.process.pid) as peak:
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
            started = time.monotonic()
            sent, outcome = stream(sock, b"a" * 65536, HEADER_BYTES)
            gone = wait_gone(sock, started + SLACK)
    print(f"\nnever-ending header: sent {mib(sent)} ({outcome}), worker RSS {mib(peak.before)} -> "
          f"peak {mib(peak.peak)} (+{mib(peak.growth)}), gone after {gone and round(gone - started, 2)} s")
    assert outcome == "reset" and gone is not None, f"still open after {mib(sent)} of one header ({outcome})"
    assert peak.growth < RSS_BOUND, f"the worker grew by {mib(peak.growth)} ({mib(sent)} of one header sent)"
    assert "Request line and headers over 16384 bytes: 431, connection closed." in server.log()


# Slowloris

SLOW_CONNECTIONS = 50
KEEP_ALIVE_CONNECTIONS = 5  # of them: one whole request first, then a next one that never ends
HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
HALF_HANDSHAKE = (b"GET /ws/notifications/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nX-Slow: ")


def test_slowloris_connections_are_closed_after_the_header_timeout_and_requests_still_work(serve):
    # After a response the headers have the longer of the two timeouts: uvicorn's keep-alive
    # (1 s here, which the first byte of the next request cancels) and SERVE_HEADER_TIMEOUT.
    server = serve("slowloris", args=("--timeout-keep-alive", "1"), SERVE_HEADER_TIMEOUT=str(HEADER_TIMEOUT))
    started: dict[socket.socket, float] = {}  # when each one's time began: connect, or its response
    try:
        for i in range(SLOW_CONNECTIONS):
            sock = socket.create_connection((server.host, server.port), timeout=5)
            if i < KEEP_ALIVE_CONNECTIONS:
                sock.sendall(get_with(10, keep_alive=True))
                answer = b""
                while not answer.endswith(b'"ok"}'):
                    chunk = sock.recv(4096)
                    assert chunk, "closed before the first response"
                    answer += chunk
                started[sock] = time.monotonic()
                sock.sendall(b"GET /heal")  # half a request line
            else:
                started[sock] = time.monotonic()
                sock.sendall(HALF_HANDSHAKE if i % 2 else HALF_REQUEST)
        deadline = max(started.values()) + HEADER_TIMEOUT + SLACK
        closed: dict[socket.socket, float] = {}
        while len(closed) < len(started) and time.monotonic() < deadline:
            for sock in [s for s in started if s not in closed]:
                if not established(sock):
                    closed[sock] = time.monotonic() - started[sock]
                    continue
                try:
                    sock.send(b"a")  # one more byte now and then, as slowloris does
                except OSError:
                    closed[sock] = time.monotonic() - started[sock]
            time.sleep(0.25)
        after = sorted(closed.values())
        print(f"\nslowloris: {len(closed)} of {len(started)} closed, after {after[0] if after else None} to "
              f"{after[-1] if after else None} s")
        assert len(closed) == len(started), f"{len(started) - len(closed)} of {len(started)} still open"
        assert HEADER_TIMEOUT - 0.5 < after[0] and after[-1] < HEADER_TIMEOUT + SLACK
    finally:
        for sock in started:
            sock.close()

    assert raw_request(server, get_with(10))[0] == 200
    with socket.create_connection((server.host, server.port), timeout=5) as sock:  # slow, but in time
        request = get_with(10)
        for part in (request[:20], request[20:40], request[40:]):
            sock.sendall(part)
            time.sleep(HEADER_TIMEOUT / 4)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


# A legitimate slow consumer, and the settings


def test_a_slow_consumer_is_still_closed_by_the_application_with_4008(serve, alice, alice_token, staff_token):
    server = serve("slow", WS_MAX_QUEUED_FRAMES="10")
    sock, client, frames = ws_open(server, token=alice_token, rcvbuf=4096)  # then reads nothing for a while
    notification = {"title": "t" * 200, "body": "b" * 10_000, "users": ["alice"]}

    def send(_):
        response = server.request("POST", "/api/notifications/", token=staff_token, json_body=notification)
        assert response.status == 201, response.text

    with sock, ThreadPoolExecutor(4) as pool:
        sent = 0
        while sent < 600 and "closing slow connection" not in server.log():  # at most 600 × 10 KB
            list(pool.map(send, range(20)))
            sent += 20
        print(f"\nslow consumer: outbox full after {sent} notifications of 10 KB")
        assert "closing slow connection" in server.log(), "the outbox never filled"
        deadline = time.monotonic() + 5.0  # the default SERVE_WS_CLOSE_TIMEOUT: then the server aborts
        while not any(f.opcode is Opcode.CLOSE for f in frames) and time.monotonic() < deadline:
            data = sock.recv(1 << 20)  # reading again, fast
            if not data:
                break
            client.receive_data(data)
            frames += [e for e in client.events_received() if isinstance(e, Frame)]
    close = next((f for f in frames if f.opcode is Opcode.CLOSE), None)
    assert close is not None, f"no close frame after {len(frames)} frames"
    code, reason = struct.unpack("!H", close.data[:2])[0], close.data[2:].decode()
    assert (code, reason) == (4008, "slow consumer")
    assert json.loads(frames[0].data)["type"] == "hello"



@pytest.mark.parametrize("variable, value", [("SERVE_HEADER_TIMEOUT", "ten"), ("SERVE_MAX_HEADER_BYTES", "16k"),
                                             ("SERVE_WS_MAX_UNSENT_BYTES", "0"), ("SERVE_WS_CLOSE_TIMEOUT", "-5")])
def test_a_bad_limit_stops_bin_serve_at_once_with_one_clear_line(variable, value):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVE_")}
    started = subprocess.run([str(SERVE), "--workers", "2"], env={**env, variable: value, "REDIS_URL": "redis://x"},
                             capture_output=True, text=True, timeout=10)
    assert started.returncode == 2
    assert started.stderr.startswith(f"bin/serve: ValueError: {variable} must be a positive"), started.stderr


def test_sigterm_still_closes_websockets_with_1012(serve, alice_token):
    server = serve("shutdown")
    with connect(server.ws_url(), additional_headers={"Authorization": f"Bearer {alice_token}"}, open_timeout=5,
                 close_timeout=2) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "hello"
        server.process.terminate()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    server.process.wait(10)  # uvicorn re-raises SIGTERM after its graceful shutdown: -15
    assert "Application shutdown complete." in server.log()
