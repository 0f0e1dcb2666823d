"""The admin: sending (one code path), resend, read counts, disconnect, token revocation, who is online."""

import json

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from notifications import services
from notifications.auth import token_create
from notifications.models import ApiToken, Follow, Notification, Topic
from notifications.presence import Connection, LocalPresence, RedisPresence
from tests.support import PASSWORD

SEND_URL = "/admin/notifications/notification/send/"
ONLINE_URL = "/admin/notifications/notification/online/"
CHANGELIST_URL = "/admin/notifications/notification/"


@pytest.fixture
def admin_client_for(make_user):
    def login(user) -> Client:
        client = Client()
        client.force_login(user)
        return client

    return login


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)


@pytest.fixture
def root_client(admin_client_for, superuser):
    return admin_client_for(superuser)


def send_form(**fields) -> dict:
    return {"title": "Hello", "body": "", "level": "info", "link": "", "data": "", "audience": "users", **fields}


def errors_of(response) -> dict:
    return {name: list(errors) for name, errors in response.context["form"].errors.items()}


# Permissions


@pytest.mark.django_db
def test_non_staff_user_gets_no_admin_access(admin_client_for, alice):
    client = admin_client_for(alice)
    for url in (SEND_URL, ONLINE_URL, CHANGELIST_URL):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


@pytest.mark.django_db
def test_staff_without_add_permission_cannot_send(admin_client_for, make_user):
    clerk = make_user("clerk")
    clerk.is_staff = True
    clerk.save()
    clerk.user_permissions.add(Permission.objects.get(codename="view_notification"))
    client = admin_client_for(clerk)
    assert client.get(SEND_URL).status_code == 403
    assert client.post(SEND_URL, send_form(audience="broadcast")).status_code == 403
    assert not Notification.objects.exists()
    assert client.get(ONLINE_URL).status_code == 200


@pytest.mark.django_db
def test_staff_with_add_permission_can_send(admin_client_for, make_user):
    sender = make_user("sender", staff=True)
    client = admin_client_for(sender)
    assert client.get(SEND_URL).status_code == 200
    response = client.post(SEND_URL, send_form(audience="broadcast"))
    assert response.status_code == 302
    assert Notification.objects.get().actor == sender


# The send page


@pytest.mark.django_db
def test_send_page_rejects_bad_json_data(root_client, alice):
    response = root_client.post(SEND_URL, send_form(data="{not json", users=[alice.pk]))
    assert response.status_code == 200
    assert errors_of(response)["data"][0].startswith("Not valid JSON:")
    assert not Notification.objects.exists()


@pytest.mark.django_db
def test_send_page_rejects_data_that_is_not_an_object(root_client, alice):
    response = root_client.post(SEND_URL, send_form(data="[1, 2]", users=[alice.pk]))
    assert errors_of(response) == {"data": ['data must be a JSON object, like {"key": "value"}.']}


@pytest.mark.django_db
def test_send_page_rejects_empty_audience(root_client):
    response = root_client.post(SEND_URL, send_form(audience="users"))
    assert errors_of(response) == {"users": ["Choose at least one user, or another audience."]}
    response = root_client.post(SEND_URL, send_form(audience="topic"))
    assert errors_of(response) == {"topic": ["Choose a topic, or another audience."]}
    assert not Notification.objects.exists()


@pytest.mark.django_db
def test_send_page_rejects_unknown_user(root_client):
    response = root_client.post(SEND_URL, send_form(users=[987654]))
    assert errors_of(response) == {
        "users": ["Select a valid choice. 987654 is not one of the available choices."]
    }


@pytest.mark.django_db
def test_send_page_reports_service_validation_errors_on_the_form(root_client, alice):
    response = root_client.post(SEND_URL, send_form(users=[alice.pk], link="javascript:alert(1)"))
    assert errors_of(response) == {"link": ["link must be an http(s) URL or a path starting with '/'."]}


@pytest.mark.django_db
def test_preview_shows_the_frame_and_sends_nothing(root_client, alice):
    response = root_client.post(
        SEND_URL, send_form(users=[alice.pk], data='{"k": [1, 2]}', level="warning", preview="Preview frame")
    )
    frame = json.loads(response.context["preview"])
    assert {k: frame[k] for k in ("type", "title", "level", "data", "audience", "actor", "read")} == {
        "type": "notification", "title": "Hello", "level": "warning", "data": {"k": [1, 2]},
        "audience": "user", "actor": "root", "read": False,
    }
    assert b'id="frame-preview"' in response.content
    assert not Notification.objects.exists()


