"""Access control and abuse limits: nobody reads what is not theirs; guessing and flooding are throttled."""

import logging
import uuid

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.test import Client

from notifications import auth, selectors, services
from notifications.auth import ticket_issue, token_create
from notifications.models import Follow, Topic
from tests.support import PASSWORD

from .conftest import WS_PATH

pytestmark = [pytest.mark.django_db(transaction=True)]

send = sync_to_async(services.notification_send)


@pytest.fixture
def superuser_client(django_user_model):
    root = django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    client = Client()
    client.force_login(root)
    return client


# Membership and deactivation take effect on live connections


async def test_removing_a_member_of_a_private_topic_takes_it_off_their_live_connections(
    layer, ws, alice, bob, alice_token, superuser_client
):
    topic = await sync_to_async(Topic.objects.create)(slug="security", title="Security", private=True)
    await sync_to_async(topic.members.add)(alice, bob)
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    tab1, _ = await ws(alice_token)
    tab2, _ = await ws(alice_token)
    response = await sync_to_async(superuser_client.post)(
        f"/admin/notifications/topic/{topic.pk}/change/",
        {"slug": "security", "title": "Security", "private": "on", "members": [bob.pk]},
    )
    assert response.status_code == 302
    for tab in (tab1, tab2):
        assert await tab.receive_json_from(timeout=5) == {"type": "unsubscribed", "topic": "security",
                                                          "stream": f"t.{topic.pk}"}
    await send(topic="security", title="members only")
    assert await tab1.receive_nothing(timeout=0.3)
    _, hello = await ws(alice_token)
    assert hello["topics"] == []


async def test_making_a_topic_private_anywhere_removes_non_member_followers(layer, ws, alice, alice_token):
    topic = await sync_to_async(Topic.objects.create)(slug="deploys", title="Deploys")
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    comm, _ = await ws(alice_token)
    topic.private = True
    await sync_to_async(topic.save)()  # not through the admin: a shell, a data migration
    assert await comm.receive_json_from(timeout=5) == {"type": "unsubscribed", "topic": "deploys",
                                                       "stream": f"t.{topic.pk}"}
    assert await sync_to_async(services.topic_members_changed)(topic=topic) == []  # already done


async def test_removing_a_member_anywhere_takes_the_topic_off_their_connections(layer, ws, alice, alice_token):
    topic = await sync_to_async(Topic.objects.create)(slug="ops", title="Ops", private=True)
    await sync_to_async(topic.members.add)(alice)
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    comm, _ = await ws(alice_token)
    await sync_to_async(topic.members.remove)(alice)
    assert await comm.receive_json_from(timeout=5) == {"type": "unsubscribed", "topic": "ops",
                                                       "stream": f"t.{topic.pk}"}


# A session's sockets follow the session: logout and password change


def _login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _cookie_headers(client: Client) -> list[tuple[bytes, bytes]]:
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    return [(b"cookie", cookie), (b"origin", b"http://localhost:8000"), (b"host", b"localhost:8000")]


SESSION_CHANGED = "session_changed"


async def test_logging_out_closes_that_sessions_sockets_only(layer, ws, alice, alice_token):
    laptop, phone = await sync_to_async(_login)(alice), await sync_to_async(_login)(alice)
    laptop_socket, _ = await ws(headers=_cookie_headers(laptop))
    phone_socket, _ = await ws(headers=_cookie_headers(phone))
    token_socket, _ = await ws(alice_token)
    assert (await sync_to_async(laptop.post)("/accounts/logout/")).status_code == 302
    assert await laptop_socket.receive_json_from(timeout=5) == {
        "type": "error", "code": SESSION_CHANGED, "message": "logged out",
    }
    assert (await laptop_socket.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4010,
                                                              "reason": "logged out"}
    assert await phone_socket.receive_nothing(timeout=0.3)
    assert await token_socket.receive_nothing(timeout=0.1)


