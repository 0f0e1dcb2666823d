"""End-to-end tests against a real daphne process (``daphne -b 127.0.0.1 -p PORT project.asgi:application``).

The server shares the pytest-django test database (SQLite file or PostgreSQL) and the real
Redis (a unique channel-layer prefix). Users, tokens and topics are created in the test
process; notifications are sent the way users send them, through the server's REST API.
A test fails if daphne logs a traceback or an ERROR line while it runs.
"""

import asyncio
import contextlib
import json
import uuid

import pytest
import redis
from asgiref.sync import sync_to_async
from django.db import connections
from websockets.exceptions import ConnectionClosed

from notifications.protocol import CLIENT_TYPES
from tests.conftest import since
from tests.server import (
    WS_PATH,
    LiveServer,
    database_url,
    expect_close,
    expect_no_frame,
    http_async,
    recv_json,
    send_json,
    server_trouble,
    session_login,
    start_daphne,
    ws_connect,
)
from tests.support import PASSWORD, session_cookie

pytestmark = [pytest.mark.server, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

SUBPROTOCOL = "notifications.v2"
MAX_FRAME_BYTES = 64 * 1024  # the documented default of WS_MAX_FRAME_BYTES
TICKET_TTL = 30  # the documented default of WS_TICKET_TTL
EXTRA_ORIGIN = "https://app.example.test"  # allowed through WS_ALLOWED_ORIGINS
IDLE_SECONDS = 6.5  # longer than channels-redis's blocking read (brpop_timeout, 5 s)
REDIS_READ_TIMEOUT = "channel layer receive failed, retrying: TimeoutError: Timeout reading from"
# Server log lines that are expected (none: every ERROR line fails the test that caused it).
KNOWN_SERVER_ERRORS: tuple[str, ...] = ()


# Fixtures


@pytest.fixture(scope="session")
def daphne_server(django_db_setup, redis_url, tmp_path_factory):
    """One daphne process for the session, on the test database and the real Redis."""
    from django.conf import settings
    from django.db import connection

    prefix = f"test-server-{uuid.uuid4().hex[:8]}"
    env = {
        "DATABASE_URL": database_url(connection.settings_dict),
        "REDIS_URL": redis_url,
        "CHANNELS_PREFIX": prefix,
        "DEBUG": "1",
        "SECRET_KEY": settings.SECRET_KEY,  # sessions made in this process must verify there
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "WS_ALLOWED_ORIGINS": EXTRA_ORIGIN,
        # Every test connects from 127.0.0.1: the failed-credential throttle is tested elsewhere.
        "AUTH_FAILURES_PER_MINUTE": "100000",
        # Between two tests the database is flushed and the stream row put back (the `stream`
        # fixture); a hub check landing in between would see a replaced store and close every
        # socket (4012, tested in tests/test_resume.py). This server's hub does not check.
        "HUB_SYNC_INTERVAL": "3600",
    }
    server = start_daphne(env, tmp_path_factory.mktemp("daphne") / "daphne.log")
    try:
        yield server
    finally:
        server.stop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
    log = server.log()
    assert not server_trouble(log, KNOWN_SERVER_ERRORS), f"daphne logged errors between tests:\n{log}"


@pytest.fixture
def live(daphne_server: LiveServer, stream):
    """The running server; the test fails if daphne logs a traceback or an error during it
    (except the lines of ``KNOWN_SERVER_ERRORS``)."""
    assert daphne_server.process.poll() is None, f"daphne exited:\n{daphne_server.log()}"
    start = daphne_server.log_size()
    yield daphne_server
    new_log = daphne_server.log_since(start)
    assert not server_trouble(new_log, KNOWN_SERVER_ERRORS), f"daphne logged errors during this test:\n{new_log}"


async def expect_app_close(ws, code: int):
    """The server closes with an application code. (Daphne lets an application send only 1000 and
    3000-4999, so the service uses 4009 and 4400 where RFC 6455 has 1009 and 1008.)"""
    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None, "dropped without a close frame"
    assert closed.value.rcvd.code == code


_kept_streams: dict = {}


@pytest.fixture
def stream():
    """The store's epoch and every stream's head, kept across tests.

    Offsets are gap-free per stream, numbered by the ``Stream`` rows; a running server's hub
    remembers the next offset it expects in each stream it reads. A transactional test's flush
    deletes the rows, and the next broadcast would start again at offset 1, which a running hub
    takes for a store that went back. A production database never does that, so each test
    continues the streams where the previous one left them (same epoch, same heads).
    """
    from notifications.models import Store, Stream

    if _kept_streams:
        Store.objects.update_or_create(pk=1, defaults={"epoch": _kept_streams["epoch"]})
        for key, head in _kept_streams["heads"].items():
            Stream.objects.update_or_create(key=key, defaults={"head": head})
    # The migration creates the row; an earlier transactional test may have flushed it.
    row, _ = Store.objects.get_or_create(pk=1, defaults={"epoch": uuid.uuid4().hex[:16]})
    yield row
    epoch = Store.objects.filter(pk=1).values_list("epoch", flat=True).first()
    if epoch:
        _kept_streams.update(epoch=epoch, heads=dict(Stream.objects.values_list("key", "head")))


@pytest.fixture
async def open_ws(live):
    """Factory: ``await open_ws(token=..., ...)`` opens a WebSocket, closed at teardown."""
    opened = []

    async def open_(**kwargs):
        ws = await ws_connect(live, **kwargs)
        opened.append(ws)
        return ws

    yield open_
    for ws in opened:
        await ws.close()


@pytest.fixture
def tab(open_ws):
    """Factory: ``ws, hello = await tab(token)``: a connected tab and its hello frame."""

    async def open_tab(token=None, **kwargs):
        ws = await open_ws(token=token, **kwargs)
        hello = await recv_json(ws)
        assert hello["type"] == "hello", hello
        return ws, hello

    return open_tab


@pytest.fixture
def send(live, staff_token):
    """``await send(title=..., users=[...]|topic=...|broadcast=True)`` through the REST API as staff."""

    async def send_(**payload) -> list[dict]:
        response = await http_async(live, "POST", "/api/notifications/", token=staff_token, json_body=payload)
        assert response.status == 201, response.text
        return response.json()["notifications"]

    return send_


@pytest.fixture
def alice_password(alice) -> str:
    """Alice's password, hashed so that the server can check it: the test process may use a fast
    hasher (conftest) that the server's PASSWORD_HASHERS do not list."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    hasher = PBKDF2PasswordHasher()
    alice.password = hasher.encode(PASSWORD, hasher.salt(), iterations=1000)  # few iterations: fast
    alice.save(update_fields=["password"])
    return PASSWORD


@pytest.fixture
def alice_session(alice) -> dict[str, str]:
    """Alice's session cookie, as a browser that signed in holds it."""
    return {"sessionid": session_cookie(alice)}


@pytest.fixture
def server_layer(settings, daphne_server):
    """Point this process's channel layer at the server's (same Redis, same prefix), so Django
    code run here (a service, a management command, a worker) pushes to the server's sockets."""
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [daphne_server.env["REDIS_URL"]], "prefix": daphne_server.env["CHANNELS_PREFIX"]},
        }
    }