@pytest.mark.django_db(transaction=True)
async def test_sending_from_the_admin_pushes_to_open_connections_and_reports_reach(
    layer, ws, root_client, alice, alice_token, settings
):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "PRESENCE_BACKEND": "notifications.presence.LocalPresence"}
    tab1, _ = await ws(alice_token)
    tab2, _ = await ws(alice_token)
    response = await sync_to_async(root_client.post)(
        SEND_URL, send_form(users=[alice.pk], title="From the admin", data='{"x": 1}'), follow=True
    )
    for tab in (tab1, tab2):
        frame = await tab.receive_json_from(timeout=5)
        assert (frame["title"], frame["data"], frame["actor"]) == ("From the admin", {"x": 1}, "root")
    messages = [str(m) for m in response.context["messages"]]
    assert messages == ["Sent “From the admin” to 1 user(s); it reached 2 open connection(s)."]


@pytest.mark.django_db
def test_user_admin_send_action_opens_the_send_page_with_the_users(root_client, alice, bob):
    response = root_client.post(
        "/admin/auth/user/", {"action": "send_notification", "_selected_action": [alice.pk, bob.pk]}
    )
    assert response.status_code == 302
    page = root_client.get(response["Location"])
    assert set(page.context["form"].initial["users"]) == {alice, bob}


# Model pages


@pytest.mark.django_db
def test_changelist_shows_how_many_recipients_read_each_notification(root_client, alice, bob):
    topic = Topic.objects.create(slug="deploys", title="Deploys")
    Follow.objects.create(user=alice, topic=topic)
    Follow.objects.create(user=bob, topic=topic)
    (topical,) = services.notification_send(topic=topic, title="topical")
    (everyone,) = services.notification_send(broadcast=True, title="everyone")
    services.notification_mark_read(user=alice, ids=[topical.pk])
    services.notification_mark_all_read(user=bob)  # watermark: reads both
    response = root_client.get(CHANGELIST_URL)
    assert response.status_code == 200
    rows = {n.title: response.context["cl"].model_admin.read_by(n) for n in response.context["cl"].result_list}
    assert rows == {"topical": 2, "everyone": 1}


@pytest.mark.django_db
def test_adding_in_the_admin_goes_through_notification_send(root_client, alice):
    response = root_client.post(
        "/admin/notifications/notification/add/",
        {"audience": "user", "recipient": alice.pk, "title": "Added", "body": "", "level": "info", "link": "",
         "data": "{}"},
    )
    assert response.status_code == 302
    notification = Notification.objects.get()
    assert (notification.title, notification.recipient, notification.actor.username) == ("Added", alice, "root")


@pytest.mark.django_db
def test_resend_action_sends_a_new_copy(root_client, alice):
    (original,) = services.notification_send(users=[alice], title="Again", data={"a": 1})
    response = root_client.post(CHANGELIST_URL, {"action": "resend", "_selected_action": [original.pk]})
    assert response.status_code == 302
    copy = Notification.objects.exclude(pk=original.pk).get()
    assert (copy.title, copy.data, copy.recipient) == ("Again", {"a": 1}, alice)


@pytest.mark.django_db
def test_topic_admin_lists_follower_counts(root_client, alice, bob):
    topic = Topic.objects.create(slug="deploys", title="Deploys")
    Topic.objects.create(slug="quiet", title="Quiet", private=True)
    Follow.objects.create(user=alice, topic=topic)
    Follow.objects.create(user=bob, topic=topic)
    response = root_client.get("/admin/notifications/topic/")
    counts = {t.slug: t.follower_count for t in response.context["cl"].result_list}
    assert counts == {"deploys": 2, "quiet": 0}


@pytest.mark.django_db
def test_token_admin_never_shows_the_hash_and_shows_the_raw_token_once(root_client, alice):
    response = root_client.post(
        "/admin/notifications/apitoken/add/", {"user": alice.pk, "name": "ci", "expires_at_0": "", "expires_at_1": ""},
    )
    token = ApiToken.objects.get()
    assert response.status_code == 200
    raw = response.context["raw"]
    assert raw.startswith(f"ntf_{token.prefix}_") and raw in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    # Not in any cookie (Django's messages cookie is signed, not encrypted: anyone can read it).
    assert all(raw not in morsel.value for morsel in response.cookies.values())
    assert all(raw not in str(m) for m in response.wsgi_request._messages)
    listing = root_client.get("/admin/notifications/apitoken/").content.decode()
    assert token.key_hash not in listing and raw not in listing


# Disconnecting