async def test_a_password_change_closes_every_session_socket_and_old_sessions_cannot_reconnect(
    layer, ws, alice, alice_token
):
    other = await sync_to_async(_login)(alice)
    session_socket, _ = await ws(headers=_cookie_headers(other))
    token_socket, _ = await ws(alice_token)

    def change_password():
        alice.set_password("a-new-password-2")
        alice.save()

    await sync_to_async(change_password)()
    assert (await session_socket.receive_json_from(timeout=5))["code"] == SESSION_CHANGED
    assert (await session_socket.receive_output(timeout=5))["code"] == 4010
    assert await token_socket.receive_nothing(timeout=0.3)
    again = await ws(headers=_cookie_headers(other), hello=False)  # that session ended with the old password
    assert (await again.receive_json_from(timeout=5))["code"] == "unauthenticated"


async def test_saving_a_user_without_a_new_password_leaves_their_sockets_open(layer, ws, alice):
    session_socket, _ = await ws(headers=_cookie_headers(await sync_to_async(_login)(alice)))
    alice.first_name = "Alice"
    await sync_to_async(alice.save)()
    assert await session_socket.receive_nothing(timeout=0.3)


# Following: one limit on every path, bounded history


def test_following_over_rest_has_the_same_limit_as_the_socket(client, alice, alice_token, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_MAX_TOPICS": 2}
    for slug in ("a", "b", "c"):
        Topic.objects.create(slug=slug, title=slug)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {alice_token}", "content_type": "application/json"}
    assert [client.post(f"/api/topics/{slug}/follow/", **auth).status_code for slug in "ab"] == [200, 200]
    refused = client.post("/api/topics/c/follow/", **auth)
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "too_many_topics")
    assert client.post("/api/topics/a/follow/", **auth).status_code == 200  # already followed: no new follow
    assert sorted(selectors.followed_topics(alice).values()) == ["a", "b"]


def test_following_and_unfollowing_in_a_loop_does_not_grow_the_follow_history(alice):
    topic = Topic.objects.create(slug="loop", title="Loop")
    for _ in range(50):
        services.topic_follow(user=alice, topic=topic)
        services.topic_unfollow(user=alice, topic=topic)
    assert Follow.objects.filter(user=alice, topic=topic).count() == 1
    for i in range(services.FOLLOW_PERIODS_MAX + 10):  # a notification between periods keeps them apart
        services.topic_follow(user=alice, topic=topic)
        services.notification_send(topic=topic, title=f"seen {i}")
        services.topic_unfollow(user=alice, topic=topic)
        services.notification_send(topic=topic, title=f"not seen {i}")
    assert Follow.objects.filter(user=alice, topic=topic).count() == services.FOLLOW_PERIODS_MAX
    inbox = [n.title for n in selectors.inbox_for(alice, limit=100)]
    assert inbox == [f"seen {i}" for i in reversed(range(10, services.FOLLOW_PERIODS_MAX + 10))]


# Topics are routed by identity, not by slug


async def test_a_topic_deleted_and_recreated_private_does_not_reach_its_old_followers(
    layer, ws, alice, bob, alice_token, bob_token
):
    ops = await sync_to_async(Topic.objects.create)(slug="ops", title="Ops")
    await sync_to_async(services.topic_follow)(user=alice, topic=ops)
    mine, hello = await ws(alice_token)
    assert hello["topics"] == ["ops"]
    stream = f"t.{ops.pk}"
    await sync_to_async(ops.delete)()
    assert await mine.receive_json_from(timeout=5) == {"type": "unsubscribed", "topic": "ops", "stream": stream}
    private = await sync_to_async(Topic.objects.create)(slug="ops", title="Ops (private)", private=True)
    await sync_to_async(private.members.add)(bob)
    await sync_to_async(services.topic_follow)(user=bob, topic=private)
    bobs, _ = await ws(bob_token)
    await send(topic="ops", title="members only", data={"secret": 1})
    assert (await bobs.receive_json_from(timeout=5))["title"] == "members only"
    assert await mine.receive_nothing(timeout=0.5)