@pytest.fixture
def revoked_token(alice, server_layer) -> str:
    from notifications.auth import token_create, token_revoke

    token, raw = token_create(user=alice)
    token_revoke(token)
    return raw


@pytest.fixture
def deploys():
    from notifications.models import Topic

    return Topic.objects.create(slug="deploys", title="Deploys")


def in_thread(fn):
    """``sync_to_async`` for ORM code in an async test, closing the worker thread's database
    connection afterwards: with CONN_MAX_AGE it would stay open, and PostgreSQL refuses to
    drop a test database that still has a session."""

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            connections.close_all()

    return sync_to_async(call)


def hello_for(user, stream, *, unread_count: int = 0, topics=()) -> dict:
    from notifications.models import Stream, Topic

    heads = dict(Stream.objects.values_list("key", "head"))
    followed = Topic.objects.filter(slug__in=topics).values_list("pk", flat=True)
    reads = [f"u.{user.pk}", "b", *(f"t.{pk}" for pk in followed)]
    return {
        "type": "hello",
        "protocol": SUBPROTOCOL,
        "version": 2,
        "user": {"id": user.pk, "username": user.username},
        "unread_count": unread_count,
        "topics": list(topics),
        "cursor": {key: heads.get(key, 0) for key in reads},
        "epoch": stream.epoch,
        "max_frame_bytes": MAX_FRAME_BYTES,
    }


