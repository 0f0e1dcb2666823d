"""The fault scenarios, run against real server processes on loopback.

Shared by ``tests/faults/test_faults.py`` (small sizes, asserted) and ``bench/faults.py``
(bigger sizes, printed). Each scenario starts its own server processes (uvicorn or
daphne, ``project.asgi:application`` exactly as in production) on the given database and
Redis, connects ``ResumingClient``s, sends notifications through a server's REST API as a
staff user, injects the fault, waits (bounded) until every client has everything its
audience was sent, and returns an ``Outcome``: the delivery ``Report`` (lost, duplicated,
out of order, resume times...) and the facts specific to the fault (close codes, HTTP
statuses during the outage, log lines...). Nothing here asserts: callers judge.

Audience: ``populate`` creates users (half of them follow the topic ``faults``) and a staff
sender; the sender cycles broadcast, topic, personal, personal (rotating over the users),
so every client reads three streams at once (``b``, ``t.<faults' id>`` for followers, and its
user's ``u.<id>``), each numbered on its own (docs/protocol.md, "Cursors"). Client ``i`` is a
connection of user ``i % len(users)``. Audiences are set before any client connects and
every send comes after, so each client must receive every offset of each of its streams
after its first ``hello.cursor``, in order, once (``tests/faults/client.py`` checks it).
"""

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.server import HOST, LiveServer, RedisServer, http_request, start_daphne, start_uvicorn
from tests.support import wait_until

from .client import (
    SUBPROTOCOL,
    WS_PATH,
    Backoff,
    Report,
    ResumingClient,
    compare,
    start_clients,
    stop_clients,
)

TOPIC = "faults"
PRESENCE_TTL_DEFAULT = 45  # the documented default of PRESENCE_TTL
SEND_PATH = "/api/notifications/"


# The audience


@dataclass(frozen=True)
class Member:
    username: str
    token: str
    follows_topic: bool


