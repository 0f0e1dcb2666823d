"""The WebSocket consumer through the project's full ASGI stack, on the in-memory and the Redis layer."""

import json

import pytest
from asgiref.sync import sync_to_async

from notifications import selectors, services
from notifications.auth import ticket_issue, token_create, token_revoke
from notifications.models import Topic

from .conftest import WS_PATH, bearer

pytestmark = [pytest.mark.django_db(transaction=True)]

send = sync_to_async(services.notification_send)


def strip_volatile(frame: dict) -> dict:
    """The frame without the values a test cannot know in advance."""
    return {k: v for k, v in frame.items() if k not in ("id", "created_at")}


async def assert_silent(comm, timeout=0.3):
    assert await comm.receive_nothing(timeout=timeout), "expected no frame"


async def receive_sorted(comm, count: int) -> list[dict]:
    frames = [await comm.receive_json_from(timeout=5) for _ in range(count)]
    return sorted(frames, key=lambda f: f["type"])


async def expect_close(comm, code: int):
    message = await comm.receive_output(timeout=5)
    assert message == {"type": "websocket.close", "code": code} | (
        {"reason": message["reason"]} if "reason" in message else {}
    )


# Connecting


async def test_hello_frame_carries_user_unread_count_and_topics(layer, ws, alice, alice_token):
    topic = await sync_to_async(Topic.objects.create)(slug="deploys", title="Deploys")
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    (sent,) = await send(users=[alice], title="one")
    _, hello = await ws(alice_token)
    assert hello == {
        "type": "hello",
        "protocol": "notifications.v2",
        "version": 2,
        "user": {"id": alice.pk, "username": "alice"},
        "unread_count": 1,
        "topics": ["deploys"],
        "cursor": {f"u.{alice.pk}": sent.offset, "b": 0, f"t.{topic.pk}": 0},
        "epoch": await sync_to_async(selectors.store_epoch)(),
        "max_frame_bytes": 65536,
    }


async def test_subprotocol_is_negotiated_when_offered(layer, alice_token):
    from channels.testing import WebsocketCommunicator

    from project.asgi import application

    offered = ["x", "notifications.v1", "notifications.v2"]
    comm = WebsocketCommunicator(application, WS_PATH, headers=bearer(alice_token), subprotocols=offered)
    connected, subprotocol = await comm.connect()
    assert (connected, subprotocol) == (True, "notifications.v2")
    await comm.disconnect()


async def test_a_client_that_offers_only_v1_is_told_the_new_version_and_closed_4426(layer, alice_token):
    from channels.testing import WebsocketCommunicator

    from project.asgi import application

    comm = WebsocketCommunicator(application, WS_PATH, headers=bearer(alice_token), subprotocols=["notifications.v1"])
    connected, subprotocol = await comm.connect()
    assert (connected, subprotocol) == (True, "notifications.v1")
    frame = await comm.receive_json_from(timeout=5)
    assert frame["code"] == "unsupported_protocol" and "notifications.v2" in frame["message"]
    assert (await comm.receive_output(timeout=5))["code"] == 4426


# Pushes


async def test_personal_notification_reaches_every_tab_and_nobody_else(layer, ws, alice, alice_token, bob_token):
    tab1, _ = await ws(alice_token)
    tab2, _ = await ws(alice_token)
    other, _ = await ws(bob_token)
    (stored,) = await send(users=[alice], title="Build done", body="all green", level="success",
                           data={"build": 7, "nested": {"ok": True, "list": [1, "two", None]}}, link="/builds/7")
    expected = {
        "type": "notification",
        "id": stored.pk,
        "audience": "user",
        "title": "Build done",
        "body": "all green",
        "level": "success",
        "data": {"build": 7, "nested": {"ok": True, "list": [1, "two", None]}},
        "link": "/builds/7",
        "topic": None,
        "actor": None,
        "created_at": stored.created_at.isoformat(),
        "read": False,
        "stream": f"u.{alice.pk}",
        "offset": 1,
    }
    assert await tab1.receive_json_from(timeout=5) == expected
    assert await tab2.receive_json_from(timeout=5) == expected
    await assert_silent(other)


async def test_broadcast_reaches_everyone_with_byte_identical_frames(layer, ws, alice_token, bob_token):
    a, _ = await ws(alice_token)
    b, _ = await ws(bob_token)
    await send(broadcast=True, title="Maintenance tonight", level="warning")
    frame_a = await a.receive_from(timeout=5)
    frame_b = await b.receive_from(timeout=5)
    assert frame_a == frame_b
    assert strip_volatile(json.loads(frame_a)) == {
        "type": "notification", "audience": "broadcast", "title": "Maintenance tonight", "body": "",
        "level": "warning", "data": {}, "link": None, "topic": None, "actor": None, "read": False,
        "stream": "b", "offset": json.loads(frame_a)["offset"],
    }


