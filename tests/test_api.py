"""The REST API under /api/: every endpoint, every error status, both ways to authenticate."""

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.middleware.csrf import CSRF_ALLOWED_CHARS
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.crypto import get_random_string

from notifications import selectors, services
from notifications.auth import ticket_consume, token_create, token_revoke
from notifications.models import ApiToken, Follow, Notification, Receipt, Topic

from .conftest import token_for

pytestmark = [pytest.mark.django_db]

SEND = "/api/notifications/"
INBOX = "/api/notifications/"
UNREAD = "/api/notifications/unread-count/"
READ_ALL = "/api/notifications/read-all/"
TOPICS = "/api/topics/"
TICKET = "/api/ws-ticket/"
UNAUTHENTICATED = "Authentication required: a Bearer token or a session."
NOT_VALID = "The request is not valid."
ONE_AUDIENCE = "Give exactly one audience: users, topic, or broadcast=True."


def read_url(notification_id: int) -> str:
    return f"/api/notifications/{notification_id}/read/"


def dismiss_url(notification_id: int) -> str:
    return f"/api/notifications/{notification_id}/"


def follow_url(slug: str) -> str:
    return f"/api/topics/{slug}/follow/"


def auth(token: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def call(client, method: str, path: str, token: str | None = None, body=None, **extra):
    """One API request: a JSON body when ``body`` is given (else none), bearer auth when ``token`` is."""
    if token is not None:
        extra |= auth(token)
    if method == "get":
        return client.get(path, **extra)
    data = "" if body is None else body
    return getattr(client, method)(path, data, content_type="application/json", **extra)


def send(client, token: str, **body):
    return call(client, "post", SEND, token, body)


def inbox(client, token: str, query: str = "") -> dict:
    response = call(client, "get", INBOX + query, token)
    assert response.status_code == 200, response.content
    return response.json()


def inbox_ids(client, token: str, query: str = "") -> list[int]:
    return [item["id"] for item in inbox(client, token, query)["results"]]


def unread(client, token: str) -> int:
    response = call(client, "get", UNREAD, token)
    assert response.status_code == 200, response.content
    return response.json()["unread_count"]


def assert_error(response, status: int, code: str, message: str, fields: dict | None = None) -> None:
    """The response is exactly the JSON error body ``{"error": {"code", "message", "fields"?}}``."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    error = {"code": code, "message": message}
    if fields is not None:
        error["fields"] = fields
    assert response.json() == {"error": error}


def expected_item(notification: Notification, *, read: bool = False) -> dict:
    """The JSON a client sees for a stored notification."""
    notification.refresh_from_db()
    return {
        "id": notification.id,
        "audience": notification.audience,
        "title": notification.title,
        "body": notification.body,
        "level": notification.level,
        "data": notification.data,
        "link": notification.link or None,
        "topic": notification.topic.slug if notification.topic_id else None,
        "actor": notification.actor.username if notification.actor_id else None,
        "created_at": notification.created_at.isoformat(),
        "read": read,
    }


def personal(user, title: str = "hello", **fields) -> Notification:
    return services.notification_send(users=[user], title=title, **fields)[0]


@pytest.fixture
def deploys():
    return Topic.objects.create(slug="deploys", title="Deploys")


@pytest.fixture
def security():
    return Topic.objects.create(slug="security", title="Security", private=True)


@pytest.fixture
def csrf_client():
    """A test client that enforces CSRF like a browser session would."""
    return Client(enforce_csrf_checks=True)


def with_csrf_cookie(client) -> str:
    """Give the client a CSRF cookie and return the token to echo in X-CSRFToken."""
    token = get_random_string(32, CSRF_ALLOWED_CHARS)
    client.cookies[django_settings.CSRF_COOKIE_NAME] = token
    return token


# Authentication

EVERY_ENDPOINT = [
    ("post", SEND),
    ("get", INBOX),
    ("get", UNREAD),
    ("post", READ_ALL),
    ("post", read_url(1)),
    ("delete", dismiss_url(1)),
    ("get", TOPICS),
    ("post", follow_url("deploys")),
    ("delete", follow_url("deploys")),
    ("post", TICKET),
]
WRITES = [(method, path) for method, path in EVERY_ENDPOINT if method != "get"]


@pytest.mark.parametrize(("method", "path"), EVERY_ENDPOINT)
def test_request_without_credentials_gets_401(client, method, path):
    response = call(client, method, path)
    assert_error(response, 401, "unauthenticated", UNAUTHENTICATED)


@pytest.mark.parametrize(("method", "path"), EVERY_ENDPOINT)
def test_invalid_token_gets_401(client, alice, method, path):
    response = call(client, method, path, "ntf_000000000000_not-a-real-token")
    assert_error(response, 401, "invalid_token", "The token is not valid.")


def test_token_with_wrong_secret_gets_401(client, alice):
    token, raw = token_create(user=alice)
    response = call(client, "get", UNREAD, raw[:-4] + "AAAA")
    assert_error(response, 401, "invalid_token", "The token is not valid.")


def test_non_bearer_authorization_header_gets_401(client, alice, alice_token):
    response = call(client, "get", UNREAD, HTTP_AUTHORIZATION=f"Token {alice_token}")
    assert_error(response, 401, "invalid_authorization", "Use 'Authorization: Bearer <token>'.")


def test_revoked_token_gets_401_token_revoked(client, alice):
    token, raw = token_create(user=alice)
    token_revoke(token)
    response = call(client, "get", UNREAD, raw)
    assert_error(response, 401, "token_revoked", "The token was revoked.")


def test_expired_token_gets_401_token_expired(client, alice):
    _, raw = token_create(user=alice, expires_at=timezone.now() - timedelta(seconds=1))
    response = call(client, "get", UNREAD, raw)
    assert_error(response, 401, "token_expired", "The token has expired.")


def test_token_of_inactive_user_gets_401(client, alice, alice_token):
    alice.is_active = False
    alice.save(update_fields=["is_active"])
    response = call(client, "get", UNREAD, alice_token)
    assert_error(response, 401, "user_inactive", "The user is inactive.")


def test_bearer_token_records_last_use(client, alice, alice_token):
    assert ApiToken.objects.get(user=alice).last_used_at is None
    call(client, "get", UNREAD, alice_token)
    assert ApiToken.objects.get(user=alice).last_used_at is not None


def test_session_read_needs_no_csrf_token(csrf_client, alice):
    personal(alice)
    csrf_client.force_login(alice)
    response = csrf_client.get(UNREAD)
    assert response.status_code == 200
    assert response.json() == {"unread_count": 1}


@pytest.mark.parametrize(("method", "path"), WRITES)
def test_session_write_without_csrf_token_gets_403(csrf_client, staff, method, path):
    csrf_client.force_login(staff)
    response = call(csrf_client, method, path, body={})
    assert_error(response, 403, "csrf_failed", "CSRF check failed: send the X-CSRFToken header with session auth.")


def test_session_write_with_csrf_cookie_but_no_header_gets_403(csrf_client, alice):
    csrf_client.force_login(alice)
    with_csrf_cookie(csrf_client)
    response = call(csrf_client, "post", READ_ALL, body={})
    assert_error(response, 403, "csrf_failed", "CSRF check failed: send the X-CSRFToken header with session auth.")


def test_session_write_with_wrong_csrf_header_gets_403(csrf_client, alice):
    csrf_client.force_login(alice)
    with_csrf_cookie(csrf_client)
    response = call(csrf_client, "post", READ_ALL, body={}, HTTP_X_CSRFTOKEN=get_random_string(32))
    assert_error(response, 403, "csrf_failed", "CSRF check failed: send the X-CSRFToken header with session auth.")


def test_session_write_with_csrf_header_succeeds(csrf_client, alice):
    notification = personal(alice)
    csrf_client.force_login(alice)
    csrf = with_csrf_cookie(csrf_client)
    response = call(csrf_client, "post", read_url(notification.id), body={}, HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 200, response.content
    assert response.json() == {"id": notification.id, "unread_count": 0}


def test_staff_session_with_csrf_header_can_send(csrf_client, staff, alice):
    csrf_client.force_login(staff)
    csrf = with_csrf_cookie(csrf_client)
    response = call(csrf_client, "post", SEND, body={"title": "hi", "users": ["alice"]}, HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 201, response.content
    assert Notification.objects.get().recipient == alice


def test_bearer_write_needs_no_csrf_token(csrf_client, alice, alice_token):
    personal(alice)
    response = call(csrf_client, "post", READ_ALL, alice_token, {})
    assert response.status_code == 200, response.content
    assert response.json() == {"unread_count": 0}


def test_bearer_token_wins_over_session(csrf_client, alice, bob, bob_token):
    personal(alice)
    csrf_client.force_login(alice)
    response = call(csrf_client, "get", UNREAD, bob_token)
    assert response.json() == {"unread_count": 0}


# POST /api/notifications/: who may send


def test_non_staff_token_gets_403_on_send(client, alice, alice_token):
    response = send(client, alice_token, title="hi", users=["alice"])
    assert_error(response, 403, "forbidden", "Only staff with the 'add notification' permission may send.")
    assert not Notification.objects.exists()


def test_staff_without_permission_gets_403_on_send(client, make_user, alice):
    plain_staff = make_user("plainstaff", is_staff=True)
    response = send(client, token_for(plain_staff), title="hi", users=["alice"])
    assert_error(response, 403, "forbidden", "Only staff with the 'add notification' permission may send.")
    assert not Notification.objects.exists()


def test_permission_without_staff_flag_gets_403_on_send(client, make_user, alice):
    superuser = make_user("root", is_superuser=True)
    response = send(client, token_for(superuser), title="hi", users=["alice"])
    assert_error(response, 403, "forbidden", "Only staff with the 'add notification' permission may send.")


def test_non_staff_session_gets_403_on_send(csrf_client, alice):
    csrf_client.force_login(alice)
    csrf = with_csrf_cookie(csrf_client)
    response = call(csrf_client, "post", SEND, body={"title": "hi", "users": ["alice"]}, HTTP_X_CSRFTOKEN=csrf)
    assert_error(response, 403, "forbidden", "Only staff with the 'add notification' permission may send.")


# POST /api/notifications/: audiences and the 201 body


def test_send_to_users_by_username_stores_one_row_each(client, staff, staff_token, alice, bob):
    response = send(
        client,
        staff_token,
        title="Deploy finished",
        body="web-42 is live",
        level="success",
        data={"build": 42},
        link="/deploys/42/",
        users=["alice", "bob"],
    )
    assert response.status_code == 201, response.content
    rows = {n.recipient.username: n for n in Notification.objects.all()}
    assert set(rows) == {"alice", "bob"}
    assert response.json() == {
        "notifications": [
            {
                "id": rows[name].id,
                "audience": "user",
                "title": "Deploy finished",
                "body": "web-42 is live",
                "level": "success",
                "data": {"build": 42},
                "link": "/deploys/42/",
                "topic": None,
                "actor": "staff",
                "created_at": rows[name].created_at.isoformat(),
                "read": False,
            }
            for name in ("alice", "bob")
        ]
    }


def test_send_to_users_by_id_and_username(client, staff_token, alice, bob, make_user):
    carol = make_user("carol")
    response = send(client, staff_token, title="hi", users=[alice.pk, "bob", carol.pk])
    assert response.status_code == 201, response.content
    assert sorted(n["id"] for n in response.json()["notifications"]) == sorted(
        Notification.objects.values_list("id", flat=True)
    )
    assert {n.recipient_id for n in Notification.objects.all()} == {alice.pk, bob.pk, carol.pk}


def test_send_to_same_user_twice_stores_one_row(client, staff_token, alice):
    response = send(client, staff_token, title="hi", users=["alice", alice.pk, "alice"])
    assert response.status_code == 201, response.content
    assert len(response.json()["notifications"]) == 1
    assert Notification.objects.count() == 1


def sent(row: Notification, **fields) -> dict:
    """The 201 item of a freshly sent notification: defaults, overridden by ``fields``."""
    return {
        "id": row.id,
        "audience": "user",
        "title": "hi",
        "body": "",
        "level": "info",
        "data": {},
        "link": None,
        "topic": None,
        "actor": "staff",
        "created_at": row.created_at.isoformat(),
        "read": False,
    } | fields


def test_send_defaults_level_info_empty_body_and_data(client, staff_token, alice):
    response = send(client, staff_token, title="hi", users=["alice"])
    assert response.status_code == 201, response.content
    assert response.json() == {"notifications": [sent(Notification.objects.get())]}


def test_send_to_topic_stores_one_row(client, staff_token, deploys, alice, bob):
    services.topic_follow(user=alice, topic=deploys)
    services.topic_follow(user=bob, topic=deploys)
    response = send(client, staff_token, title="v2 shipped", topic="deploys")
    assert response.status_code == 201, response.content
    row = Notification.objects.get()
    assert (row.audience, row.topic, row.recipient) == ("topic", deploys, None)
    assert response.json() == {"notifications": [sent(row, audience="topic", title="v2 shipped", topic="deploys")]}


def test_send_broadcast_stores_one_row(client, staff_token, alice, bob):
    response = send(client, staff_token, title="Maintenance at 22:00", level="warning", broadcast=True)
    assert response.status_code == 201, response.content
    row = Notification.objects.get()
    assert (row.audience, row.topic, row.recipient) == ("broadcast", None, None)
    assert response.json() == {
        "notifications": [sent(row, audience="broadcast", title="Maintenance at 22:00", level="warning")]
    }


def test_send_with_absolute_link(client, staff_token, alice):
    response = send(client, staff_token, title="hi", link="https://example.com/a?b=1", users=["alice"])
    assert response.json() == {"notifications": [sent(Notification.objects.get(), link="https://example.com/a?b=1")]}


def test_send_returns_and_stores_data_object_verbatim(client, staff_token, alice):
    data = {
        "nested": {"list": [1, 2.5, "three", None, True, {"deep": []}]},
        "unicode": "café ☕ 日本",
        "empty": {},
        "big": 9007199254740993,
        "negative": -0.125,
        'quote"key': "line\nbreak",
    }
    response = send(client, staff_token, title="data", data=data, users=["alice"])
    assert response.status_code == 201, response.content
    assert response.json()["notifications"][0]["data"] == data
    assert Notification.objects.get().data == data
    assert inbox(client, token_for(alice))["results"][0]["data"] == data


@pytest.mark.parametrize(
    ("audiences", "message", "fields"),
    [
        ({}, ONE_AUDIENCE, None),
        ({"broadcast": False}, ONE_AUDIENCE, None),
        ({"users": ["alice"], "broadcast": True}, ONE_AUDIENCE, None),
        ({"topic": "deploys", "broadcast": True}, ONE_AUDIENCE, None),
        ({"users": ["alice"], "topic": "deploys"}, ONE_AUDIENCE, None),
        ({"users": []}, NOT_VALID, {"users": "users must list 1 to 10000 users."}),
    ],
    ids=["none", "broadcast-false", "users-and-broadcast", "topic-and-broadcast", "users-and-topic", "no-users"],
)
def test_send_without_exactly_one_audience_gets_400(client, staff_token, alice, deploys, audiences, message, fields):
    response = send(client, staff_token, title="hi", **audiences)
    assert_error(response, 400, "invalid", message, fields)
    assert not Notification.objects.exists()


def test_send_to_unknown_username_gets_400_with_users_field(client, staff_token, alice):
    response = send(client, staff_token, title="hi", users=["alice", "ghost"])
    assert_error(response, 400, "invalid", NOT_VALID, {"users": "Unknown users: ['ghost']"})
    assert not Notification.objects.exists()


def test_send_to_unknown_user_id_gets_400_with_users_field(client, staff_token, alice):
    response = send(client, staff_token, title="hi", users=[alice.pk, 987654])
    assert_error(response, 400, "invalid", NOT_VALID, {"users": "Unknown or inactive user ids: [987654]"})
    assert not Notification.objects.exists()


def test_send_to_inactive_user_gets_400(client, staff_token, make_user):
    make_user("gone", is_active=False)
    response = send(client, staff_token, title="hi", users=["gone"])
    assert_error(response, 400, "invalid", NOT_VALID, {"users": "Unknown users: ['gone']"})


def test_send_to_out_of_range_user_id_gets_400_not_500(client, staff_token, alice):
    response = send(client, staff_token, title="hi", users=[2**70])
    assert_error(response, 400, "invalid", NOT_VALID, {"users": f"Unknown or inactive user ids: [{2**70}]"})


@pytest.mark.parametrize(
    ("users", "fields"),
    [
        ([True], {"users.0": "Input should be a valid integer"}),
        (["alice", 1.5], {"users.1": "Input should be a valid integer"}),
        ([{"id": 1}], {"users.0": "Input should be a valid integer"}),
        ("alice", {"users": "Input should be a valid list"}),
    ],
    ids=["bool", "float", "object", "not-a-list"],
)
def test_send_with_users_that_are_not_ids_or_usernames_gets_400(client, staff_token, alice, users, fields):
    response = send(client, staff_token, title="hi", users=users)
    assert_error(response, 400, "invalid", NOT_VALID, fields)
    assert not Notification.objects.exists()


def test_send_to_more_than_10000_users_gets_400(client, staff_token, alice):
    response = send(client, staff_token, title="hi", users=["alice"] * 10_001)
    assert_error(
        response,
        400,
        "invalid",
        NOT_VALID,
        {"users": "List should have at most 10000 items after validation, not 10001"},
    )


def test_send_with_non_boolean_broadcast_gets_400(client, staff_token, alice):
    response = send(client, staff_token, title="hi", broadcast="yes")
    assert_error(response, 400, "invalid", NOT_VALID, {"broadcast": "Input should be a valid boolean"})
    assert not Notification.objects.exists()


def test_send_to_unknown_topic_gets_400(client, staff_token):
    response = send(client, staff_token, title="hi", topic="nope")
    assert_error(response, 400, "invalid", NOT_VALID, {"topic": "Unknown topic 'nope'."})


@pytest.mark.parametrize("data", [[1, 2], "text", 3, True], ids=["list", "string", "number", "bool"])
def test_send_with_data_that_is_not_an_object_gets_400(client, staff_token, alice, data):
    response = send(client, staff_token, title="hi", data=data, users=["alice"])
    assert_error(response, 400, "invalid", NOT_VALID, {"data": "Input should be a valid dictionary"})


def test_send_with_unknown_level_gets_400(client, staff_token, alice):
    response = send(client, staff_token, title="hi", level="critical", users=["alice"])
    assert_error(
        response, 400, "invalid", NOT_VALID, {"level": "Input should be 'info', 'success', 'warning' or 'error'"}
    )


def test_send_with_unknown_field_gets_400(client, staff_token, alice):
    response = send(client, staff_token, title="hi", users=["alice"], priority=5)
    assert_error(response, 400, "invalid", NOT_VALID, {"priority": "Extra inputs are not permitted"})


def test_send_without_title_gets_400(client, staff_token, alice):
    response = send(client, staff_token, body="no title", users=["alice"])
    assert_error(response, 400, "invalid", NOT_VALID, {"title": "Field required"})


def test_send_with_blank_title_gets_400(client, staff_token, alice):
    response = send(client, staff_token, title="   ", users=["alice"])
    assert_error(response, 400, "invalid", NOT_VALID, {"title": "title is required, at most 200 characters."})


def test_send_with_wrong_body_type_gets_400_naming_the_body_field(client, staff_token, alice):
    response = send(client, staff_token, title="hi", body=5, users=["alice"])
    assert_error(response, 400, "invalid", NOT_VALID, {"body": "Input should be a valid string"})


def test_send_with_javascript_link_gets_400(client, staff_token, alice):
    response = send(client, staff_token, title="hi", link="javascript:alert(1)", users=["alice"])
    assert_error(
        response, 400, "invalid", NOT_VALID, {"link": "link must be an http(s) URL or a path starting with '/'."}
    )


@pytest.mark.parametrize("link", ["/\\evil.example", "/\t/evil.example", "/\n/evil.example", "/ /evil.example",
                                  "https://example.com/a\\b"])
def test_send_with_a_link_browsers_read_as_off_site_gets_400(client, staff_token, alice, link):
    response = send(client, staff_token, title="hi", link=link, users=["alice"])
    assert_error(response, 400, "invalid", NOT_VALID,
                 {"link": "link may not contain backslashes, spaces or control characters."})
    assert not Notification.objects.exists()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"title": "hi", ',
        b'{"title": "hi", "broadcast": true,}',
        b'{"title": "hi", "broadcast": true, "data": {"x": NaN}}',
        b'{"title": "hi", "broadcast": true, "data": {"x": -Infinity}}',
        b'\xff\xfe{"title": "hi"}',
        b"[" * 100_000,
    ],
    ids=["truncated", "trailing-comma", "nan", "infinity", "not-utf8", "too-deep"],
)
def test_send_with_invalid_json_gets_400_bad_json(client, staff_token, alice, raw):
    response = client.post(SEND, raw, content_type="application/json", **auth(staff_token))
    assert_error(response, 400, "bad_json", "The body is not valid JSON.")
    assert not Notification.objects.exists()


@pytest.mark.parametrize("raw", ["[1, 2]", "null", '"hi"', "42"])
def test_send_with_body_that_is_not_an_object_gets_400(client, staff_token, alice, raw):
    response = client.post(SEND, raw, content_type="application/json", **auth(staff_token))
    assert_error(response, 400, "invalid", "The body must be a JSON object.")


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"]
)
def test_send_with_non_json_content_type_gets_415(client, staff_token, alice, content_type):
    response = client.post(SEND, '{"title": "hi", "users": ["alice"]}', content_type=content_type, **auth(staff_token))
    assert_error(response, 415, "unsupported_media_type", "Send the body as application/json.")
    assert not Notification.objects.exists()


def test_send_with_json_charset_content_type_is_accepted(client, staff_token, alice):
    response = client.post(
        SEND,
        '{"title": "hi", "users": ["alice"]}',
        content_type="application/json; charset=utf-8",
        **auth(staff_token),
    )
    assert response.status_code == 201, response.content


def test_body_over_the_limit_gets_413(client, settings, staff_token, alice):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "API_MAX_BODY_BYTES": 100}
    response = send(client, staff_token, title="hi", body="x" * 200, users=["alice"])
    assert_error(response, 413, "body_too_large", "Request bodies are limited to 100 bytes.")
    assert not Notification.objects.exists()


def test_body_under_the_limit_is_accepted(client, settings, staff_token, alice):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "API_MAX_BODY_BYTES": 100}
    response = send(client, staff_token, title="hi", users=["alice"])
    assert response.status_code == 201, response.content


# O(1) rows and queries for topic and broadcast sends


@pytest.mark.parametrize("audience", ["topic", "broadcast"])
def test_topic_and_broadcast_sends_cost_the_same_queries_for_1_and_1000_users(
    audience, django_user_model, deploys, staff, django_capture_on_commit_callbacks, django_assert_num_queries
):
    audience_kwargs = {"topic": "deploys"} if audience == "topic" else {"broadcast": True}

    def send_counting_queries() -> int:
        with CaptureQueriesContext(connection) as queries:
            with django_capture_on_commit_callbacks(execute=True) as callbacks:
                services.notification_send(title="hi", actor=staff, **audience_kwargs)
        assert len(callbacks) == 1  # one push per send, not one per user
        return len(queries)

    first = django_user_model.objects.create(username="reader-0")
    Follow.objects.create(user=first, topic=deploys)
    queries_for_one = send_counting_queries()
    assert Notification.objects.count() == 1

    django_user_model.objects.bulk_create([django_user_model(username=f"reader-{i}") for i in range(1, 1000)])
    readers = list(django_user_model.objects.filter(username__startswith="reader-"))
    assert len(readers) == 1000
    Follow.objects.bulk_create([Follow(user=u, topic=deploys) for u in readers if u != first])
    queries_for_thousand = send_counting_queries()

    assert queries_for_thousand == queries_for_one
    assert Notification.objects.count() == 2
    last = django_user_model.objects.get(username="reader-999")
    with django_assert_num_queries(1):
        assert selectors.unread_count_for(last) == 1
    with django_assert_num_queries(1):
        assert selectors.unread_count_for(first) == 2


# GET /api/notifications/


def test_inbox_lists_own_notifications_newest_first(client, alice, bob, alice_token):
    older = personal(alice, "older")
    personal(bob, "bob's")
    newer = personal(alice, "newer", level="error", data={"k": "v"}, link="https://example.com/x")
    assert inbox(client, alice_token) == {"results": [expected_item(newer), expected_item(older)], "next_before": None}


def test_inbox_is_empty_for_a_new_user(client, alice, alice_token):
    assert inbox(client, alice_token) == {"results": [], "next_before": None}


def test_inbox_unread_filter_hides_read_notifications(client, alice, alice_token):
    first, second, third = (personal(alice, str(i)) for i in range(3))
    services.notification_mark_read(user=alice, ids=[second.id])
    assert inbox_ids(client, alice_token, "?unread=true") == [third.id, first.id]
    assert inbox_ids(client, alice_token, "?unread=false") == [third.id, second.id, first.id]
    assert [i["read"] for i in inbox(client, alice_token)["results"]] == [False, True, False]


def test_inbox_pages_with_before_cursor(client, alice, alice_token):
    ids = [personal(alice, str(i)).id for i in range(5)][::-1]
    page1 = inbox(client, alice_token, "?limit=2")
    assert [i["id"] for i in page1["results"]] == ids[:2]
    assert page1["next_before"] == ids[1]
    page2 = inbox(client, alice_token, f"?limit=2&before={page1['next_before']}")
    assert [i["id"] for i in page2["results"]] == ids[2:4]
    assert page2["next_before"] == ids[3]
    page3 = inbox(client, alice_token, f"?limit=2&before={page2['next_before']}")
    assert [i["id"] for i in page3["results"]] == ids[4:]
    assert page3["next_before"] is None


def test_inbox_pages_unread_only_with_before_cursor(client, alice, alice_token):
    ids = [personal(alice, str(i)).id for i in range(6)][::-1]
    services.notification_mark_read(user=alice, ids=[ids[1], ids[3]])
    unread_ids = [ids[0], ids[2], ids[4], ids[5]]
    page1 = inbox(client, alice_token, "?unread=true&limit=2")
    assert [i["id"] for i in page1["results"]] == unread_ids[:2]
    page2 = inbox(client, alice_token, f"?unread=true&limit=2&before={page1['next_before']}")
    assert [i["id"] for i in page2["results"]] == unread_ids[2:]


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        ("?limit=0", {"limit": "Input should be greater than or equal to 1"}),
        ("?limit=1000", {"limit": "Input should be less than or equal to 100"}),
        ("?limit=ten", {"limit": "Input should be a valid integer, unable to parse string as an integer"}),
        ("?before=0", {"before": "Input should be greater than or equal to 1"}),
        ("?unread=maybe", {"unread": "Input should be a valid boolean, unable to interpret input"}),
    ],
)
def test_inbox_with_bad_query_gets_400(client, alice_token, query, fields):
    response = call(client, "get", INBOX + query, alice_token)
    assert_error(response, 400, "invalid", NOT_VALID, fields)


def test_inbox_with_out_of_range_cursor_gets_400_not_500(client, alice, alice_token):
    response = call(client, "get", INBOX + f"?before={2**70}", alice_token)
    assert_error(response, 400, "invalid", NOT_VALID, {"before": f"Input should be less than or equal to {2**63 - 1}"})


def test_inbox_accepts_the_largest_limit(client, alice, alice_token):
    for i in range(3):
        personal(alice, str(i))
    assert len(inbox(client, alice_token, "?limit=100")["results"]) == 3


# POST /api/notifications/{id}/read/


def test_mark_read_returns_new_unread_count(client, alice, alice_token):
    first, _ = personal(alice, "1"), personal(alice, "2")
    response = call(client, "post", read_url(first.id), alice_token)
    assert response.status_code == 200, response.content
    assert response.json() == {"id": first.id, "unread_count": 1}
    assert [i["read"] for i in inbox(client, alice_token)["results"]] == [False, True]


def test_mark_read_twice_is_harmless(client, alice, alice_token):
    notification = personal(alice)
    call(client, "post", read_url(notification.id), alice_token)
    response = call(client, "post", read_url(notification.id), alice_token)
    assert response.json() == {"id": notification.id, "unread_count": 0}
    assert Receipt.objects.filter(user=alice).count() == 1


def test_mark_read_of_another_users_notification_gets_404(client, alice, bob, alice_token):
    bobs = personal(bob)
    response = call(client, "post", read_url(bobs.id), alice_token)
    assert_error(response, 404, "not_found", f"No notification with id(s) [{bobs.id}] in your inbox.")
    assert not Receipt.objects.exists()


def test_mark_read_of_unknown_id_gets_404(client, alice, alice_token):
    response = call(client, "post", read_url(424242), alice_token)
    assert_error(response, 404, "not_found", "No notification with id(s) [424242] in your inbox.")


@pytest.mark.parametrize("method", ["post", "delete"])
def test_out_of_range_notification_id_gets_404_not_500(client, alice, alice_token, method):
    url = read_url(2**70) if method == "post" else dismiss_url(2**70)
    response = call(client, method, url, alice_token)
    assert_error(response, 404, "not_found", f"No notification with id(s) [{2**70}] in your inbox.")


def test_mark_read_with_non_numeric_id_gets_json_404(client, alice_token):
    response = call(client, "post", "/api/notifications/abc/read/", alice_token)
    assert_error(response, 404, "not_found", "No such API endpoint.")


def test_mark_read_of_topic_notification_from_before_following_gets_404(client, alice, alice_token, deploys):
    early = services.notification_send(topic=deploys, title="before alice followed")[0]
    services.topic_follow(user=alice, topic=deploys)
    response = call(client, "post", read_url(early.id), alice_token)
    assert_error(response, 404, "not_found", f"No notification with id(s) [{early.id}] in your inbox.")


# POST /api/notifications/read-all/


def test_mark_all_read_marks_every_visible_notification_read(client, alice, alice_token, deploys):
    services.topic_follow(user=alice, topic=deploys)
    personal(alice)
    services.notification_send(topic=deploys, title="topic")
    services.notification_send(broadcast=True, title="everyone")
    assert unread(client, alice_token) == 3
    response = call(client, "post", READ_ALL, alice_token)
    assert response.status_code == 200, response.content
    assert response.json() == {"unread_count": 0}
    assert [i["read"] for i in inbox(client, alice_token)["results"]] == [True, True, True]
    assert inbox(client, alice_token, "?unread=true") == {"results": [], "next_before": None}


def test_mark_all_read_with_empty_inbox_returns_zero(client, alice, alice_token):
    response = call(client, "post", READ_ALL, alice_token)
    assert response.json() == {"unread_count": 0}


def test_notification_after_mark_all_read_is_unread(client, alice, alice_token):
    personal(alice, "old")
    call(client, "post", READ_ALL, alice_token)
    new = personal(alice, "new")
    assert unread(client, alice_token) == 1
    assert inbox_ids(client, alice_token, "?unread=true") == [new.id]


# DELETE /api/notifications/{id}/


def test_dismiss_removes_notification_from_inbox_and_unread_count(client, alice, alice_token):
    keep, gone = personal(alice, "keep"), personal(alice, "gone")
    response = call(client, "delete", dismiss_url(gone.id), alice_token)
    assert response.status_code == 200, response.content
    assert response.json() == {"id": gone.id, "unread_count": 1}
    assert inbox_ids(client, alice_token) == [keep.id]
    assert unread(client, alice_token) == 1
    assert Notification.objects.filter(pk=gone.id).exists()  # dismissed for alice, not deleted


def test_dismiss_twice_gets_404(client, alice, alice_token):
    notification = personal(alice)
    call(client, "delete", dismiss_url(notification.id), alice_token)
    response = call(client, "delete", dismiss_url(notification.id), alice_token)
    assert_error(response, 404, "not_found", f"No notification with id(s) [{notification.id}] in your inbox.")


def test_mark_read_of_dismissed_notification_gets_404(client, alice, alice_token):
    notification = personal(alice)
    call(client, "delete", dismiss_url(notification.id), alice_token)
    response = call(client, "post", read_url(notification.id), alice_token)
    assert_error(response, 404, "not_found", f"No notification with id(s) [{notification.id}] in your inbox.")


def test_dismiss_of_another_users_notification_gets_404(client, alice, bob, alice_token, bob_token):
    bobs = personal(bob)
    response = call(client, "delete", dismiss_url(bobs.id), alice_token)
    assert_error(response, 404, "not_found", f"No notification with id(s) [{bobs.id}] in your inbox.")
    assert inbox_ids(client, bob_token) == [bobs.id]


def test_dismiss_of_unknown_id_gets_404(client, alice, alice_token):
    response = call(client, "delete", dismiss_url(424242), alice_token)
    assert_error(response, 404, "not_found", "No notification with id(s) [424242] in your inbox.")


# GET /api/notifications/unread-count/


def test_unread_count_counts_only_own_unread_notifications(client, alice, bob, alice_token):
    personal(alice)
    personal(alice)
    personal(bob)
    response = call(client, "get", UNREAD, alice_token)
    assert response.status_code == 200
    assert response.json() == {"unread_count": 2}


# Visibility and per-user state


def test_topic_notifications_are_visible_only_to_users_who_followed_before(
    client, alice, bob, make_user, alice_token, bob_token, deploys
):
    carol_token = token_for(make_user("carol"))
    assert call(client, "post", follow_url("deploys"), alice_token).status_code == 200
    first = services.notification_send(topic=deploys, title="first")[0]
    assert call(client, "post", follow_url("deploys"), bob_token).status_code == 200
    second = services.notification_send(topic=deploys, title="second")[0]

    assert inbox_ids(client, alice_token) == [second.id, first.id]
    assert inbox_ids(client, bob_token) == [second.id]
    assert inbox_ids(client, carol_token) == []
    assert [unread(client, t) for t in (alice_token, bob_token, carol_token)] == [2, 1, 0]


def test_unfollowed_topic_sends_nothing_new(client, alice, alice_token, deploys):
    call(client, "post", follow_url("deploys"), alice_token)
    call(client, "delete", follow_url("deploys"), alice_token)
    services.notification_send(topic=deploys, title="after unfollow")
    assert inbox_ids(client, alice_token) == []
    assert unread(client, alice_token) == 0


def test_broadcasts_are_visible_only_to_users_who_joined_before(client, alice, alice_token, make_user):
    first = services.notification_send(broadcast=True, title="first")[0]
    carol = make_user("carol")
    carol_token = token_for(carol)
    second = services.notification_send(broadcast=True, title="second")[0]

    assert inbox_ids(client, alice_token) == [second.id, first.id]
    assert inbox_ids(client, carol_token) == [second.id]
    assert unread(client, alice_token) == 2
    assert unread(client, carol_token) == 1


def test_read_state_of_a_broadcast_is_per_user(client, alice, bob, alice_token, bob_token):
    notification = services.notification_send(broadcast=True, title="everyone")[0]
    call(client, "post", read_url(notification.id), alice_token)
    assert unread(client, alice_token) == 0
    assert unread(client, bob_token) == 1
    assert inbox(client, bob_token)["results"][0]["read"] is False
    assert inbox(client, alice_token)["results"][0]["read"] is True


def test_dismissing_a_topic_notification_is_per_user(client, alice, bob, alice_token, bob_token, deploys):
    services.topic_follow(user=alice, topic=deploys)
    services.topic_follow(user=bob, topic=deploys)
    notification = services.notification_send(topic=deploys, title="topic")[0]
    call(client, "delete", dismiss_url(notification.id), alice_token)
    assert inbox_ids(client, alice_token) == []
    assert inbox_ids(client, bob_token) == [notification.id]


def test_mark_all_read_of_one_user_leaves_others_unread(client, alice, bob, alice_token, bob_token):
    services.notification_send(broadcast=True, title="everyone")
    call(client, "post", READ_ALL, alice_token)
    assert unread(client, alice_token) == 0
    assert unread(client, bob_token) == 1


def test_unread_count_follows_every_step(client, alice, bob, alice_token, bob_token, staff_token, deploys):
    def counts():
        return unread(client, alice_token), unread(client, bob_token)

    assert counts() == (0, 0)
    call(client, "post", follow_url("deploys"), alice_token)
    send(client, staff_token, title="to alice", users=["alice"])
    assert counts() == (1, 0)
    topic_id = send(client, staff_token, title="topic", topic="deploys").json()["notifications"][0]["id"]
    assert counts() == (2, 0)
    broadcast_id = send(client, staff_token, title="all", broadcast=True).json()["notifications"][0]["id"]
    assert counts() == (3, 1)
    call(client, "post", read_url(topic_id), alice_token)
    assert counts() == (2, 1)
    call(client, "delete", dismiss_url(broadcast_id), alice_token)
    assert counts() == (1, 1)
    call(client, "post", READ_ALL, alice_token)
    assert counts() == (0, 1)
    call(client, "delete", dismiss_url(broadcast_id), bob_token)
    assert counts() == (0, 0)
    send(client, staff_token, title="all again", broadcast=True)
    assert counts() == (1, 1)
    assert inbox_ids(client, alice_token, "?unread=true") == inbox_ids(client, bob_token, "?unread=true")


# GET /api/topics/ and follow/unfollow


def test_topics_list_hides_private_topics_from_non_members(
    client, alice, bob, alice_token, bob_token, deploys, security
):
    Topic.objects.create(slug="announcements", title="Announcements")
    security.members.add(alice)
    services.topic_follow(user=alice, topic=deploys)

    response = call(client, "get", TOPICS, alice_token)
    assert response.status_code == 200
    assert response.json() == {
        "results": [
            {"slug": "announcements", "title": "Announcements", "private": False, "following": False},
            {"slug": "deploys", "title": "Deploys", "private": False, "following": True},
            {"slug": "security", "title": "Security", "private": True, "following": False},
        ]
    }
    assert call(client, "get", TOPICS, bob_token).json() == {
        "results": [
            {"slug": "announcements", "title": "Announcements", "private": False, "following": False},
            {"slug": "deploys", "title": "Deploys", "private": False, "following": False},
        ]
    }


def test_topics_list_shows_private_topic_once_with_several_members(client, alice, bob, alice_token, security):
    security.members.add(alice, bob)
    assert call(client, "get", TOPICS, alice_token).json() == {
        "results": [{"slug": "security", "title": "Security", "private": True, "following": False}]
    }


def test_follow_public_topic(client, alice, alice_token, deploys):
    response = call(client, "post", follow_url("deploys"), alice_token)
    assert response.status_code == 200, response.content
    assert response.json() == {"topic": "deploys", "following": True}
    assert Follow.objects.filter(user=alice, topic=deploys).exists()
    assert call(client, "get", TOPICS, alice_token).json()["results"][0]["following"] is True


def test_follow_twice_keeps_one_follow(client, alice, alice_token, deploys):
    call(client, "post", follow_url("deploys"), alice_token)
    response = call(client, "post", follow_url("deploys"), alice_token)
    assert response.json() == {"topic": "deploys", "following": True}
    assert Follow.objects.filter(user=alice).count() == 1


def test_unfollow_topic(client, alice, alice_token, deploys):
    call(client, "post", follow_url("deploys"), alice_token)
    response = call(client, "delete", follow_url("deploys"), alice_token)
    assert response.status_code == 200, response.content
    assert response.json() == {"topic": "deploys", "following": False}
    assert not Follow.objects.filter(ended_at__isnull=True).exists()
    assert call(client, "get", TOPICS, alice_token).json()["results"][0]["following"] is False


def test_unfollow_a_topic_not_followed_is_harmless(client, alice, alice_token, deploys):
    response = call(client, "delete", follow_url("deploys"), alice_token)
    assert response.json() == {"topic": "deploys", "following": False}


def test_follow_private_topic_as_non_member_gets_403(client, alice, alice_token, security):
    response = call(client, "post", follow_url("security"), alice_token)
    assert_error(response, 403, "forbidden", "Topic 'security' is private; only its members may follow it.")
    assert not Follow.objects.exists()


def test_follow_private_topic_as_member(client, alice, alice_token, security):
    security.members.add(alice)
    response = call(client, "post", follow_url("security"), alice_token)
    assert response.json() == {"topic": "security", "following": True}


@pytest.mark.parametrize("method", ["post", "delete"])
def test_follow_unknown_topic_gets_404(client, alice_token, method):
    response = call(client, method, follow_url("nope"), alice_token)
    assert_error(response, 404, "not_found", "Not found.")


# POST /api/ws-ticket/


def test_ws_ticket_is_issued_for_the_caller(client, alice, alice_token):
    response = call(client, "post", TICKET, alice_token)
    assert response.status_code == 201, response.content
    body = response.json()
    ticket = body["ticket"]
    assert body == {"ticket": ticket, "expires_in": 30, "url": f"/ws/notifications/?ticket={ticket}"}
    assert ticket.startswith("tkt_")
    assert ticket_consume(ticket) == alice


def test_ws_ticket_lifetime_follows_settings(client, settings, alice_token):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_TICKET_TTL": 5}
    assert call(client, "post", TICKET, alice_token).json()["expires_in"] == 5


def test_ws_tickets_are_unique(client, alice_token):
    first = call(client, "post", TICKET, alice_token).json()["ticket"]
    second = call(client, "post", TICKET, alice_token).json()["ticket"]
    assert first != second


# Routing errors and the schema


def test_wrong_method_gets_405_json(client, alice_token):
    response = client.put(UNREAD, **auth(alice_token))
    assert_error(response, 405, "method_not_allowed", "Method PUT is not allowed here.")
    assert response["Allow"] == "GET"


def test_wrong_method_without_credentials_gets_405_json(client):
    response = client.patch(TOPICS)
    assert_error(response, 405, "method_not_allowed", "Method PATCH is not allowed here.")


def test_unknown_api_path_gets_404_json(client, alice_token):
    response = client.get("/api/nothing-here/", **auth(alice_token))
    assert_error(response, 404, "not_found", "No such API endpoint.")


def test_read_without_trailing_slash_redirects_to_the_endpoint(client, alice_token):
    response = client.get("/api/notifications", **auth(alice_token))
    assert response.status_code == 301
    assert response["Location"] == "/api/notifications/"


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("method", ["post", "delete", "put"])
def test_write_without_trailing_slash_gets_404_json_not_a_redirect(client, settings, staff_token, alice, method, debug):
    settings.DEBUG = debug
    response = call(client, method, "/api/notifications", staff_token, {"title": "hi", "users": ["alice"]})
    assert_error(response, 404, "not_found", "No such API endpoint (API paths end with '/').")
    assert not Notification.objects.exists()


def test_openapi_schema_lists_every_endpoint(client):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    schema = response.json()
    assert schema["info"]["title"] == "Notifications API"
    paths = {path: set(operations) for path, operations in schema["paths"].items()}
    assert paths == {
        "/api/notifications/": {"get", "post"},
        "/api/notifications/batch/": {"post"},
        "/api/notifications/unread-count/": {"get"},
        "/api/notifications/read-all/": {"post"},
        "/api/notifications/{notification_id}/read/": {"post"},
        "/api/notifications/{notification_id}/": {"delete"},
        "/api/topics/": {"get"},
        "/api/topics/{slug}/follow/": {"post", "delete"},
        "/api/topics/{slug}/defaults/": {"put"},
        "/api/preferences/": {"get", "put"},
        "/api/push/": {"get"},
        "/api/push/subscriptions/": {"post", "delete"},
        "/api/ws-ticket/": {"post"},
    }


@pytest.mark.django_db
def test_unfollowing_keeps_what_was_received_and_refollowing_does_not_show_the_gap(alice):
    topic = Topic.objects.create(slug="deploys", title="Deploys")
    services.topic_follow(user=alice, topic=topic)
    (kept,) = services.notification_send(topic=topic, title="while following")
    services.topic_unfollow(user=alice, topic=topic)
    services.notification_send(topic=topic, title="while not following")
    services.topic_follow(user=alice, topic=topic)
    (again,) = services.notification_send(topic=topic, title="following again")
    assert [n.title for n in selectors.inbox_for(alice)] == ["following again", "while following"]
    assert selectors.unread_count_for(alice) == 2
    assert {kept.pk, again.pk} == {n.pk for n in selectors.inbox_for(alice)}
