"""A resuming WebSocket client for the fault tests and ``bench/faults.py``.

It does what docs/protocol.md asks of a ``notifications.v2`` client: authenticate with a Bearer
token, keep a cursor (one offset per stream: ``hello.cursor``, then ``cursor[frame.stream] =
frame.offset`` for each ``notification``, ``subscribed`` for a stream it has no entry for, and
``resumed.cursor`` in place of its own) and the ``epoch``, and when the connection ends reconnect
with ``?since=<key:offset,...>&epoch=<epoch>``, waiting between attempts with exponential backoff
and full jitter. Given several server URLs it moves to the next one after every disconnect or
failed attempt (fail-over).

It records everything a test needs to judge delivery: every notification id in the order
received (across connections), the close codes it saw, how long each resume took (from
noticing the close to the ``resumed`` frame) and any ``resumed`` frame with
``recovered: false``; and every frame that is out of place: a notification that is not at the
next offset of its stream (counted from the first ``hello.cursor``, across reconnects), whose id
is not above the previous one of its stream, or in another stream than its audience's, and a
``resumed`` cursor that disagrees with what was received (behind it: the next resume would
replay notifications again; ahead: some were skipped). ``compare`` turns those records into
lost / duplicated / out-of-order counts.

The position checks assume what the fault scenarios arrange: the client's audiences (its user,
the topics it follows, broadcasts) are set before it first connects, so it reads the whole of
each stream of its first ``hello.cursor`` from there on.

No Django imports: the bench script uses it as is.
"""

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.support import percentile

SUBPROTOCOL = "notifications.v2"
WS_PATH = "/ws/notifications/"
# Close codes after which retrying with the same credentials (or the same client) is pointless
# (docs/protocol.md).
FATAL_CLOSE_CODES = {4001, 4003, 4009, 4400, 4426}
ANOMALY_EXAMPLES = 10  # out-of-place frames kept per client, for the failure message


def format_cursor(cursor: dict[str, int]) -> str:
    """A cursor as ``?since=`` writes it: ``key:offset`` pairs separated by commas."""
    return ",".join(f"{key}:{offset}" for key, offset in sorted(cursor.items()))


def _is_cursor(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items())


class ProtocolMismatch(Exception):
    """The server does not speak the protocol this client does: stop, do not reconnect."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n))."""

    base: float = 0.1
    cap: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2 ** min(attempt, 30)))