def unordered(*frames: dict) -> list[str]:
    return sorted(json.dumps(f, sort_keys=True) for f in frames)


async def recv_unordered(ws, count: int) -> list[str]:
    """The next ``count`` frames, in a form that compares equal to ``unordered(...)`` in any order."""
    return unordered(*[await recv_json(ws) for _ in range(count)])


def notification_frame(payload: dict) -> dict:
    """The pushed frame is the API's representation of the notification plus its type and its
    position (stream and offset)."""
    from notifications.models import Notification
    from notifications.streams import stream_of

    row = Notification.objects.get(pk=payload["id"])
    return {"type": "notification", **payload, "stream": stream_of(row), "offset": row.offset}


def frame_of(payload: dict):
    return in_thread(notification_frame)(payload)


def hello_of(user, stream, **kwargs):
    return in_thread(hello_for)(user, stream, **kwargs)


async def expect_refused(ws, code: str, message: str, close_code: int):
    """A refused handshake: accepted, one error frame, then a close with ``close_code``."""
    assert await recv_json(ws) == {"type": "error", "code": code, "message": message}
    await expect_close(ws, close_code)


# HTTP and WebSocket on one port


async def test_http_and_websocket_on_the_same_port(live, tab, stream, alice, alice_token):
    schema = await http_async(live, "GET", "/api/openapi.json")
    assert schema.status == 200
    assert schema.headers["Content-Type"].startswith("application/json")
    assert schema.json()["info"]["title"] == "Notifications API"
    assert "/api/notifications/" in schema.json()["paths"]

    anonymous = await http_async(live, "GET", "/api/notifications/unread-count/")
    assert anonymous.status == 401
    assert anonymous.json()["error"]["code"] == "unauthenticated"
    counted = await http_async(live, "GET", "/api/notifications/unread-count/", token=alice_token)
    assert (counted.status, counted.json()) == (200, {"unread_count": 0})

    ws, hello = await tab(alice_token)
    assert hello == await hello_of(alice, stream)


# Handshake authentication


async def test_bearer_header_negotiates_the_subprotocol(tab, stream, alice, alice_token):
    ws, hello = await tab(alice_token, subprotocols=["something.else", SUBPROTOCOL])
    assert ws.subprotocol == SUBPROTOCOL
    assert hello == await hello_of(alice, stream)

    plain, hello = await tab(alice_token)  # a client that offers no subprotocol gets none
    assert plain.subprotocol is None
    assert hello == await hello_of(alice, stream)

    # ping/pong proves the connection is live, not just greeted
    await send_json(ws, {"type": "ping", "id": "p-1"})
    assert await recv_json(ws) == {"type": "pong", "id": "p-1"}


async def test_session_cookie_from_a_real_login_with_allowed_origin(live, tab, stream, alice, alice_password):
    sessionid = await asyncio.to_thread(session_login, live, "alice", alice_password)
    ws, hello = await tab(cookies={"sessionid": sessionid}, origin=live.origin, subprotocols=[SUBPROTOCOL])
    assert ws.subprotocol == SUBPROTOCOL
    assert hello == await hello_of(alice, stream)


async def test_session_cookie_with_an_origin_from_the_allow_list(tab, stream, alice, alice_session):
    ws, hello = await tab(cookies=alice_session, origin=EXTRA_ORIGIN)
    assert hello == await hello_of(alice, stream)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example", "http://127.0.0.1.evil.example", "null", "https://app.example.test.evil",
        # An allowed host on another port is another origin (another web server on the same machine).
        "http://127.0.0.1:1", "http://localhost:8000", "https://127.0.0.1",
    ],
)
async def test_session_cookie_with_foreign_origin_is_refused(open_ws, alice_session, origin):
    ws = await open_ws(cookies=alice_session, origin=origin, subprotocols=[SUBPROTOCOL])
    await expect_refused(ws, "origin_not_allowed", "Cookie authentication needs an allowed Origin.", 4003)