@pytest.mark.django_db(transaction=True)
async def test_disconnect_action_closes_every_live_connection_with_4003(layer, ws, root_client, alice, alice_token,
                                                                        bob_token):
    tab1, _ = await ws(alice_token)
    tab2, _ = await ws(alice_token)
    other, _ = await ws(bob_token)
    response = await sync_to_async(root_client.post)(
        "/admin/auth/user/", {"action": "disconnect", "_selected_action": [alice.pk]}
    )
    assert response.status_code == 302
    for tab in (tab1, tab2):
        assert await tab.receive_json_from(timeout=5) == {
            "type": "error", "code": "disconnected", "message": "disconnected by an administrator",
        }
        assert (await tab.receive_output(timeout=5))["code"] == 4003
    await other.send_json_to({"type": "ping"})
    assert await other.receive_json_from(timeout=5) == {"type": "pong"}


@pytest.mark.django_db(transaction=True)
async def test_revoking_a_token_closes_only_connections_opened_with_it(layer, ws, root_client, alice):
    token, raw = await sync_to_async(token_create)(user=alice)
    _, other_raw = await sync_to_async(token_create)(user=alice)
    revoked, _ = await ws(raw)
    kept, _ = await ws(other_raw)
    await sync_to_async(root_client.post)(
        "/admin/notifications/apitoken/", {"action": "revoke", "_selected_action": [token.pk]}
    )
    assert await revoked.receive_json_from(timeout=5) == {
        "type": "error", "code": "disconnected", "message": "token revoked",
    }
    assert (await revoked.receive_output(timeout=5))["code"] == 4003
    await kept.send_json_to({"type": "ping"})
    assert await kept.receive_json_from(timeout=5) == {"type": "pong"}


# Who is online


@pytest.mark.django_db(transaction=True)
async def test_online_page_lists_connections_with_client_ip_and_user_agent(ws, root_client, alice, alice_token,
                                                                           settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "PRESENCE_BACKEND": "notifications.presence.LocalPresence",
                              "TRUSTED_PROXIES": ["127.0.0.1"]}
    topic = await sync_to_async(Topic.objects.create)(slug="deploys", title="Deploys")
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    await ws(alice_token, headers=[(b"user-agent", b"TestPhone/1.0"), (b"x-forwarded-for", b"203.0.113.9")])
    await ws(alice_token, headers=[(b"user-agent", b"TestDesk/2.0")])
    response = await sync_to_async(root_client.get)(ONLINE_URL)
    page = response.content.decode()
    assert response.context["connection_count"] == 2
    (entry,) = response.context["users"]
    assert entry["username"] == "alice" and len(entry["connections"]) == 2
    # WebsocketCommunicator's peer is 127.0.0.1 (trusted here), so the forwarded address is believed.
    assert {c.ip for c in entry["connections"]} == {"203.0.113.9", "127.0.0.1"}
    assert "TestPhone/1.0" in page and "TestDesk/2.0" in page
    assert response.context["topics"] == [("deploys", 2)]


def test_local_presence_lists_only_open_connections():
    presence = LocalPresence()
    import asyncio

    async def scenario():
        await presence.add(Connection(id="a", user_id=1, username="alice", since=2.0))
        await presence.add(Connection(id="b", user_id=2, username="bob", since=1.0))
        await presence.remove("a")

    asyncio.run(scenario())
    assert [c.id for c in presence.online()] == ["b"]


@pytest.mark.redis
async def test_redis_presence_is_shared_by_processes_and_forgets_crashed_ones(redis_url):
    import time
    import uuid

    prefix = f"test-{uuid.uuid4().hex[:8]}"
    server_a = RedisPresence(url=redis_url, prefix=prefix, ttl=1.5)
    server_b = RedisPresence(url=redis_url, prefix=prefix, ttl=1.5)
    await server_a.add(Connection(id="a1", user_id=1, username="alice", since=time.time(), server="a"))
    await server_b.add(Connection(id="b1", user_id=1, username="alice", since=time.time(), server="b",
                                  topics=["deploys"]))
    listing = await sync_to_async(server_a.online)()
    assert {(c.id, c.server, tuple(c.topics)) for c in listing} == {("a1", "a", ()), ("b1", "b", ("deploys",))}
    # Server b "crashes": it stops heartbeating and never removes its connection.
    server_b.local.clear()
    for task in server_b._heartbeats.values():
        task.cancel()
    import asyncio

    await asyncio.sleep(2.2)  # past the TTL; server a keeps heartbeating every ttl/3
    assert [c.id for c in await sync_to_async(server_b.online)()] == ["a1"]
    await server_a.remove("a1")
    assert await sync_to_async(server_a.online)() == []


def test_admin_urls_resolve():
    assert reverse("admin:notifications_send") == SEND_URL
    assert reverse("admin:notifications_online") == ONLINE_URL