def populate(users: int, *, prefix: str = "fault") -> tuple[list[Member], str]:
    """Create ``users`` users with API tokens (even-numbered ones follow the topic), the topic,
    and a staff user allowed to send; return the members and the staff token. ORM code:
    call it from synchronous code with database access."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    from notifications import services
    from notifications.auth import token_create
    from notifications.models import Topic

    User = get_user_model()
    topic, _ = Topic.objects.get_or_create(slug=TOPIC, defaults={"title": "Fault tests"})
    staff = User.objects.create(username=f"{prefix}-staff", is_staff=True)
    staff.user_permissions.add(
        Permission.objects.get(content_type__app_label="notifications", codename="add_notification")
    )
    members = []
    for i in range(users):
        user = User.objects.create(username=f"{prefix}-{i}")
        follows = i % 2 == 0
        if follows:
            services.topic_follow(user=user, topic=topic)
        members.append(Member(user.username, token_create(user=user)[1], follows))
    return members, token_create(user=staff)[1]


class Ledger:
    """Every notification the API accepted (201), by audience; and every send it refused."""

    def __init__(self):
        self.broadcast: list[int] = []
        self.topic: list[int] = []
        self.personal: dict[str, list[int]] = {}
        self.refused: list[dict] = []  # {"status", "content_type", "body"} of non-201 answers
        self.plan_index = 0

    @property
    def sent(self) -> int:
        return len(self.broadcast) + len(self.topic) + sum(len(v) for v in self.personal.values())

    def expected(self, member: Member) -> set[int]:
        ids = set(self.broadcast) | set(self.personal.get(member.username, ()))
        if member.follows_topic:
            ids |= set(self.topic)
        return ids

    def next_payload(self, members: list[Member]) -> tuple[str, str | None, dict]:
        """The next send of the cycle broadcast, topic, personal, personal."""
        i = self.plan_index
        self.plan_index += 1
        title = f"fault test {i}"
        kind = ("broadcast", "topic", "user", "user")[i % 4]
        if kind == "broadcast":
            return kind, None, {"title": title, "broadcast": True, "data": {"i": i}}
        if kind == "topic":
            return kind, None, {"title": title, "topic": TOPIC, "data": {"i": i}}
        member = members[(i // 4 * 2 + i % 4 - 2) % len(members)]
        return kind, member.username, {"title": title, "users": [member.username], "data": {"i": i}}

    def record(self, kind: str, username: str | None, response) -> None:
        if response.status != 201:
            body = None
            with contextlib.suppress(ValueError):
                body = response.json()
            self.refused.append({"status": response.status, "content_type": response.headers.get("Content-Type"),
                                 "body": body if body is not None else response.text[:300]})
            return
        ids = [n["id"] for n in response.json()["notifications"]]
        if kind == "broadcast":
            self.broadcast += ids
        elif kind == "topic":
            self.topic += ids
        else:
            self.personal.setdefault(username, []).extend(ids)


# The world: database, Redis, users, the server processes


@dataclass
class World:
    db_url: str  # DATABASE_URL for the server processes
    redis_url: str
    secret_key: str
    log_dir: Path
    members: list[Member]
    staff_token: str
    prefix: str = field(default_factory=lambda: f"faults-{uuid.uuid4().hex[:8]}")
    servers: list[LiveServer] = field(default_factory=list)

    def env(self, **extra) -> dict[str, str]:
        env = {
            "DATABASE_URL": self.db_url,
            "REDIS_URL": self.redis_url,
            "CHANNELS_PREFIX": self.prefix,
            "SECRET_KEY": self.secret_key,
            "DEBUG": "0",
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
        }
        env.update({k: str(v) for k, v in extra.items()})
        return env

    async def start(self, kind: str, name: str, *, port: int | None = None, **extra_env) -> LiveServer:
        """Start a server process (``"uvicorn"`` or ``"daphne"``); its log is ``<log_dir>/<name>.log``
        and its presence ``SERVER_ID`` is ``name``."""
        env = self.env(SERVER_ID=name, **extra_env)
        log = self.log_dir / f"{name}.log"
        if kind == "uvicorn":
            server = await asyncio.to_thread(start_uvicorn, env, log, port=port)
        elif kind == "daphne":
            assert port is None, "start_daphne picks its own port"
            server = await asyncio.to_thread(start_daphne, env, log)
        else:
            raise ValueError(kind)
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()

    def cleanup_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start:start + 1000])
        except redis.RedisError:
            pass
        finally:
            client.close()

    def assign(self, clients: int) -> list[Member]:
        return [self.members[i % len(self.members)] for i in range(clients)]


def ws_base(server: LiveServer) -> str:
    return f"ws://{HOST}:{server.port}"


async def send_notifications(world: World, server: LiveServer, ledger: Ledger, *, count: int, rate: float,
                             timeout: float = 10.0, retries: list | None = None) -> None:
    """Send ``count`` notifications through ``server``'s API at a steady ``rate`` per second
    (one request at a time), recording each answer in ``ledger``. With ``retries`` (a list), a
    503 with ``Retry-After`` is retried after that delay, as a client should (up to 3 times),
    and each such answer is appended to ``retries`` instead of being a refusal."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(count):
        delay = started + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        kind, username, payload = ledger.next_payload(world.members)
        for attempt in range(4):
            try:
                response = await asyncio.to_thread(http_request, server, "POST", SEND_PATH, token=world.staff_token,
                                                   json_body=payload, timeout=timeout)
            except OSError as exc:
                ledger.refused.append({"status": None, "content_type": None, "body": f"{type(exc).__name__}: {exc}"})
                break
            retry_after = response.headers.get("Retry-After")
            if retries is None or attempt == 3 or response.status != 503 or not retry_after:
                ledger.record(kind, username, response)
                break
            retries.append({"status": response.status, "content_type": response.headers.get("Content-Type"),
                            "retry_after": retry_after})
            await asyncio.sleep(min(float(retry_after), 2.0))