async def test_session_cookie_without_origin_is_refused(open_ws, alice_session):
    ws = await open_ws(cookies=alice_session)
    await expect_refused(ws, "origin_not_allowed", "Cookie authentication needs an allowed Origin.", 4003)


@pytest.mark.parametrize(
    ("headers", "code", "message"),
    [
        ({}, "unauthenticated", "Authentication required: a Bearer token, a ticket or a session."),
        ({"Authorization": "Bearer ntf_nope_nope"}, "invalid_token", "The token is not valid."),
        ({"Authorization": "Basic YWxpY2U6cHc="}, "invalid_authorization", "Use 'Authorization: Bearer <token>'."),
    ],
    ids=["no-credentials", "unknown-token", "not-bearer"],
)
async def test_missing_or_invalid_credentials_close_4001(open_ws, headers, code, message):
    ws = await open_ws(headers=headers)
    await expect_refused(ws, code, message, 4001)


@pytest.mark.parametrize("param", ["token", "access_token"])
async def test_token_in_query_string_is_refused(open_ws, alice_token, param):
    # Refused even with a valid Authorization header: the URL already leaked the token to logs.
    for token in (None, alice_token):
        ws = await open_ws(token=token, query={param: alice_token})
        await expect_refused(
            ws,
            "token_in_query",
            "Tokens are not accepted in the URL; send 'Authorization: Bearer' or use a ticket.",
            4001,
        )


async def test_revoked_token_closes_4003(open_ws, revoked_token):
    ws = await open_ws(token=revoked_token)
    await expect_refused(ws, "token_revoked", "The token was revoked.", 4003)


async def test_ticket_works_once(live, tab, open_ws, stream, alice, alice_token):
    issued = await http_async(live, "POST", "/api/ws-ticket/", token=alice_token)
    assert issued.status == 201, issued.text
    body = issued.json()
    ticket = body["ticket"]
    assert body == {"ticket": ticket, "expires_in": TICKET_TTL, "url": f"{WS_PATH}?ticket={ticket}"}

    path = body["url"].partition("?")[0]
    ws, hello = await tab(path=path, query={"ticket": ticket}, subprotocols=[SUBPROTOCOL])
    assert hello == await hello_of(alice, stream)
    assert ws.subprotocol == SUBPROTOCOL

    reused = await open_ws(path=path, query={"ticket": ticket})
    await expect_refused(reused, "invalid_ticket", "The ticket is unknown, used or expired.", 4001)


# Delivery


async def test_every_tab_of_the_recipient_receives_and_no_one_else(tab, send, alice, bob, alice_token, bob_token):
    alice_1, _ = await tab(alice_token, subprotocols=[SUBPROTOCOL])
    alice_2, _ = await tab(alice_token)
    bob_tab, _ = await tab(bob_token)

    data = {"order": 42, "tags": ["a", "b"], "nested": {"ok": True, "none": None}, "text": "naïve ✓"}
    [sent] = await send(title="Your order shipped", body="Tracking inside", level="success", data=data,
                        link="/orders/42", users=["alice"])
    assert sent == {
        "id": sent["id"], "audience": "user", "title": "Your order shipped", "body": "Tracking inside",
        "level": "success", "data": data, "link": "/orders/42", "topic": None, "actor": "staff",
        "created_at": sent["created_at"], "read": False,
    }
    assert await recv_json(alice_1) == await frame_of(sent)
    assert await recv_json(alice_2) == await frame_of(sent)

    # Bob's next frame is his own notification, sent after Alice's: had Alice's reached his
    # connection it would have been queued first. The short wait catches a late delivery too.
    await expect_no_frame(bob_tab, timeout=0.3)
    [for_bob] = await send(title="For Bob", users=[bob.pk])
    assert await recv_json(bob_tab) == await frame_of(for_bob)
    await expect_no_frame(alice_1, timeout=0.3)