async def test_topic_notification_reaches_followers_only(layer, ws, alice, alice_token, bob_token):
    topic = await sync_to_async(Topic.objects.create)(slug="deploys", title="Deploys")
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    follower, _ = await ws(alice_token)
    stranger, _ = await ws(bob_token)
    await send(topic="deploys", title="v2 is live")
    frame = await follower.receive_json_from(timeout=5)
    assert (frame["type"], frame["topic"], frame["audience"]) == ("notification", "deploys", "topic")
    await assert_silent(stranger)


async def test_rolled_back_send_pushes_nothing(layer, ws, alice, alice_token):
    comm, _ = await ws(alice_token)

    def send_then_fail():
        from django.db import transaction

        with pytest.raises(RuntimeError), transaction.atomic():
            services.notification_send(users=[alice], title="never")
            raise RuntimeError("rollback")

    await sync_to_async(send_then_fail)()
    await assert_silent(comm)
    await send(users=[alice], title="after")
    assert (await comm.receive_json_from(timeout=5))["title"] == "after"


# Client requests


async def test_ping_gets_pong_echoing_the_request_id(layer, ws, alice_token):
    comm, _ = await ws(alice_token)
    await comm.send_json_to({"type": "ping", "id": "p1"})
    assert await comm.receive_json_from(timeout=5) == {"type": "pong", "id": "p1"}
    await comm.send_json_to({"type": "ping"})
    assert await comm.receive_json_from(timeout=5) == {"type": "pong"}


async def test_subscribe_follows_persistently_and_joins_the_topic_group(layer, ws, alice, alice_token):
    topic = await sync_to_async(Topic.objects.create)(slug="deploys", title="Deploys")
    comm, _ = await ws(alice_token)
    other_tab, _ = await ws(alice_token)
    await comm.send_json_to({"type": "subscribe", "topic": "deploys", "id": 1})
    stream = f"t.{topic.pk}"
    assert await comm.receive_json_from(timeout=5) == {
        "type": "subscribed", "topic": "deploys", "stream": stream, "offset": 0, "id": 1,
    }
    # The user's other connection follows along (without a request id).
    assert await other_tab.receive_json_from(timeout=5) == {
        "type": "subscribed", "topic": "deploys", "stream": stream, "offset": 0,
    }
    await send(topic="deploys", title="live")
    assert (await comm.receive_json_from(timeout=5))["title"] == "live"
    assert (await other_tab.receive_json_from(timeout=5))["title"] == "live"
    # Persisted: a new connection says so in hello.
    _, hello = await ws(alice_token)
    assert hello["topics"] == ["deploys"]


async def test_unsubscribe_stops_pushes_on_every_connection(layer, ws, alice, alice_token):
    topic = await sync_to_async(Topic.objects.create)(slug="deploys", title="Deploys")
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    comm, _ = await ws(alice_token)
    other_tab, _ = await ws(alice_token)
    await comm.send_json_to({"type": "unsubscribe", "topic": "deploys", "id": "u"})
    stream = f"t.{topic.pk}"
    assert await comm.receive_json_from(timeout=5) == {"type": "unsubscribed", "topic": "deploys", "stream": stream,
                                                       "id": "u"}
    assert await other_tab.receive_json_from(timeout=5) == {"type": "unsubscribed", "topic": "deploys",
                                                            "stream": stream}
    await send(topic="deploys", title="quiet")
    await assert_silent(comm)
    await assert_silent(other_tab)


async def test_subscribe_to_private_topic_without_membership_is_forbidden(layer, ws, alice, alice_token):
    await sync_to_async(Topic.objects.create)(slug="security", title="Security", private=True)
    comm, _ = await ws(alice_token)
    await comm.send_json_to({"type": "subscribe", "topic": "security", "id": "s"})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "forbidden",
        "message": "Topic 'security' is private; only its members may follow it.", "id": "s",
    }


async def test_subscribe_to_private_topic_as_member_works(layer, ws, alice, alice_token):
    topic = await sync_to_async(Topic.objects.create)(slug="security", title="Security", private=True)
    await sync_to_async(topic.members.add)(alice)
    comm, _ = await ws(alice_token)
    await comm.send_json_to({"type": "subscribe", "topic": "security"})
    assert await comm.receive_json_from(timeout=5) == {"type": "subscribed", "topic": "security",
                                                       "stream": f"t.{topic.pk}", "offset": 0}