# Logs

TRACEBACK = "Traceback (most recent call last)"
# Django's format ("2026-01-01 10:00:00,123 ERROR logger message") and uvicorn's ("ERROR:    message").
ERROR_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d [\d:,.]+ (?:ERROR|CRITICAL) |(?:ERROR|CRITICAL):).*$", re.MULTILINE)


def log_trouble(text: str) -> dict:
    """Tracebacks and ERROR/CRITICAL lines in a server log."""
    return {"tracebacks": text.count(TRACEBACK), "errors": ERROR_LINE.findall(text)}


# Outcome


@dataclass
class Outcome:
    scenario: str
    report: Report
    seconds: float
    complete: bool  # every client got everything before the delivery timeout
    facts: dict = field(default_factory=dict)

    def figures(self) -> dict:
        return {"scenario": self.scenario, "seconds": round(self.seconds, 1), "complete": self.complete,
                **self.report.figures(), "facts": self.facts}


def _expected(ledger: Ledger, assignments: list[Member]):
    return lambda client: ledger.expected(assignments[int(client.name)])


async def _deliver(clients: list[ResumingClient], ledger: Ledger, assignments: list[Member], timeout: float) -> bool:
    expected = _expected(ledger, assignments)
    return await wait_until(lambda: all(c.has_all(expected(c)) for c in clients), timeout, interval=0.2)


# Helper processes and sockets