async def test_broadcast_reaches_every_connected_user(tab, send, alice_token, bob_token, staff_token):
    tabs = [(await tab(token))[0] for token in (alice_token, alice_token, bob_token, staff_token)]
    [sent] = await send(title="Maintenance at 22:00", level="warning", broadcast=True)
    assert sent["audience"] == "broadcast"
    for ws in tabs:
        assert await recv_json(ws) == await frame_of(sent)


async def test_topic_send_reaches_followers_only(live, tab, send, stream, deploys, alice, bob, staff,
                                                 alice_token, bob_token, staff_token):
    followed = await http_async(live, "POST", "/api/topics/deploys/follow/", token=staff_token)
    assert (followed.status, followed.json()) == (200, {"topic": "deploys", "following": True})
    staff_tab, hello = await tab(staff_token)
    assert hello == await hello_of(staff, stream, topics=["deploys"])
    alice_tab, _ = await tab(alice_token)
    bob_1, _ = await tab(bob_token)
    bob_2, _ = await tab(bob_token)

    # Following from one tab joins every tab of the user.
    await send_json(bob_1, {"type": "subscribe", "topic": "deploys", "id": "s-1"})
    position = {"stream": f"t.{deploys.pk}", "offset": 0}
    assert await recv_json(bob_1) == {"type": "subscribed", "topic": "deploys", **position, "id": "s-1"}
    assert await recv_json(bob_2) == {"type": "subscribed", "topic": "deploys", **position}

    [sent] = await send(title="Deployed v2", topic="deploys")
    assert (sent["audience"], sent["topic"]) == ("topic", "deploys")
    for ws in (staff_tab, bob_1, bob_2):
        assert await recv_json(ws) == await frame_of(sent)
    [for_alice] = await send(title="Only for Alice", users=["alice"])
    assert await recv_json(alice_tab) == await frame_of(for_alice)  # not the topic notification

    # Unfollowing from one tab leaves the topic on every tab.
    await send_json(bob_2, {"type": "unsubscribe", "topic": "deploys", "id": 9})
    assert await recv_json(bob_2) == {"type": "unsubscribed", "topic": "deploys", "stream": f"t.{deploys.pk}", "id": 9}
    assert await recv_json(bob_1) == {"type": "unsubscribed", "topic": "deploys", "stream": f"t.{deploys.pk}"}
    [again] = await send(title="Deployed v3", topic="deploys")
    assert await recv_json(staff_tab) == await frame_of(again)
    [for_bob] = await send(title="Only for Bob", users=["bob"])
    for ws in (bob_1, bob_2):
        assert await recv_json(ws) == await frame_of(for_bob)


async def test_unread_count_reaches_every_tab(live, tab, send, alice_token, bob_token):
    tab_1, _ = await tab(alice_token)
    tab_2, _ = await tab(alice_token)
    bob_tab, _ = await tab(bob_token)
    sent = [(await send(title=f"n{i}", users=["alice"]))[0] for i in range(3)]
    for ws in (tab_1, tab_2):
        assert [await recv_json(ws) for _ in sent] == [await frame_of(n) for n in sent]

    # mark_read from tab 1: an ack there; what was read and the new count on both tabs (on
    # tab 1 the pushed frames and the ack are independent and may come in either order)
    first = sent[0]["id"]
    await send_json(tab_1, {"type": "mark_read", "ids": [first], "id": "r-1"})
    assert await recv_unordered(tab_1, 3) == unordered(
        {"type": "ack", "op": "mark_read", "unread_count": 2, "id": "r-1"},
        {"type": "read", "ids": [first]}, {"type": "unread_count", "count": 2},
    )
    assert [await recv_json(tab_2) for _ in range(2)] == [
        {"type": "read", "ids": [first]}, {"type": "unread_count", "count": 2},
    ]

    # the REST API updates the open tabs too
    read = await http_async(live, "POST", f"/api/notifications/{sent[1]['id']}/read/", token=alice_token)
    assert (read.status, read.json()) == (200, {"id": sent[1]["id"], "unread_count": 1})
    for ws in (tab_1, tab_2):
        assert [await recv_json(ws) for _ in range(2)] == [
            {"type": "read", "ids": [sent[1]["id"]]}, {"type": "unread_count", "count": 1},
        ]

    # mark_all_read from tab 2
    await send_json(tab_2, {"type": "mark_all_read", "id": 7})
    assert await recv_unordered(tab_2, 3) == unordered(
        {"type": "ack", "op": "mark_all_read", "unread_count": 0, "id": 7},
        {"type": "read", "all": True}, {"type": "unread_count", "count": 0},
    )
    assert [await recv_json(tab_1) for _ in range(2)] == [
        {"type": "read", "all": True}, {"type": "unread_count", "count": 0},
    ]

    counted = await http_async(live, "GET", "/api/notifications/unread-count/", token=alice_token)
    assert counted.json() == {"unread_count": 0}
    # Bob's connection saw none of it: his next frame answers his own ping.
    await send_json(bob_tab, {"type": "ping", "id": "b"})
    assert await recv_json(bob_tab) == {"type": "pong", "id": "b"}
    _, hello = await tab(alice_token)
    assert hello["unread_count"] == 0