async def test_a_renamed_topic_keeps_reaching_its_followers_and_its_old_slug_does_not(
    layer, ws, alice, bob, alice_token, superuser_client
):
    ops = await sync_to_async(Topic.objects.create)(slug="ops", title="Ops")
    await sync_to_async(services.topic_follow)(user=alice, topic=ops)
    mine, _ = await ws(alice_token)
    response = await sync_to_async(superuser_client.post)(
        f"/admin/notifications/topic/{ops.pk}/change/", {"slug": "ops-archive", "title": "Ops archive"},
    )
    assert response.status_code == 302
    stream = f"t.{ops.pk}"
    assert await mine.receive_json_from(timeout=5) == {"type": "unsubscribed", "topic": "ops", "stream": stream}
    assert await mine.receive_json_from(timeout=5) == {"type": "subscribed", "topic": "ops-archive", "stream": stream,
                                                       "offset": 0}
    newcomer = await sync_to_async(Topic.objects.create)(slug="ops", title="New ops", private=True)
    await sync_to_async(newcomer.members.add)(bob)
    await send(topic="ops", title="not for alice")
    await send(topic="ops-archive", title="archived")
    frame = await mine.receive_json_from(timeout=5)
    assert (frame["type"], frame["title"], frame["topic"]) == ("notification", "archived", "ops-archive")
    assert await mine.receive_nothing(timeout=0.3)
    again, hello = await ws(alice_token)
    assert hello["topics"] == ["ops-archive"]


async def test_deactivating_a_user_in_the_admin_closes_their_connections(layer, ws, alice, alice_token,
                                                                         superuser_client):
    comm, _ = await ws(alice_token)
    response = await sync_to_async(superuser_client.post)(
        f"/admin/auth/user/{alice.pk}/change/",
        {"username": "alice", "is_active": "", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
         "initial-date_joined_0": "2026-01-01", "initial-date_joined_1": "00:00:00"},
    )
    assert response.status_code == 302, response.content[:500]
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "disconnected", "message": "user deactivated",
    }
    assert (await comm.receive_output(timeout=5))["code"] == 4003
    again = await ws(alice_token, hello=False)
    assert (await again.receive_json_from(timeout=5))["code"] == "user_inactive"


@pytest.mark.parametrize("how", ["save()", "save(update_fields)", "Django's own User admin"])
async def test_deactivating_a_user_anywhere_closes_their_connections(layer, ws, alice, alice_token, how,
                                                                     superuser_client):
    """Not only through this app's User admin (a host without USER_ADMIN_ACTIONS keeps Django's)."""
    from django.contrib import admin
    from django.contrib.auth.admin import UserAdmin

    comm, _ = await ws(alice_token)
    alice.is_active = False
    if how == "save()":
        await sync_to_async(alice.save)()
    elif how == "save(update_fields)":
        await sync_to_async(alice.save)(update_fields=["is_active"])
    else:
        from django.contrib.auth.models import User

        admin.site.unregister(User)
        admin.site.register(User, UserAdmin)
        try:
            response = await sync_to_async(superuser_client.post)(
                f"/admin/auth/user/{alice.pk}/change/",
                {"username": "alice", "is_active": "", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
                 "initial-date_joined_0": "2026-01-01", "initial-date_joined_1": "00:00:00"},
            )
        finally:
            from notifications.admin import NotifyingUserAdmin

            admin.site.unregister(User)
            admin.site.register(User, NotifyingUserAdmin)
        assert response.status_code == 302, response.content[:500]
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "disconnected", "message": "user deactivated",
    }
    assert (await comm.receive_output(timeout=5))["code"] == 4003


async def test_saving_an_active_user_closes_nothing(ws, alice, alice_token):
    comm, _ = await ws(alice_token)
    alice.first_name = "Alice"
    await sync_to_async(alice.save)()
    assert await comm.receive_nothing(timeout=0.3)


# Another user's things


async def test_another_users_ids_and_private_topics_stay_invisible_over_every_path(layer, ws, alice, bob, alice_token):
    secret = await sync_to_async(Topic.objects.create)(slug="secret", title="Secret", private=True)
    await sync_to_async(secret.members.add)(bob)
    await sync_to_async(services.topic_follow)(user=bob, topic=secret)
    (bobs,) = await send(users=[bob], title="bob's")
    (members,) = await send(topic="secret", title="members only")
    comm, hello = await ws(alice_token, path=f"{WS_PATH}?since=")
    assert await comm.receive_json_from(timeout=5) == {
        "type": "resumed", "recovered": True, "count": 0, "cursor": hello["cursor"],
    }
    assert (await comm.receive_json_from(timeout=5))["type"] == "unread_count"
    for notification in (bobs, members):
        await comm.send_json_to({"type": "mark_read", "ids": [notification.pk]})
        assert (await comm.receive_json_from(timeout=5))["code"] == "not_found"
    await comm.send_json_to({"type": "subscribe", "topic": "secret"})
    assert (await comm.receive_json_from(timeout=5))["code"] == "forbidden"
    client = Client()
    headers = {"HTTP_AUTHORIZATION": f"Bearer {alice_token}"}
    for notification in (bobs, members):
        url = f"/api/notifications/{notification.pk}/read/"
        read = await sync_to_async(client.post)(url, content_type="application/json", **headers)
        dismiss = await sync_to_async(client.delete)(f"/api/notifications/{notification.pk}/", **headers)
        assert (read.status_code, dismiss.status_code) == (404, 404)
    inbox = await sync_to_async(client.get)("/api/notifications/", **headers)
    assert inbox.json()["results"] == []
    topics = await sync_to_async(client.get)("/api/topics/", **headers)
    assert topics.json()["results"] == []