class TcpProxy:
    """A tiny TCP proxy in this event loop: ``cut()`` drops every connection and refuses new ones
    (accepts, then closes at once) until ``restore()``."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.cut_off = False
        self.links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.refused = 0

    async def start(self) -> "TcpProxy":
        self.server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, upstream_writer)
        self.links.add(link)
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        finally:
            self.links.discard(link)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        self.cut_off = True
        for downstream, upstream in list(self.links):
            downstream.transport.abort()
            upstream.transport.abort()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)


def proxied_url(database_url: str, port: int) -> str:
    """``database_url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(database_url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{HOST}:{port}" if userinfo else f"{HOST}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def presence_by_server(redis_url: str, prefix: str, ttl: float) -> dict[str, int]:
    """"Who is online", counted by server (blocking: call it in a thread)."""
    from notifications.presence import RedisPresence

    counts: dict[str, int] = {}
    for connection in RedisPresence(url=redis_url, prefix=prefix, ttl=ttl).online():
        counts[connection.server] = counts.get(connection.server, 0) + 1
    return counts


async def probe_handshake(server: LiveServer, token: str, timeout: float = 5.0) -> str:
    """What a new client sees when it connects now: its first frame's type and code, then how
    the connection ended (or the HTTP status of a refused handshake)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    try:
        async with asyncio.timeout(timeout):
            async with connect(f"{ws_base(server)}{WS_PATH}", additional_headers={"Authorization": f"Bearer {token}"},
                               subprotocols=[SUBPROTOCOL]) as ws:
                seen = []
                try:
                    async for text in ws:
                        frame = json.loads(text)
                        seen.append(frame.get("code") or frame.get("type"))
                        if frame.get("type") == "hello":
                            break
                except ConnectionClosed:
                    pass
                rcvd = ws.protocol.close_rcvd
                ended = "open" if rcvd is None and ws.protocol.state.name == "OPEN" else (
                    f"close {rcvd.code}" if rcvd else "dropped")
                return f"frames {seen}, {ended}"
    except InvalidStatus as exc:
        return f"handshake refused: HTTP {exc.response.status_code}"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, ConnectionClosed) as exc:
        return f"{type(exc).__name__}: {exc}"


# Scenario 1: Redis restarted mid-stream


async def redis_restarted(world: World, *, clients: int = 50, before: int = 10, during: int = 10, after: int = 10,
                          rate: float = 20.0, outage: float = 3.0, drop: int = 5, server_kind: str = "daphne",
                          deliver_timeout: float = 60.0) -> Outcome:
    """A private Redis for one server process; Redis is stopped while notifications are sent
    (the API stores them: 201), kept down for ``outage`` seconds, and started again on the same
    port (empty: the group membership is gone). ``drop`` clients lose their connection at
    the start of the outage and must resume while Redis is down. The server must keep
    running, rejoin the group and deliver everything (from the store for what the channel
    layer lost)."""
    started = time.monotonic()
    facts: dict = {}
    redis_server = RedisServer(world.log_dir / "private-redis.log").start()
    try:
        server = await world.start(server_kind, "redis-restart", REDIS_URL=redis_server.url)
        assignments = world.assign(clients)
        ledger = Ledger()
        connected = await start_clients([m.token for m in assignments], [ws_base(server)])
        try:
            await send_notifications(world, server, ledger, count=before, rate=rate)
            await asyncio.to_thread(redis_server.stop)
            down_at = time.monotonic()
            refused_before = len(ledger.refused)
            # Some clients lose their connection during the outage and resume while Redis is down.
            dropped = connected[:drop]
            await asyncio.gather(*(c.drop() for c in dropped))
            await send_notifications(world, server, ledger, count=during, rate=rate)
            facts["dropped_resumed_while_down"] = await wait_until(
                lambda: all(c.ready.is_set() and c.hellos > 1 for c in dropped), max(1.0, outage))
            sent_while_down = ledger.sent
            ready = await asyncio.to_thread(http_request, server, "GET", "/readyz")
            facts["readyz_while_down"] = {"status": ready.status, "body": ready.text[:300]}
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - down_at)))
            await asyncio.to_thread(redis_server.start)
            facts["readyz_recovered"] = await wait_until(
                lambda: http_request(server, "GET", "/readyz").status == 200, 10, interval=0.2)
            await send_notifications(world, server, ledger, count=after, rate=rate)
            complete = await _deliver(connected, ledger, assignments, deliver_timeout)
            log = server.log()  # before the clients leave: their goodbyes are not part of the fault
        finally:
            await stop_clients(connected)
        report = compare(connected, _expected(ledger, assignments), ledger.sent)
        trouble = log_trouble(log)
        facts |= {
            "server_alive": server.process.poll() is None,
            "refused_sends": ledger.refused,
            "refused_while_down": len(ledger.refused) - refused_before,
            "sent_before_restart": sent_while_down,
            "tracebacks": trouble["tracebacks"],
            "error_lines": trouble["errors"],
            "push_failed_lines": sum("push failed" in line for line in trouble["errors"]),
        }
    finally:
        await asyncio.to_thread(world.stop_all)  # before Redis, so that the server's last presence writes find it
        await asyncio.to_thread(redis_server.stop)
    return Outcome("redis_restarted", report, time.monotonic() - started, complete, facts)


# Scenarios 2 and 3: the clients' server process killed (SIGTERM or SIGKILL)


async def server_killed(world: World, *, sig: signal.Signals, clients: int = 200, rate: float = 20.0,
                        before: float = 2.0, after: float = 4.0, presence_ttl: int = 3,
                        deliver_timeout: float = 90.0) -> Outcome:
    """Two uvicorn processes, A and B, on one Redis. Clients connect to A; a sender posts at a
    steady rate through B's API; after ``before`` seconds A gets ``sig``. Clients fail over to
    B, resume with ``?since=`` and must end with the complete sequence. With SIGKILL, A's
    presence entries must leave "who is online" within ``presence_ttl`` seconds."""
    started = time.monotonic()
    tag = sig.name.lower()
    name_a, name_b = f"{tag}-A", f"{tag}-B"
    server_a, server_b = await asyncio.gather(
        world.start("uvicorn", name_a, PRESENCE_TTL=presence_ttl),
        world.start("uvicorn", name_b, PRESENCE_TTL=presence_ttl),
    )
    assignments = world.assign(clients)
    ledger = Ledger()
    online = lambda: asyncio.to_thread(presence_by_server, world.redis_url, world.prefix, presence_ttl)  # noqa: E731
    connected = await start_clients([m.token for m in assignments], [ws_base(server_a), ws_base(server_b)])
    facts: dict = {}
    try:
        facts["online_on_A_before"] = (await online()).get(name_a, 0)
        total = round(rate * (before + after))
        sender = asyncio.create_task(send_notifications(world, server_b, ledger, count=total, rate=rate))
        await asyncio.sleep(before)
        killed_at = time.monotonic()
        server_a.process.send_signal(sig)
        if sig == signal.SIGKILL:
            deadline = killed_at + presence_ttl + 10
            while time.monotonic() < deadline and (await online()).get(name_a, 0):
                await asyncio.sleep(0.1)
            remaining = (await online()).get(name_a, 0)
            facts["presence_A_gone_after"] = None if remaining else round(time.monotonic() - killed_at, 2)
        try:
            await asyncio.to_thread(server_a.process.wait, 20)
        except subprocess.TimeoutExpired:
            server_a.process.kill()
        facts["A_exit_seconds"] = round(time.monotonic() - killed_at, 2)
        facts["A_returncode"] = server_a.process.returncode
        # A graceful shutdown removes its connections from presence itself (no TTL wait).
        facts["online_on_A_at_exit"] = (await online()).get(name_a, 0)
        await sender
        complete = await _deliver(connected, ledger, assignments, deliver_timeout)
        await wait_until(lambda: all(c.ready.is_set() for c in connected), 10)
        presence = await online()
        facts["online_on_A_after"] = presence.get(name_a, 0)
        facts["online_on_B_after"] = presence.get(name_b, 0)
    finally:
        await stop_clients(connected)
    report = compare(connected, _expected(ledger, assignments), ledger.sent)
    facts["refused_sends"] = ledger.refused
    facts["first_close_codes"] = sorted({str(c.close_codes[0]) if c.close_codes else "-" for c in connected})
    for name, server in ((name_a, server_a), (name_b, server_b)):
        trouble = log_trouble(server.log())
        facts[f"{name}_tracebacks"] = trouble["tracebacks"]
        facts[f"{name}_error_lines"] = trouble["errors"]
    return Outcome(f"server_killed_{tag}", report, time.monotonic() - started, complete, facts)


# Scenario 3b: rolling restart


async def rolling_restart(world: World, *, clients: int = 100, rate: float = 20.0, phase: float = 2.0,
                          deliver_timeout: float = 90.0, connect_timeout: float = 60.0) -> Outcome:
    """Two uvicorn processes, A and B, each with half the clients; notifications keep coming at
    ``rate``. A is restarted (SIGTERM, then a new process on the same port) while B takes its
    clients and the sends; then B is restarted while the new A does. Nothing may be lost."""
    started = time.monotonic()
    server_a, server_b = await asyncio.gather(world.start("uvicorn", "roll-A"), world.start("uvicorn", "roll-B"))
    assignments = world.assign(clients)
    ledger = Ledger()
    half = clients // 2
    tokens = [m.token for m in assignments]
    on_a = await start_clients(tokens[:half], [ws_base(server_a), ws_base(server_b)], connect_timeout=connect_timeout)
    on_b = await start_clients(tokens[half:], [ws_base(server_b), ws_base(server_a)], connect_timeout=connect_timeout)
    for offset, client in enumerate(on_b):
        client.name = str(half + offset)
    connected = on_a + on_b
    facts: dict = {}
    count = round(rate * phase)
    try:
        await send_notifications(world, server_b, ledger, count=count, rate=rate)
        # Restart A while B serves.
        sender = asyncio.create_task(send_notifications(world, server_b, ledger, count=count, rate=rate))
        await asyncio.to_thread(server_a.stop)
        server_a2 = await world.start("uvicorn", "roll-A2", port=server_a.port)
        await sender
        facts["all_live_after_A"] = await wait_until(lambda: all(c.ready.is_set() for c in connected), connect_timeout)
        # Restart B while the new A serves.
        sender = asyncio.create_task(send_notifications(world, server_a2, ledger, count=count, rate=rate))
        await asyncio.to_thread(server_b.stop)
        server_b2 = await world.start("uvicorn", "roll-B2", port=server_b.port)
        await sender
        facts["all_live_after_B"] = await wait_until(lambda: all(c.ready.is_set() for c in connected), connect_timeout)
        await send_notifications(world, server_b2, ledger, count=count, rate=rate)
        complete = await _deliver(connected, ledger, assignments, deliver_timeout)
    finally:
        await stop_clients(connected)
    report = compare(connected, _expected(ledger, assignments), ledger.sent)
    facts["refused_sends"] = ledger.refused
    for name in ("roll-A", "roll-B", "roll-A2", "roll-B2"):
        trouble = log_trouble((world.log_dir / f"{name}.log").read_text(errors="replace"))
        facts[f"{name}_tracebacks"] = trouble["tracebacks"]
    return Outcome("rolling_restart", report, time.monotonic() - started, complete, facts)


# Scenario 4: reconnect storm


async def reconnect_storm(world: World, *, clients: int = 1000, before: int = 8, during: int = 8, after: int = 8,
                          rate: float = 20.0, backoff: Backoff | None = None, connect_timeout: float = 150.0,
                          deliver_timeout: float = 90.0) -> Outcome:
    """``clients`` connections on server A; A is restarted (SIGTERM: every client is closed at
    once with 1012, then a new process on the same port) while a sender keeps posting
    through server B; every client reconnects with jittered exponential backoff, resumes,
    and must end with everything."""
    backoff = backoff or Backoff(base=0.25, cap=4.0)
    started = time.monotonic()
    server_a, server_b = await asyncio.gather(world.start("uvicorn", "storm-A"), world.start("uvicorn", "storm-B"))
    assignments = world.assign(clients)
    ledger = Ledger()
    facts: dict = {}
    t = time.monotonic()
    connected = await start_clients([m.token for m in assignments], [ws_base(server_a)], backoff=backoff,
                                    connect_timeout=connect_timeout)
    facts["connect_seconds"] = round(time.monotonic() - t, 1)
    try:
        await send_notifications(world, server_b, ledger, count=before, rate=rate)
        facts["delivered_before_restart"] = await _deliver(connected, ledger, assignments, deliver_timeout)
        restarted_at = time.monotonic()
        sender = asyncio.create_task(send_notifications(world, server_b, ledger, count=during, rate=rate))
        await asyncio.to_thread(server_a.stop)  # SIGTERM: uvicorn closes every socket with 1012
        facts["A_stop_seconds"] = round(time.monotonic() - restarted_at, 1)
        # A graceful shutdown removes its connections from presence itself (no TTL wait).
        presence = await asyncio.to_thread(presence_by_server, world.redis_url, world.prefix, PRESENCE_TTL_DEFAULT)
        facts["online_on_A_at_exit"] = presence.get("storm-A", 0)
        server_a2 = await world.start("uvicorn", "storm-A2", port=server_a.port)
        facts["A_restart_seconds"] = round(time.monotonic() - restarted_at, 1)
        await sender
        all_back = await wait_until(lambda: all(c.ready.is_set() and c.hellos > 1 for c in connected),
                                    connect_timeout)
        facts["all_back_seconds"] = round(time.monotonic() - restarted_at, 1) if all_back else None
        facts["still_away"] = sum(not (c.ready.is_set() and c.hellos > 1) for c in connected)
        presence = await asyncio.to_thread(presence_by_server, world.redis_url, world.prefix, PRESENCE_TTL_DEFAULT)
        facts["online_on_A2_after"] = presence.get("storm-A2", 0)
        await send_notifications(world, server_b, ledger, count=after, rate=rate)
        complete = await _deliver(connected, ledger, assignments, deliver_timeout)
        facts["A2_alive"] = server_a2.process.poll() is None
    finally:
        await stop_clients(connected)
    report = compare(connected, _expected(ledger, assignments), ledger.sent)
    facts["refused_sends"] = ledger.refused
    facts["max_failed_attempts"] = max((c.failed_attempts for c in connected), default=0)
    for name in ("storm-A", "storm-A2", "storm-B"):
        path = world.log_dir / f"{name}.log"
        trouble = log_trouble(path.read_text(errors="replace")) if path.exists() else {"tracebacks": 0, "errors": []}
        facts[f"{name}_tracebacks"] = trouble["tracebacks"]
        facts[f"{name}_error_lines"] = trouble["errors"][:20]
    return Outcome("reconnect_storm", report, time.monotonic() - started, complete, facts)


# Scenario 5: the database briefly unavailable


async def database_unavailable(world: World, *, clients: int = 20, before: int = 8, during: int = 5,
                               after: int = 8, rate: float = 10.0, outage: float = 3.0,
                               deliver_timeout: float = 60.0) -> Outcome:
    """A TCP proxy between one server process and PostgreSQL. With the proxy cut, the API
    must answer 503 JSON ``unavailable`` (nothing stored), connected clients must stay
    connected and answer pings; once restored, sends work again and reach the clients."""
    started = time.monotonic()
    target = urlsplit(world.db_url)
    proxy = await TcpProxy(target.hostname or HOST, target.port or 5432).start()
    facts: dict = {}
    try:
        server = await world.start("daphne", "db-outage", DATABASE_URL=proxied_url(world.db_url, proxy.port))
        assignments = world.assign(clients)
        ledger = Ledger()
        connected = await start_clients([m.token for m in assignments], [ws_base(server)])
        try:
            await send_notifications(world, server, ledger, count=before, rate=rate)
            facts["delivered_before_cut"] = await _deliver(connected, ledger, assignments, deliver_timeout)
            sent_before = ledger.sent
            proxy.cut()
            cut_at = time.monotonic()
            await send_notifications(world, server, ledger, count=during, rate=rate)
            facts["stored_while_cut"] = ledger.sent - sent_before
            facts["refused_while_cut"] = list(ledger.refused)
            ready = await asyncio.to_thread(http_request, server, "GET", "/readyz")
            facts["readyz_while_cut"] = {"status": ready.status, "body": ready.text[:300]}
            facts["new_connection_while_cut"] = await probe_handshake(server, world.members[0].token)
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - cut_at)))
            pongs = await asyncio.gather(*(c.ping() for c in connected))
            facts["pongs_while_cut"] = sum(pongs)
            facts["closed_while_cut"] = sum(bool(c.close_codes) for c in connected)
            facts["proxy_refused"] = proxy.refused
            proxy.restore()
            refused_before = len(ledger.refused)
            # Sent as a client should: a 503 with Retry-After (a pooled connection that died in the
            # cut, found dead on its first use after it) is tried again after that delay.
            facts["retried_after_restore"] = []
            await send_notifications(world, server, ledger, count=after, rate=rate,
                                     retries=facts["retried_after_restore"])
            facts["refused_after_restore"] = ledger.refused[refused_before:]
            complete = await _deliver(connected, ledger, assignments, deliver_timeout)
            facts["closed_total"] = sum(len(c.close_codes) for c in connected)
        finally:
            await stop_clients(connected)
        report = compare(connected, _expected(ledger, assignments), ledger.sent)
        await asyncio.to_thread(server.stop)
        trouble = log_trouble(server.log())
        facts["tracebacks"] = trouble["tracebacks"]
        facts["error_lines"] = trouble["errors"]
    finally:
        await proxy.close()
    return Outcome("database_unavailable", report, time.monotonic() - started, complete, facts)