async def test_django_code_in_another_process_pushes_after_commit_only(tab, alice, alice_token, server_layer):
    """``notification_send`` called here (as a worker or a management command would) reaches
    the daphne process's sockets through Redis, and a rolled-back send pushes nothing."""
    from django.db import transaction

    from notifications import services
    from notifications.protocol import notification_payload

    ws, _ = await tab(alice_token)

    @in_thread
    def send_then_roll_back():
        with contextlib.suppress(RuntimeError), transaction.atomic():
            services.notification_send(title="Never pushed", users=[alice])
            raise RuntimeError("roll back")

    @in_thread
    def send(**fields):
        [row] = services.notification_send(users=[alice], **fields)
        return notification_payload(row, is_read=False)

    await send_then_roll_back()
    payload = await send(title="Committed", level="error", data={"build": 7, "ok": False})
    # The rolled-back notification would have been queued before this one.
    assert await recv_json(ws) == await frame_of(payload)
    await expect_no_frame(ws, timeout=0.3)


async def test_revoking_a_token_closes_its_live_connections_only(tab, alice, server_layer):
    """Revocation (here in this process, as the admin does) closes, on the server, the connections
    opened with that token: an error frame, then 4003. Other tokens' connections stay open."""
    from notifications.auth import token_create, token_revoke

    token, raw = await in_thread(token_create)(user=alice)
    _, other_raw = await in_thread(token_create)(user=alice)
    revoked_tab, _ = await tab(raw)
    other_tab, _ = await tab(other_raw)

    await in_thread(token_revoke)(token)
    assert await recv_json(revoked_tab) == {"type": "error", "code": "disconnected", "message": "token revoked"}
    await expect_close(revoked_tab, 4003)
    await send_json(other_tab, {"type": "ping", "id": "alive"})
    assert await recv_json(other_tab) == {"type": "pong", "id": "alive"}


async def test_reconnect_with_the_cursor_replays_what_was_missed(tab, send, stream, alice, bob, alice_token):
    ws, hello = await tab(alice_token)
    await ws.close()
    [missed] = await send(title="While you were away", users=["alice"])
    [not_alices] = await send(title="Not for Alice", users=["bob"])
    [everyone] = await send(title="For everyone", broadcast=True)

    ws, hello2 = await tab(alice_token, query={"since": since(hello["cursor"]), "epoch": hello["epoch"]})
    assert hello2["cursor"] == {**hello["cursor"], f"u.{alice.pk}": 1, "b": hello["cursor"]["b"] + 1}
    assert await recv_json(ws) == await frame_of(missed)
    assert await recv_json(ws) == await frame_of(everyone)
    assert await recv_json(ws) == {"type": "resumed", "recovered": True, "count": 2, "cursor": hello2["cursor"]}
    assert await recv_json(ws) == {"type": "unread_count", "count": 2}
    [live_one] = await send(title="Live again", users=["alice"])
    assert await recv_json(ws) == await frame_of(live_one)
    assert not_alices["id"] < everyone["id"]  # ids still grow, across streams too