class ResumingClient:
    """One WebSocket connection of one user that survives disconnects by resuming.

    ``servers`` are base URLs (``ws://127.0.0.1:8001``). ``start()`` runs it in a task;
    ``await stop()`` ends it. ``ready`` is set whenever a connection is live (after
    ``hello``, and after ``resumed`` when resuming).
    """

    def __init__(self, token: str, servers: list[str], *, name: str = "", backoff: Backoff | None = None,
                 path: str = WS_PATH, open_timeout: float = 30.0):
        self.token = token
        self.servers = list(servers)
        self.name = name
        self.backoff = backoff or Backoff()
        self.path = path
        self.open_timeout = open_timeout
        self.server_index = 0
        # Delivery records
        self.received: list[int] = []
        self.received_set: set[int] = set()
        self.user_id: int | None = None
        self.cursor: dict[str, int] | None = None  # what the protocol says to keep, and resume with
        self.epoch: str | None = None
        # Position records: the last offset and id received in each stream (from the first hello's
        # cursor), the stream each topic's notifications came in, and what was out of place.
        self.offsets: dict[str, int] = {}
        self.last_ids: dict[str, int] = {}
        self.topic_streams: dict[str, str] = {}
        self.out_of_order = 0
        self.anomalies: Counter = Counter()  # kind -> count
        self.anomaly_examples: list[dict] = []
        # What this client saw, one short line per notification, hello and resumed frame (for the
        # failure message: the lines around the first out-of-place frame).
        self.trace: list[str] = []
        self.first_anomaly_at: int | None = None
        # Connection records
        self.hellos = 0
        self.failed_attempts = 0  # handshakes that failed (refused, timed out, HTTP error)
        self.close_codes: list[int | None] = []  # None: the TCP connection ended without a close frame
        self.resume_times: list[float] = []
        self.unrecovered: list[dict] = []
        self.errors: list[dict] = []
        self.fatal: str | None = None
        self.ready = asyncio.Event()
        self.ws: ClientConnection | None = None
        self._closed_at: float | None = None
        self._since: dict[str, int] | None = None  # the cursor this connection resumed from
        self._replaying = False  # between a resuming connection's hello and its resumed
        self._pongs: dict[str, asyncio.Future] = {}
        self._stopping = False
        self._task: asyncio.Task | None = None

    # Running

    def start(self) -> "ResumingClient":
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"client {self.name}")
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, timeout)

    def url(self) -> str:
        base = self.servers[self.server_index % len(self.servers)]
        query = {}
        if self.cursor is not None:
            query["since"] = format_cursor(self.cursor)
            if self.epoch:
                query["epoch"] = self.epoch
        return f"{base}{self.path}" + (f"?{urlencode(query, safe=':,')}" if query else "")

    async def run(self) -> None:
        attempt = 0
        while not self._stopping:
            resuming = self.cursor is not None
            self._since = dict(self.cursor) if resuming else None
            self._replaying = False
            try:
                ws = await connect(
                    self.url(),
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    subprotocols=[SUBPROTOCOL],
                    open_timeout=self.open_timeout,
                    close_timeout=2,
                    max_queue=None,  # read everything: these clients are never slow consumers
                )
            except (OSError, InvalidHandshake, TimeoutError):
                self.failed_attempts += 1
                self.server_index += 1
                await asyncio.sleep(self.backoff.delay(attempt))
                attempt += 1
                continue
            self.ws = ws
            try:
                if ws.subprotocol != SUBPROTOCOL:
                    raise ProtocolMismatch(f"the server chose the subprotocol {ws.subprotocol!r}, not {SUBPROTOCOL}")
                async for text in ws:
                    if self._handle(json.loads(text), resuming):
                        attempt = 0
            except ConnectionClosed:
                pass
            except ProtocolMismatch as exc:
                self.fatal = str(exc)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 5)
                return
            finally:
                self.ws = None
                self.ready.clear()
            if self._stopping:
                return
            rcvd = ws.protocol.close_rcvd
            code = rcvd.code if rcvd is not None else None
            self.close_codes.append(code)
            if code in FATAL_CLOSE_CODES:
                self.fatal = f"closed with {code}"
                return
            if self._closed_at is None:
                self._closed_at = time.monotonic()
            self.server_index += 1
            await asyncio.sleep(self.backoff.delay(attempt))
            attempt += 1

    def _handle(self, frame: dict, resuming: bool) -> bool:
        """Apply one frame; True when the connection became live (a successful (re)connect)."""
        kind = frame.get("type")
        if kind == "notification":
            self._notification(frame)
        elif kind == "hello":
            self.hellos += 1
            cursor = frame.get("cursor")
            if frame.get("protocol") != SUBPROTOCOL or not _is_cursor(cursor):
                raise ProtocolMismatch(f"not a {SUBPROTOCOL} hello: {frame!r}"[:300])
            if self.epoch is None:
                self.epoch = frame["epoch"]
            self.trace.append(f"c{self.hellos} hello cursor={format_cursor(cursor)}")
            if self.cursor is None:  # the first connection; a resuming one keeps its own cursor
                self.user_id = frame["user"]["id"]
                self.cursor = dict(cursor)
                self.offsets = dict(cursor)
            if not resuming:
                self.ready.set()
                return True
            self._replaying = True
        elif kind == "resumed":
            self._replaying = False
            if self._closed_at is not None:
                self.resume_times.append(time.monotonic() - self._closed_at)
                self._closed_at = None
            cursor = frame.get("cursor")
            if not _is_cursor(cursor):
                raise ProtocolMismatch(f"not a {SUBPROTOCOL} resumed frame: {frame!r}"[:300])
            self.trace.append(f"c{self.hellos} resumed recovered={frame.get('recovered')} count={frame.get('count')} "
                              f"cursor={format_cursor(cursor)}")
            if not frame.get("recovered"):
                self.unrecovered.append(frame)
                # A real client reloads its inbox here; positions continue from the server's cursor.
                self.offsets.update(cursor)
            else:
                self._check_resumed_cursor(cursor)
            self.cursor = dict(cursor)
            self.ready.set()
            return True
        elif kind == "subscribed":
            stream, offset = frame.get("stream"), frame.get("offset")
            if self.cursor is not None and isinstance(stream, str) and isinstance(offset, int):
                if stream not in self.cursor:
                    self.cursor[stream] = offset
                self.offsets.setdefault(stream, offset)
        elif kind == "pong":
            future = self._pongs.pop(str(frame.get("id")), None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif kind == "error":
            self.errors.append(frame)
        return False

    def _notification(self, frame: dict) -> None:
        """Record a notification and check its position: the next offset of its audience's stream,
        with an id above the previous one of that stream."""
        notification_id, stream, offset = frame["id"], frame.get("stream"), frame.get("offset")
        self.received.append(notification_id)
        self.received_set.add(notification_id)
        self.trace.append(f"c{self.hellos} {'replay' if self._replaying else 'live'} {stream}:{offset} "
                          f"id={notification_id}")
        if not isinstance(stream, str) or not isinstance(offset, int) or isinstance(offset, bool):
            self._anomaly("no_position", frame)
            return
        expected_stream = self._stream_of(frame)
        if expected_stream is not None and stream != expected_stream:
            self._anomaly("wrong_stream", frame, expected=expected_stream)
        previous = self.offsets.get(stream)
        if previous is not None and offset != previous + 1:
            self._anomaly("offset_gap" if offset > previous + 1 else "offset_behind", frame, expected=previous + 1)
        previous_id = self.last_ids.get(stream)
        if previous_id is not None and notification_id <= previous_id:
            self._anomaly("id_not_rising", frame, previous_id=previous_id)
        self.offsets[stream] = offset if previous is None else max(previous, offset)
        self.last_ids[stream] = notification_id if previous_id is None else max(previous_id, notification_id)
        if self.cursor is not None:
            self.cursor[stream] = offset

    def _stream_of(self, frame: dict) -> str | None:
        """The stream a notification must come in, from its audience (None: not known here)."""
        audience = frame.get("audience")
        if audience == "broadcast":
            return "b"
        if audience == "user":
            return None if self.user_id is None else f"u.{self.user_id}"
        if audience == "topic":
            # A topic's stream is named by its id, which frames do not carry: the same for every one.
            return self.topic_streams.setdefault(frame.get("topic"), frame.get("stream"))
        return None

    def _check_resumed_cursor(self, cursor: dict[str, int]) -> None:
        """A recovered resume's cursor is where this client is: it received the replay up to it."""
        mine = self.cursor or {}
        for stream in sorted(set(mine) & set(cursor)):
            if cursor[stream] != mine[stream]:
                kind = "resumed_cursor_behind" if cursor[stream] < mine[stream] else "resumed_cursor_ahead"
                self._anomaly(kind, {"type": "resumed", "cursor": cursor}, stream=stream, received=mine[stream])

    def _anomaly(self, kind: str, frame: dict, **details) -> None:
        self.out_of_order += 1
        if self.first_anomaly_at is None:
            self.first_anomaly_at = len(self.trace) - 1
        self.anomalies[kind] += 1
        if len(self.anomaly_examples) < ANOMALY_EXAMPLES:
            shown = {k: frame.get(k) for k in ("type", "id", "audience", "topic", "stream", "offset", "cursor")
                     if k in frame}
            self.anomaly_examples.append({"kind": kind, "frame": shown, **details, "connection": self.hellos,
                                          "during": "replay" if self._replaying else "live",
                                          "since": self._since, "received_before": len(self.received) - 1})

    # Requests

    async def ping(self, timeout: float = 5.0) -> bool:
        """An application-level ping on the live connection; True if the pong came back in time."""
        ws = self.ws
        if ws is None:
            return False
        request_id = f"p{random.getrandbits(48)}"
        future = asyncio.get_running_loop().create_future()
        self._pongs[request_id] = future
        try:
            await ws.send(json.dumps({"type": "ping", "id": request_id}))
            await asyncio.wait_for(future, timeout)
            return True
        except (ConnectionClosed, TimeoutError):
            return False
        finally:
            self._pongs.pop(request_id, None)

    async def drop(self) -> None:
        """Close the live connection from this side (as a phone going to sleep); the client
        reconnects and resumes by itself."""
        ws = self.ws
        if ws is not None:
            self._closed_at = time.monotonic()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)

    def trace_around_anomaly(self, before: int = 12, after: int = 4) -> list[str]:
        """The trace lines around the first out-of-place frame (none if there was none)."""
        if self.first_anomaly_at is None:
            return []
        return self.trace[max(0, self.first_anomaly_at - before): self.first_anomaly_at + after + 1]

    def has_all(self, expected: set[int]) -> bool:
        return len(self.received_set) >= len(expected) and expected.issubset(self.received_set)