async def test_subscribe_to_unknown_topic_is_not_found(layer, ws, alice_token):
    comm, _ = await ws(alice_token)
    await comm.send_json_to({"type": "subscribe", "topic": "nope", "id": 9})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "not_found", "message": "No topic 'nope'.", "id": 9,
    }


async def test_mark_read_updates_unread_count_on_every_tab(layer, ws, alice, alice_token):
    (first,) = await send(users=[alice], title="a")
    await send(users=[alice], title="b")
    tab1, hello = await ws(alice_token)
    tab2, _ = await ws(alice_token)
    assert hello["unread_count"] == 2
    await tab1.send_json_to({"type": "mark_read", "ids": [first.pk], "id": "m"})
    # The ack answers the request; `read` and unread_count go to every tab (the ack may come first).
    assert await receive_sorted(tab1, 3) == [
        {"type": "ack", "op": "mark_read", "unread_count": 1, "id": "m"},
        {"type": "read", "ids": [first.pk]},
        {"type": "unread_count", "count": 1},
    ]
    assert await tab2.receive_json_from(timeout=5) == {"type": "read", "ids": [first.pk]}
    assert await tab2.receive_json_from(timeout=5) == {"type": "unread_count", "count": 1}


async def test_mark_all_read_sets_unread_count_to_zero_everywhere(layer, ws, alice, alice_token):
    await send(users=[alice], title="a")
    await send(broadcast=True, title="b")
    tab1, hello = await ws(alice_token)
    tab2, _ = await ws(alice_token)
    assert hello["unread_count"] == 2
    await tab1.send_json_to({"type": "mark_all_read", "id": 5})
    assert await receive_sorted(tab1, 3) == [
        {"type": "ack", "op": "mark_all_read", "unread_count": 0, "id": 5},
        {"type": "read", "all": True},
        {"type": "unread_count", "count": 0},
    ]
    assert await tab2.receive_json_from(timeout=5) == {"type": "read", "all": True}
    assert await tab2.receive_json_from(timeout=5) == {"type": "unread_count", "count": 0}


async def test_mark_read_of_another_users_notification_is_not_found(layer, ws, alice, bob, alice_token):
    (bobs,) = await send(users=[bob], title="private to bob")
    comm, _ = await ws(alice_token)
    await comm.send_json_to({"type": "mark_read", "ids": [bobs.pk], "id": "x"})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "not_found", "message": f"No notification with id(s) [{bobs.pk}] in your inbox.",
        "id": "x",
    }


# Bad input: an error frame with a stable code, and the connection keeps working


BAD_FRAMES = [
    ("{not json", {"type": "error", "code": "bad_json", "message": "The frame is not valid JSON."}),
    ("", {"type": "error", "code": "bad_json", "message": "The frame is not valid JSON."}),
    ("[1, 2]", {"type": "error", "code": "bad_frame", "message": "A frame must be a JSON object with a 'type'."}),
    ('"ping"', {"type": "error", "code": "bad_frame", "message": "A frame must be a JSON object with a 'type'."}),
    ('{"id": "q"}', {"type": "error", "code": "bad_frame", "message": "A frame must have a string 'type'.",
                     "id": "q", "fields": {"type": "required"}}),
    ('{"type": 5}', {"type": "error", "code": "bad_frame", "message": "A frame must have a string 'type'.",
                     "fields": {"type": "required"}}),
    ('{"type": "explode", "id": 3}', {
        "type": "error", "code": "unknown_type", "id": 3,
        "message": "Unknown frame type. Known types: ping, mark_all_read, subscribe, unsubscribe, mark_read, resume.",
    }),
    ('{"type": "subscribe"}', {"type": "error", "code": "invalid", "message": "'topic' must be a topic slug.",
                               "fields": {"topic": "required slug"}}),
    ('{"type": "subscribe", "topic": ["x"]}', {"type": "error", "code": "invalid",
                                               "message": "'topic' must be a topic slug.",
                                               "fields": {"topic": "required slug"}}),
    ('{"type": "mark_read", "ids": "1"}', {
        "type": "error", "code": "invalid", "fields": {"ids": "invalid"},
        "message": "'ids' must be a list of 1 to 100 positive integer notification ids.",
    }),
    ('{"type": "mark_read", "ids": [true]}', {
        "type": "error", "code": "invalid", "fields": {"ids": "invalid"},
        "message": "'ids' must be a list of 1 to 100 positive integer notification ids.",
    }),
    ('{"type": "mark_read", "ids": [99999999999999999999999]}', {
        "type": "error", "code": "invalid", "fields": {"ids": "invalid"},
        "message": "'ids' must be a list of 1 to 100 positive integer notification ids.",
    }),
    ('{"type": "ping", "id": {"a": 1}}', {
        "type": "error", "code": "invalid", "fields": {"id": "invalid"},
        "message": "'id' must be a string of at most 64 characters or an integer.",
    }),
    ("[" * 5000 + "]" * 5000, {"type": "error", "code": "bad_json", "message": "The frame is not valid JSON."}),
]