async def test_a_client_resumes_across_a_server_restart(live, stream, alice, alice_token, server_layer, tmp_path):
    """A deploy: the client's server stops, a notification is sent while none runs (by a worker,
    here this process), a new server starts, and the client resumes from its cursor."""
    from notifications import services
    from notifications.protocol import notification_payload

    servers = []

    async def start(name):
        server = await asyncio.to_thread(start_daphne, live.env, tmp_path / f"{name}.log")
        servers.append(server)
        return server

    try:
        first = await start("first")
        ws = await ws_connect(first, token=alice_token)
        hello = await recv_json(ws)
        await asyncio.to_thread(first.stop)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        # Documented: 1001/1012 when the server says goodbye, 1006 when it just drops the TCP connection
        # (daphne 4.2 on SIGTERM).
        assert closed.value.rcvd is None or closed.value.rcvd.code in (1001, 1012)

        @in_thread
        def send_while_down():
            [row] = services.notification_send(title="Sent during the deploy", users=[alice])
            return notification_payload(row, is_read=False)

        missed = await send_while_down()
        second = await start("second")
        async with await ws_connect(second, token=alice_token,
                                    query={"since": since(hello["cursor"]), "epoch": hello["epoch"]}) as ws:
            resumed_at = (await recv_json(ws))["cursor"]
            assert resumed_at == {**hello["cursor"], f"u.{alice.pk}": 1}
            assert await recv_json(ws) == await frame_of(missed)
            assert await recv_json(ws) == {"type": "resumed", "recovered": True, "count": 1, "cursor": resumed_at}
            assert await recv_json(ws) == {"type": "unread_count", "count": 1}
    finally:
        for server in servers:
            await asyncio.to_thread(server.stop)
    for server in servers:
        log = server.log()
        assert not server_trouble(log, KNOWN_SERVER_ERRORS), f"a restarted daphne logged errors:\n{log}"


async def test_invalid_resume_cursor_gets_an_error_then_close_4400(live, open_ws, alice_token):
    from notifications.protocol import CURSOR_HELP

    ws = await open_ws(token=alice_token, query={"since": "yesterday"})
    assert await recv_json(ws) == {
        "type": "error", "code": "invalid", "fields": {"since": "invalid"}, "message": CURSOR_HELP,
    }
    await expect_app_close(ws, 4400)


# Bad input


BIG_PING = '{"type":"ping","id":"big"}'


async def test_frame_at_the_limit_is_accepted(tab, alice_token):
    ws, hello = await tab(alice_token)
    assert hello["max_frame_bytes"] == MAX_FRAME_BYTES
    await ws.send(BIG_PING + " " * (MAX_FRAME_BYTES - len(BIG_PING)))  # valid JSON, exactly at the limit
    assert await recv_json(ws) == {"type": "pong", "id": "big"}