async def start_clients(tokens: Iterable[str], servers: list[str], *, backoff: Backoff | None = None,
                        connect_timeout: float = 60.0, concurrency: int = 100) -> list[ResumingClient]:
    """Start one client per token (at most ``concurrency`` handshakes at once) and wait until
    every one is live; fails after ``connect_timeout`` seconds."""
    clients = [ResumingClient(token, servers, name=str(i), backoff=backoff) for i, token in enumerate(tokens)]
    gate = asyncio.Semaphore(concurrency)

    async def start_one(client: ResumingClient) -> None:
        async with gate:
            client.start()
            await client.ready.wait()

    try:
        await asyncio.wait_for(asyncio.gather(*(start_one(c) for c in clients)), connect_timeout)
    except TimeoutError:
        live = sum(c.ready.is_set() for c in clients)
        await stop_clients(clients)
        raise AssertionError(f"only {live} of {len(clients)} clients connected within {connect_timeout:g} s") from None
    return clients


async def stop_clients(clients: list[ResumingClient]) -> None:
    await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)


@dataclass
class Report:
    """Delivery figures for a set of clients, against what was sent to each one's audience."""

    clients: int
    sent: int
    expected: int  # deliveries: the sum over clients of the notifications its audience got
    received: int  # deliveries received, duplicates included
    lost: int
    duplicated: int
    unexpected: int  # notifications a client received that were not for it (or not sent)
    # Frames out of place: a notification not at the next offset of its stream, with an id not
    # above the previous one of its stream, or in another stream than its audience's; a recovered
    # resume whose cursor disagrees with what the client received (``order_problems`` by kind).
    out_of_order: int
    unrecovered: int  # resumed frames with recovered: false
    reconnects: int
    failed_attempts: int
    close_codes: dict = field(default_factory=dict)
    order_problems: dict = field(default_factory=dict)
    resume_p50: float | None = None
    resume_p99: float | None = None
    resume_max: float | None = None
    resumes: int = 0
    fatal: int = 0  # clients that stopped for good (a fatal close code, a server of another protocol)
    examples: list = field(default_factory=list)  # a few clients' problems, for the failure message

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected or self.out_of_order or self.unrecovered
                    or self.fatal)

    def figures(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "examples"}

    def summary(self) -> str:
        def ms(seconds: float | None) -> str:
            return "-" if seconds is None else f"{seconds * 1000:.0f} ms"

        return (f"clients={self.clients} sent={self.sent} expected={self.expected} received={self.received} "
                f"lost={self.lost} duplicated={self.duplicated} unexpected={self.unexpected} "
                f"out_of_order={self.out_of_order} {self.order_problems or ''} unrecovered={self.unrecovered} "
                f"fatal={self.fatal} reconnects={self.reconnects} failed_attempts={self.failed_attempts} "
                f"close_codes={self.close_codes} resumes={self.resumes} "
                f"resume_p50={ms(self.resume_p50)} resume_p99={ms(self.resume_p99)} "
                f"resume_max={ms(self.resume_max)}")