@pytest.mark.parametrize("text,error", BAD_FRAMES, ids=[f"bad{i}" for i in range(len(BAD_FRAMES))])
async def test_bad_frame_gets_error_frame_and_connection_keeps_working(layer, ws, alice_token, text, error):
    comm, _ = await ws(alice_token)
    await comm.send_input({"type": "websocket.receive", "text": text})
    assert await comm.receive_json_from(timeout=5) == error
    await comm.send_json_to({"type": "ping", "id": "still-alive"})
    assert await comm.receive_json_from(timeout=5) == {"type": "pong", "id": "still-alive"}


@pytest.mark.parametrize("data", [b"\x00\x01", b""], ids=["binary", "empty-binary"])
async def test_binary_frame_gets_error_frame(layer, ws, alice_token, data):
    comm, _ = await ws(alice_token)
    await comm.send_input({"type": "websocket.receive", "bytes": data})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "binary_not_supported", "message": "Send JSON text frames, not binary frames.",
    }
    await comm.send_json_to({"type": "ping"})
    assert await comm.receive_json_from(timeout=5) == {"type": "pong"}


async def test_oversize_frame_closes_with_4009(layer, ws, alice_token):
    comm, _ = await ws(alice_token)
    await comm.send_to(text_data=json.dumps({"type": "ping", "pad": "x" * 70_000}))
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "frame_too_large", "message": "Frames are limited to 65536 bytes.",
    }
    await expect_close(comm, 4009)


async def test_frame_limit_is_an_as_asgi_argument(layer, alice_token):
    from channels.testing import WebsocketCommunicator

    from notifications.auth import WebSocketAuthMiddlewareStack
    from notifications.consumers import NotificationConsumer

    app = WebSocketAuthMiddlewareStack(NotificationConsumer.as_asgi(max_frame_bytes=100))
    comm = WebsocketCommunicator(app, WS_PATH, headers=bearer(alice_token))
    await comm.connect()
    assert (await comm.receive_json_from(timeout=5))["max_frame_bytes"] == 100
    await comm.send_to(text_data=json.dumps({"type": "ping", "pad": "x" * 100}))
    assert (await comm.receive_json_from(timeout=5))["code"] == "frame_too_large"
    await expect_close(comm, 4009)


# Handshake authentication


async def test_no_credentials_closes_4001_with_error_frame(layer, ws):
    comm = await ws(hello=False)
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "unauthenticated",
        "message": "Authentication required: a Bearer token, a ticket or a session.",
    }
    await expect_close(comm, 4001)


async def test_invalid_token_closes_4001(layer, ws):
    comm = await ws("ntf_abc_def", hello=False)
    assert (await comm.receive_json_from(timeout=5))["code"] == "invalid_token"
    await expect_close(comm, 4001)


async def test_non_bearer_authorization_closes_4001(layer, ws):
    comm = await ws(headers=[(b"authorization", b"Basic YTpi")], hello=False)
    assert (await comm.receive_json_from(timeout=5))["code"] == "invalid_authorization"
    await expect_close(comm, 4001)


async def test_revoked_token_closes_4003(layer, ws, alice):
    token, raw = await sync_to_async(token_create)(user=alice)
    await sync_to_async(token_revoke)(token)
    comm = await ws(raw, hello=False)
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "token_revoked", "message": "The token was revoked.",
    }
    await expect_close(comm, 4003)


async def test_inactive_user_closes_4003(layer, ws, make_user):
    user = await sync_to_async(make_user)("gone", is_active=False)
    _, raw = await sync_to_async(token_create)(user=user)
    comm = await ws(raw, hello=False)
    assert (await comm.receive_json_from(timeout=5))["code"] == "user_inactive"
    await expect_close(comm, 4003)


async def test_token_in_query_string_is_refused(layer, ws, alice_token):
    comm = await ws(path=f"{WS_PATH}?token={alice_token}", hello=False)
    assert (await comm.receive_json_from(timeout=5))["code"] == "token_in_query"
    await expect_close(comm, 4001)