OVERSIZE_FRAMES = {
    "ascii": BIG_PING + " " * (MAX_FRAME_BYTES - len(BIG_PING) + 1),  # one byte over
    # fewer characters than the limit, more UTF-8 bytes: the limit is in bytes
    "utf8": '{"type":"ping","pad":"' + "\u00e9" * (MAX_FRAME_BYTES // 2) + '"}',
}


@pytest.mark.parametrize("frame", list(OVERSIZE_FRAMES.values()), ids=list(OVERSIZE_FRAMES))
async def test_frame_over_the_limit_gets_an_error_then_close_4009(live, tab, alice_token, frame):
    assert len(frame.encode()) > MAX_FRAME_BYTES
    ws, _ = await tab(alice_token)
    await ws.send(frame)
    assert await recv_json(ws) == {
        "type": "error", "code": "frame_too_large", "message": f"Frames are limited to {MAX_FRAME_BYTES} bytes."
    }
    await expect_app_close(ws, 4009)


async def test_message_over_daphnes_own_limit_closes_only_that_connection(tab, alice_token):
    """daphne refuses messages over 1 MiB itself (autobahn drops the TCP connection, no close
    frame: the client sees 1006); the app never sees the frame and the server keeps serving."""
    ws, _ = await tab(alice_token)
    other, _ = await tab(alice_token)
    with contextlib.suppress(ConnectionClosed):
        await ws.send('{"type":"ping"}' + " " * (1024 * 1024))
    await expect_close(ws, None)
    await send_json(other, {"type": "ping", "id": 1})
    assert await recv_json(other) == {"type": "pong", "id": 1}


async def test_bad_frames_get_errors_and_the_connection_keeps_working(tab, send, bob, alice_token):
    ws, _ = await tab(alice_token)
    [bobs] = await send(title="Bob's", users=["bob"])

    await ws.send("{not json")
    assert await recv_json(ws) == {"type": "error", "code": "bad_json", "message": "The frame is not valid JSON."}
    await ws.send(b"\x00\x01")
    assert await recv_json(ws) == {
        "type": "error", "code": "binary_not_supported", "message": "Send JSON text frames, not binary frames."
    }
    await ws.send("[1, 2]")
    assert await recv_json(ws) == {
        "type": "error", "code": "bad_frame", "message": "A frame must be a JSON object with a 'type'."
    }
    await send_json(ws, {"type": "dance", "id": 3})
    assert await recv_json(ws) == {
        "type": "error", "code": "unknown_type", "id": 3,
        "message": f"Unknown frame type. Known types: {', '.join(CLIENT_TYPES)}.",
    }
    await send_json(ws, {"type": "mark_read", "ids": [bobs["id"]], "id": "m"})  # another user's notification
    assert await recv_json(ws) == {
        "type": "error", "code": "not_found", "id": "m",
        "message": f"No notification with id(s) [{bobs['id']}] in your inbox.",
    }
    await send_json(ws, {"type": "subscribe", "topic": "no-such-topic", "id": "s"})
    assert await recv_json(ws) == {
        "type": "error", "code": "not_found", "id": "s", "message": "No topic 'no-such-topic'."
    }

    await send_json(ws, {"type": "ping", "id": "still-here"})
    assert await recv_json(ws) == {"type": "pong", "id": "still-here"}


async def test_idle_server_keeps_connections_and_logs_no_errors(live, tab, send, alice_token):
    """Idle for longer than channels-redis's blocking read (BZPOPMIN, 5 s). With redis-py >= 8 the
    client's default socket_timeout is also 5 s: unless the layer sets its own, every idle read
    ends in ``redis.exceptions.TimeoutError`` (channels_redis#422, redis-py#4091)."""
    ws, _ = await tab(alice_token)
    start = live.log_size()
    await asyncio.sleep(IDLE_SECONDS)
    await send_json(ws, {"type": "ping", "id": "after-idle"})
    assert await recv_json(ws) == {"type": "pong", "id": "after-idle"}
    [sent] = await send(title="After a quiet spell", users=["alice"])
    assert await recv_json(ws) == await frame_of(sent)
    assert REDIS_READ_TIMEOUT not in live.log_since(start)


async def test_strings_a_server_cannot_send_or_store_are_invalid(tab, alice_token):
    """Found by tests/fuzz: an id holding a lone surrogate (sent as the JSON escape \\ud800) was
    echoed in the reply, which cannot be encoded as UTF-8; a topic holding NUL reached PostgreSQL."""
    ws, _ = await tab(alice_token)
    await ws.send('{"type": "ping", "id": "\\ud800"}')
    assert await recv_json(ws) == {
        "type": "error", "code": "invalid", "fields": {"id": "invalid"},
        "message": "'id' must be a string of at most 64 characters or an integer.",
    }
    await ws.send('{"type": "subscribe", "topic": "a\\u0000b", "id": 2}')
    assert await recv_json(ws) == {
        "type": "error", "code": "invalid", "id": 2, "fields": {"topic": "required slug"},
        "message": "'topic' must be a topic slug.",
    }
    await send_json(ws, {"type": "ping", "id": "still-here"})
    assert await recv_json(ws) == {"type": "pong", "id": "still-here"}