# Limits


async def test_a_users_oldest_connection_is_closed_when_the_limit_is_passed(layer, ws, alice_token, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_MAX_CONNECTIONS_PER_USER": 2}
    first, _ = await ws(alice_token)
    second, _ = await ws(alice_token)
    third, _ = await ws(alice_token)
    assert await first.receive_json_from(timeout=5) == {
        "type": "error", "code": "too_many_connections",
        "message": "More than 2 connections for this user: the oldest is closed.",
    }
    assert (await first.receive_output(timeout=5))["code"] == 4005
    for comm in (second, third):
        await comm.send_json_to({"type": "ping"})
        assert await comm.receive_json_from(timeout=5) == {"type": "pong"}


def test_token_guessing_over_the_api_is_throttled_per_address(client, alice_token, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "AUTH_FAILURES_PER_MINUTE": 3}
    responses = [client.get("/api/notifications/", HTTP_AUTHORIZATION=f"Bearer ntf_guess{i}_x") for i in range(5)]
    assert [r.status_code for r in responses] == [401, 401, 401, 429, 429]
    assert responses[-1].json()["error"]["code"] == "too_many_failures"


def test_a_valid_token_is_served_from_an_address_over_its_failure_limit(client, alice_token, settings):
    """One attacker behind a shared address (a NAT, a proxy) must not lock out everyone behind it."""
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "AUTH_FAILURES_PER_MINUTE": 2}
    for i in range(5):
        client.get("/api/notifications/", HTTP_AUTHORIZATION=f"Bearer ntf_guess{i}_x")
    assert client.get("/api/notifications/", HTTP_AUTHORIZATION=f"Bearer {alice_token}").status_code == 200
    again = client.get("/api/notifications/", HTTP_AUTHORIZATION="Bearer ntf_guess9_x")
    assert again.status_code == 429


async def test_token_guessing_over_websockets_is_throttled_per_address_but_valid_tokens_connect(
    layer, ws, settings, alice_token
):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "AUTH_FAILURES_PER_MINUTE": 2}
    codes = []
    for i in range(4):
        comm = await ws(f"ntf_guess{i}_x", hello=False)
        codes.append((await comm.receive_json_from(timeout=5))["code"])
    assert codes == ["invalid_token", "invalid_token", "too_many_failures", "too_many_failures"]
    assert (await comm.receive_output(timeout=5))["code"] == 4029
    _, hello = await ws(alice_token)  # the same address: the valid token is served
    assert hello["type"] == "hello"


def test_password_guessing_on_the_login_page_is_throttled(client, alice, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "AUTH_FAILURES_PER_MINUTE": 2}
    statuses = [client.post("/accounts/login/", {"username": "alice", "password": f"wrong{i}"}).status_code
                for i in range(4)]
    assert statuses == [200, 200, 200, 429]
    # Even the right password: else the throttle would still tell which guess was right.
    assert client.post("/accounts/login/", {"username": "alice", "password": PASSWORD}).status_code == 429


def test_password_guessing_on_the_admin_login_is_throttled(client, django_user_model, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "AUTH_FAILURES_PER_MINUTE": 2}
    django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    statuses = [client.post("/admin/login/", {"username": "root", "password": f"wrong{i}"}).status_code
                for i in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert client.post("/admin/login/", {"username": "root", "password": PASSWORD}).status_code == 429
    # The admin's own pages still ask for a login as before.
    assert client.get("/admin/").status_code == 302


def test_password_guessing_for_one_user_does_not_lock_out_another_behind_the_same_address(
    client, alice, bob, settings
):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "AUTH_FAILURES_PER_MINUTE": 2}
    for i in range(5):
        client.post("/accounts/login/", {"username": "alice", "password": f"wrong{i}"})
    response = client.post("/accounts/login/", {"username": "bob", "password": PASSWORD})
    assert response.status_code == 302