async def test_ticket_works_once(layer, ws, alice):
    ticket, _ = await sync_to_async(ticket_issue)(user=alice)
    _, hello = await ws(path=f"{WS_PATH}?ticket={ticket}")
    assert hello["user"]["username"] == "alice"
    again = await ws(path=f"{WS_PATH}?ticket={ticket}", hello=False)
    assert (await again.receive_json_from(timeout=5))["code"] == "invalid_ticket"
    await expect_close(again, 4001)


async def test_expired_ticket_is_refused(layer, ws, alice, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_TICKET_TTL": -1}
    ticket, _ = await sync_to_async(ticket_issue)(user=alice)
    comm = await ws(path=f"{WS_PATH}?ticket={ticket}", hello=False)
    assert (await comm.receive_json_from(timeout=5))["code"] == "invalid_ticket"
    await expect_close(comm, 4001)


async def _session_cookie(user) -> bytes:
    from django.test import Client

    client = Client()
    await sync_to_async(client.force_login)(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def test_session_cookie_with_allowed_origin_connects(layer, ws, alice):
    cookie = await _session_cookie(alice)
    _, hello = await ws(headers=[(b"cookie", cookie), (b"origin", b"http://localhost:8000"),
                                 (b"host", b"localhost:8000")])
    assert hello["user"]["username"] == "alice"


@pytest.mark.parametrize(
    "origin",
    [b"https://evil.example", b"null", None, b"http://localhost:9999", b"http://127.0.0.1:8000"],
    ids=["foreign", "null", "missing", "same-host-other-port", "allowed-host-but-not-this-host"],
)
async def test_session_cookie_with_foreign_or_missing_origin_closes_4003(layer, ws, alice, origin):
    cookie = await _session_cookie(alice)
    headers = [(b"cookie", cookie), (b"host", b"localhost:8000")] + ([(b"origin", origin)] if origin else [])
    comm = await ws(headers=headers, hello=False)
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "origin_not_allowed", "message": "Cookie authentication needs an allowed Origin.",
    }
    await expect_close(comm, 4003)


@pytest.mark.parametrize(("scheme", "origin", "allowed"), [
    ("ws", b"https://localhost:8000", False), ("wss", b"http://localhost:8000", False),
    ("wss", b"https://localhost:8000", True), ("ws", b"http://localhost:8000", True),
])
async def test_session_cookie_origin_must_have_the_handshakes_scheme(layer, ws, alice, scheme, origin, allowed):
    cookie = await _session_cookie(alice)
    comm = await ws(headers=[(b"cookie", cookie), (b"origin", origin), (b"host", b"localhost:8000")],
                    scheme=scheme, hello=False)
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["type"] == "hello") is allowed, frame
    if not allowed:
        assert frame["code"] == "origin_not_allowed"
        await expect_close(comm, 4003)


async def test_configured_origin_allow_list_admits_other_origins(layer, ws, alice, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_ALLOWED_ORIGINS": ["https://app.example.com"]}
    cookie = await _session_cookie(alice)
    _, hello = await ws(headers=[(b"cookie", cookie), (b"origin", b"https://app.example.com")])
    assert hello["user"]["username"] == "alice"


async def test_bearer_needs_no_origin_and_ignores_a_foreign_one(layer, ws, alice_token):
    _, hello = await ws(alice_token, headers=[(b"origin", b"https://evil.example")])
    assert hello["user"]["username"] == "alice"


@pytest.mark.parametrize("event", ["unread_count", "unsubscribed"])
async def test_hello_is_the_first_frame_even_when_a_user_event_arrives_during_the_handshake(
        ws, alice, alice_token, monkeypatch, event):
    """A mark_read elsewhere (its unread_count) or an unfollow can reach a socket between its
    registration with the hub and its hello: the frame waits for hello, as live notifications do
    (found by a resume test that failed once under load)."""
    from notifications.hub import Hub

    topic = await sync_to_async(Topic.objects.create)(slug="ops", title="Ops")
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    real = Hub.register

    async def register_then_event(self, outbox):
        positions = await real(self, outbox)
        if event == "unread_count":
            outbox.consumer.stream_user_event(outbox, {"op": "frame", "frame": json.dumps(
                {"type": "unread_count", "count": 7})})
        else:
            outbox.consumer.stream_user_event(outbox, {"op": "unfollow", "topic_id": topic.pk, "topic": "ops"})
        return positions

    monkeypatch.setattr(Hub, "register", register_then_event)
    comm, hello = await ws(alice_token)  # (asserts the first frame is hello)
    after = await comm.receive_json_from(timeout=5)
    assert after["type"] == event and after.get("count", 7) == 7