def compare(clients: list[ResumingClient], expected_for, sent: int) -> Report:
    """Compare what each client received with ``expected_for(client)`` (a set of ids)."""
    totals = Counter()
    codes = Counter()
    problems = Counter()
    resume_times: list[float] = []
    examples = []
    for client in clients:
        expected = expected_for(client)
        got = set(client.received)
        lost = expected - got
        unexpected = got - expected
        duplicated = len(client.received) - len(got)
        totals.update(expected=len(expected), received=len(client.received), lost=len(lost),
                      unexpected=len(unexpected), duplicated=duplicated, out_of_order=client.out_of_order,
                      unrecovered=len(client.unrecovered), reconnects=max(0, client.hellos - 1),
                      failed_attempts=client.failed_attempts, fatal=client.fatal is not None)
        codes.update("none" if c is None else str(c) for c in client.close_codes)
        problems.update(client.anomalies)
        resume_times += client.resume_times
        troubled = lost or unexpected or duplicated or client.out_of_order or client.unrecovered or client.fatal
        if troubled and len(examples) < 5:
            examples.append({"client": client.name, "lost": sorted(lost)[:10], "unexpected": sorted(unexpected)[:10],
                             "duplicated": duplicated, "out_of_order": client.out_of_order,
                             "order_problems": client.anomaly_examples[:5], "trace": client.trace_around_anomaly(),
                             "unrecovered": client.unrecovered[:2], "closes": client.close_codes[:5],
                             "errors": client.errors[:3], "fatal": client.fatal, "cursor": client.cursor})
    return Report(
        clients=len(clients), sent=sent, expected=totals["expected"], received=totals["received"],
        lost=totals["lost"], duplicated=totals["duplicated"], unexpected=totals["unexpected"],
        out_of_order=totals["out_of_order"], unrecovered=totals["unrecovered"], reconnects=totals["reconnects"],
        failed_attempts=totals["failed_attempts"], close_codes=dict(sorted(codes.items())),
        order_problems=dict(sorted(problems.items())),
        resume_p50=percentile(resume_times, 50), resume_p99=percentile(resume_times, 99),
        resume_max=max(resume_times) if resume_times else None, resumes=len(resume_times),
        fatal=totals["fatal"], examples=examples,
    )