def test_deployments_sharing_a_redis_do_not_share_throttles_or_presence(redis_url, settings):
    """Staging's failed logins must not lock out production on the same Redis (REDIS_PREFIX)."""
    from notifications import rate_limits
    from notifications.presence import Connection, RedisPresence

    run = uuid.uuid4().hex[:8]
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "AUTH_FAILURES_PER_MINUTE": 2}

    def deployment(prefix: str):
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                       "LOCATION": redis_url, "KEY_PREFIX": prefix}}
        settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "REDIS_PREFIX": prefix}

    deployment(f"staging-{run}")
    assert [auth.failure_seen("203.0.113.9") for _ in range(3)] == [True, True, False]
    staging = RedisPresence(url=redis_url)
    record = Connection(id="c1", user_id=1, username="a", since=0.0, ip=None, user_agent="", server="s", topics=[])
    async_to_sync(staging.add)(record)
    deployment(f"production-{run}")
    assert auth.failure_seen("203.0.113.9") is True
    assert rate_limits.blocked("auth", "203.0.113.9", limit=2) is False
    assert RedisPresence(url=redis_url).online() == []
    assert [c.id for c in staging.online()] == ["c1"]
    async_to_sync(staging.remove)("c1")


def test_ticket_requests_are_limited_per_user(client, alice_token, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "TICKETS_PER_MINUTE": 2}
    auth = {"HTTP_AUTHORIZATION": f"Bearer {alice_token}", "content_type": "application/json"}
    statuses = [client.post("/api/ws-ticket/", **auth).status_code for _ in range(3)]
    assert statuses == [201, 201, 429]


# Secrets never reach the logs


async def test_tokens_tickets_and_cookies_never_appear_in_logs(layer, ws, alice, caplog):
    caplog.set_level(logging.DEBUG)
    _, raw_token = await sync_to_async(token_create)(user=alice)
    ticket, _ = await sync_to_async(ticket_issue)(user=alice)
    client = Client()
    await sync_to_async(client.force_login)(alice)
    cookie = client.cookies["sessionid"].value
    await ws(raw_token)
    await ws(path=f"{WS_PATH}?ticket={ticket}")
    again = await ws(path=f"{WS_PATH}?ticket={ticket}", hello=False)  # reused: refused, and logged?
    await again.receive_json_from(timeout=5)
    bad = await ws(raw_token[:-3] + "abc", hello=False)
    await bad.receive_json_from(timeout=5)
    await ws(headers=[(b"cookie", f"sessionid={cookie}".encode()), (b"origin", b"http://localhost"),
                      (b"host", b"localhost")])
    await sync_to_async(Client().get)("/api/notifications/", HTTP_AUTHORIZATION=f"Bearer {raw_token}x")
    text = caplog.text
    for secret in (raw_token, raw_token.split("_", 2)[2], ticket, cookie):
        assert secret not in text


@pytest.mark.parametrize(
    "fields,field",
    [({"title": "a\x00b"}, "title"), ({"body": "\ud800"}, "body"), ({"data": {"k": "\x00"}}, "data"),
     ({"data": {"\ud800": 1}}, "data"), ({"data": {"list": [["\udfff"]]}}, "data")],
)
def test_unstorable_text_is_a_validation_error_for_every_caller(alice, fields, field):
    """Django code and the admin call the service directly: NUL (PostgreSQL cannot store it)
    and lone surrogates (not UTF-8) are refused there, not only by the API's parser."""
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as error:
        services.notification_send(users=[alice], **{"title": "ok", **fields})
    assert error.value.message_dict == {field: ["Text may not contain NUL characters or unpaired surrogates."]}


def test_emoji_and_other_non_bmp_text_is_fine(alice):
    (sent,) = services.notification_send(users=[alice], title="🎉 shipped", data={"k": "𝄞"})
    assert (sent.title, sent.data) == ("🎉 shipped", {"k": "𝄞"})
