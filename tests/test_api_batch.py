"""POST /api/notifications/batch/: many sends in one request, one result each, one transaction."""

import threading
from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from notifications import services, streams
from notifications.models import IdempotencyKey, Notification, Stream, Topic

from .conftest import require_postgres, token_for
from .test_api import NOT_VALID, ONE_AUDIENCE, assert_error, auth, expected_item

pytestmark = [pytest.mark.django_db]

BATCH = "/api/notifications/batch/"
FORBIDDEN = "Only staff with the 'add notification' permission may send."


def post_batch(client, token: str, body):
    return client.post(BATCH, body, content_type="application/json", **auth(token))


def batch(client, token: str, items: list) -> list[dict]:
    """The results of a batch that was accepted (200)."""
    response = post_batch(client, token, {"items": items})
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("application/json")
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    return results


def stored(result: dict) -> list[Notification]:
    """The rows of a 201/200 result, checked to be exactly what the API answered."""
    rows = [Notification.objects.select_related("topic", "actor").get(pk=n["id"]) for n in result["notifications"]]
    assert result["notifications"] == [expected_item(row) for row in rows]
    return rows


def invalid(index: int, fields: dict | None = None, message: str = NOT_VALID, code: str = "invalid",
            status: int = 400) -> dict:
    error: dict = {"code": code, "message": message}
    if fields is not None:
        error["fields"] = fields
    return {"index": index, "status": status, "error": error}


def head(key: str) -> int:
    return streams.heads([key])[key]


@pytest.fixture
def deploys():
    return Topic.objects.create(slug="deploys", title="Deploys")


# Per-item results


def test_a_mixed_batch_stores_the_good_items_and_answers_400_for_each_bad_one_in_order(
    client, staff_token, alice, bob
):
    items = [
        {"title": "one", "users": ["alice"]},
        {"title": "bad level", "level": "loud", "users": ["alice"]},
        {"title": "two", "body": "b", "level": "success", "data": {"k": [1, 2]}, "link": "/x/", "users": [bob.pk]},
        {"title": "bad link", "link": "javascript:alert(1)", "users": ["alice"]},
        {"users": ["alice"]},
        "not an object",
        {"title": "two audiences", "users": ["alice"], "broadcast": True},
        {"title": "bad data", "data": [1], "users": ["alice"]},
        {"title": "extra", "users": ["alice"], "colour": "red"},
        {"title": "three", "broadcast": True},
    ]
    results = batch(client, staff_token, items)

    assert results[1] == invalid(1, {"level": "Input should be 'info', 'success', 'warning' or 'error'"})
    assert results[3] == invalid(3, {"link": "link must be an http(s) URL or a path starting with '/'."})
    assert results[4] == invalid(4, {"title": "Field required"})
    assert results[5] == invalid(5, message="An item must be a JSON object.")
    assert results[6] == invalid(6, message=ONE_AUDIENCE)
    assert results[7] == invalid(7, {"data": "Input should be a valid dictionary"})
    assert results[8] == invalid(8, {"colour": "Extra inputs are not permitted"})
    good = {0: "one", 2: "two", 9: "three"}
    for index, title in good.items():
        assert results[index]["status"] == 201
        (row,) = stored(results[index])
        assert row.title == title
    assert Notification.objects.count() == 3
    (two,) = stored(results[2])
    assert (two.recipient, two.body, two.level, two.data, two.link) == (bob, "b", "success", {"k": [1, 2]}, "/x/")


def test_an_item_to_an_unknown_or_inactive_user_is_400_and_the_others_are_stored(
    client, staff_token, alice, bob, make_user
):
    carol = make_user("carol", is_active=False)
    results = batch(client, staff_token, [
        {"title": "to carol by id", "users": [carol.pk]},
        {"title": "to carol by name", "users": ["carol"]},
        {"title": "to nobody", "users": [alice.pk, 987654]},
        {"title": "to a name nobody has", "users": ["mallory", "alice"]},
        {"title": "impossible id", "users": [2**63]},
        {"title": "to alice and bob", "users": ["alice", bob.pk, "alice"]},
        {"title": "no users", "users": []},
    ])
    assert results[:5] == [
        invalid(0, {"users": f"Unknown or inactive user ids: [{carol.pk}]"}),
        invalid(1, {"users": "Unknown users: ['carol']"}),
        invalid(2, {"users": "Unknown or inactive user ids: [987654]"}),
        invalid(3, {"users": "Unknown users: ['mallory']"}),
        invalid(4, {"users": f"Unknown or inactive user ids: [{2**63}]"}),
    ]
    assert results[5]["status"] == 201
    assert {row.recipient for row in stored(results[5])} == {alice, bob}
    assert results[6] == invalid(6, {"users": f"users must list 1 to {services.USERS_MAX} users."})
    assert Notification.objects.count() == 2
    assert not Stream.objects.filter(key=streams.user_stream(carol.pk)).exists()  # no offset taken


def test_a_batch_to_a_topic_and_broadcast(client, staff_token, alice, deploys):
    services.topic_follow(user=alice, topic=deploys)
    results = batch(client, staff_token, [
        {"title": "deployed", "topic": "deploys"},
        {"title": "maintenance", "level": "warning", "broadcast": True},
        {"title": "deployed again", "topic": "deploys", "idempotency_key": "deploy-2"},
        {"title": "no such topic", "topic": "nope"},
    ])
    assert [r["status"] for r in results] == [201, 201, 201, 400]
    assert results[3] == invalid(3, {"topic": "Unknown topic 'nope'."})
    (first,), (broadcast,), (second,) = stored(results[0]), stored(results[1]), stored(results[2])
    assert (first.audience, first.topic, first.offset) == ("topic", deploys, 1)
    assert (second.audience, second.topic, second.offset) == ("topic", deploys, 2)
    assert (broadcast.audience, broadcast.topic, broadcast.recipient, broadcast.offset) == ("broadcast", None, None, 1)
    assert results[0]["notifications"][0]["topic"] == "deploys"
    assert head(streams.topic_stream(deploys.pk)) == 2
    assert head(streams.BROADCAST) == 1
    assert Notification.objects.count() == 3  # one row each, however many followers


# Offsets


def test_offsets_of_a_batch_to_one_user_are_consecutive_in_item_order_and_the_head_matches(
    client, staff_token, alice, bob
):
    services.notification_send(users=[alice], title="before")  # alice's offset 1
    items = [{"title": f"a{i}", "users": ["alice"]} for i in range(5)]
    items.insert(2, {"title": "to both", "users": [bob.pk, alice.pk]})
    items.insert(4, {"title": "bad", "level": "nope", "users": ["alice"]})  # takes no offset
    results = batch(client, staff_token, items)
    alice_rows = [row for r in results if r["status"] == 201 for row in stored(r) if row.recipient == alice]
    assert [row.title for row in alice_rows] == ["a0", "a1", "to both", "a2", "a3", "a4"]
    assert [row.offset for row in alice_rows] == [2, 3, 4, 5, 6, 7]
    assert head(streams.user_stream(alice.pk)) == 7
    assert list(Notification.objects.filter(recipient=bob).values_list("offset", flat=True)) == [1]
    assert head(streams.user_stream(bob.pk)) == 1
    services.notification_send(users=[alice], title="after")
    assert Notification.objects.filter(recipient=alice).latest("id").offset == 8


def test_a_batch_costs_the_same_queries_for_10_and_60_items(client, staff, alice, bob,
                                                              django_capture_on_commit_callbacks):
    # (60: SQLite's bulk_create splits at 999 parameters, 83 rows here; PostgreSQL inserts 1000 at once.)
    def queries_for(n: int) -> int:
        items = [{"title": f"n{i}", "users": [alice.pk if i % 2 else bob.pk]} for i in range(n)]
        with CaptureQueriesContext(connection) as queries:
            with django_capture_on_commit_callbacks(execute=False) as callbacks:
                results = services.notification_send_batch(items, actor=staff)
        assert [r.outcome for r in results] == ["stored"] * n
        assert len(callbacks) == 1  # one push for the whole batch
        return len(queries)

    assert queries_for(10) == queries_for(60)
    assert Notification.objects.count() == 70


# Idempotency keys


def test_retrying_a_whole_batch_with_the_same_keys_replays_every_item_and_stores_nothing(
    client, staff_token, alice, bob, django_capture_on_commit_callbacks
):
    items = [
        {"title": "one", "users": ["alice", "bob"], "idempotency_key": "b-1"},
        {"title": "two", "broadcast": True, "data": {"x": 1}, "idempotency_key": "b-2"},
        {"title": "three", "users": [alice.pk], "idempotency_key": "b-3"},
    ]
    first = batch(client, staff_token, items)
    assert [r["status"] for r in first] == [201, 201, 201]
    rows, heads = Notification.objects.count(), dict(Stream.objects.values_list("key", "head"))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        retry = batch(client, staff_token, items)
    assert [r["status"] for r in retry] == [200, 200, 200]
    assert [r["notifications"] for r in retry] == [r["notifications"] for r in first]
    assert (Notification.objects.count(), dict(Stream.objects.values_list("key", "head"))) == (rows, heads)
    assert callbacks == []  # nothing pushed again
    assert IdempotencyKey.objects.count() == 3


def test_same_key_with_different_content_is_409_for_that_item_only(client, staff_token, alice):
    batch(client, staff_token, [{"title": "original", "users": ["alice"], "idempotency_key": "k"}])
    results = batch(client, staff_token, [
        {"title": "changed", "users": ["alice"], "idempotency_key": "k"},
        {"title": "new", "users": ["alice"], "idempotency_key": "k2"},
        {"title": "plain", "users": ["alice"]},
    ])
    assert results[0] == invalid(
        0, code="idempotency_conflict", status=409,
        message="The idempotency key 'k' was already used for a different request; use a new key.",
    )
    assert [r["status"] for r in results[1:]] == [201, 201]
    assert sorted(Notification.objects.values_list("title", flat=True)) == ["new", "original", "plain"]


def test_a_key_shared_with_a_single_send_and_repeated_within_a_batch(client, staff, staff_token, alice):
    (earlier,) = services.notification_send(users=[alice], title="once", actor=staff, idempotency_key="shared")
    results = batch(client, staff_token, [
        {"title": "once", "users": [alice.pk], "idempotency_key": "shared"},
        {"title": "twice", "users": [alice.pk], "idempotency_key": "dup"},
        {"title": "twice", "users": [alice.pk], "idempotency_key": "dup"},
        {"title": "bad key", "users": [alice.pk], "idempotency_key": ""},
    ])
    assert results[0]["status"] == 200
    assert [n["id"] for n in results[0]["notifications"]] == [earlier.pk]
    assert [r["status"] for r in results[1:3]] == [201, 200]
    assert results[1]["notifications"] == results[2]["notifications"]
    assert results[3] == invalid(3, {"idempotency_key": "String should have at least 1 character"})
    assert Notification.objects.count() == 2


def test_a_keyed_item_to_an_inactive_user_is_400_and_takes_no_key(client, staff_token, alice, make_user):
    carol = make_user("carol", is_active=False)
    results = batch(client, staff_token, [
        {"title": "to carol", "users": [carol.pk], "idempotency_key": "c"},
        {"title": "to alice", "users": [alice.pk], "idempotency_key": "a"},
    ])
    assert results[0] == invalid(0, {"users": f"Unknown or inactive user ids: [{carol.pk}]"})
    assert results[1]["status"] == 201
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["a"]


# Refused requests


@pytest.mark.parametrize(("body", "fields", "message"), [
    ({"items": []}, {"items": "List should have at least 1 item after validation, not 0"}, NOT_VALID),
    ({"items": [{"title": "x", "broadcast": True}] * (services.BATCH_MAX + 1)},
     {"items": f"List should have at most {services.BATCH_MAX} items after validation, not 1001"}, NOT_VALID),
    ({"items": "x"}, {"items": "Input should be a valid list"}, NOT_VALID),
    ({"items": {"title": "x", "broadcast": True}}, {"items": "Input should be a valid list"}, NOT_VALID),
    ({}, {"items": "Field required"}, NOT_VALID),
    ({"items": [{"title": "x", "broadcast": True}], "more": 1}, {"more": "Extra inputs are not permitted"}, NOT_VALID),
    ([{"title": "x", "broadcast": True}], None, "The body must be a JSON object."),
    ('"items"', None, "The body must be a JSON object."),
], ids=["empty", "too-many", "string", "object", "missing", "extra-key", "list-body", "string-body"])
def test_a_body_without_1_to_batch_max_items_is_400_json(client, staff_token, alice, body, fields, message):
    assert_error(post_batch(client, staff_token, body), 400, "invalid", message, fields)
    assert not Notification.objects.exists()


def test_bad_json_is_400_json(client, staff_token):
    response = client.post(BATCH, "{items: [", content_type="application/json", **auth(staff_token))
    assert_error(response, 400, "bad_json", "The body is not valid JSON.")


def test_exactly_batch_max_items_are_accepted(client, staff_token, alice):
    results = batch(client, staff_token, [{"title": f"n{i}", "users": [alice.pk]} for i in range(services.BATCH_MAX)])
    assert {r["status"] for r in results} == {201}
    assert sorted(Notification.objects.values_list("offset", flat=True)) == list(range(1, services.BATCH_MAX + 1))


def test_non_staff_and_staff_without_the_permission_get_403(client, alice, alice_token, make_user):
    plain_staff = make_user("plainstaff", is_staff=True)
    for token in (alice_token, token_for(plain_staff)):
        response = post_batch(client, token, {"items": [{"title": "hi", "users": ["alice"]}]})
        assert_error(response, 403, "forbidden", FORBIDDEN)
    assert not Notification.objects.exists()


def test_a_staff_session_needs_the_csrf_header(staff, alice):
    from .test_api import call, with_csrf_cookie

    csrf_client = Client(enforce_csrf_checks=True)
    csrf_client.force_login(staff)
    body = {"items": [{"title": "hi", "users": ["alice"]}]}
    assert_error(call(csrf_client, "post", BATCH, body=body), 403, "csrf_failed",
                 "CSRF check failed: send the X-CSRFToken header with session auth.")
    csrf = with_csrf_cookie(csrf_client)
    response = call(csrf_client, "post", BATCH, body=body, HTTP_X_CSRFTOKEN=csrf)
    assert response.status_code == 200, response.content
    assert [r["status"] for r in response.json()["results"]] == [201]


def test_the_batch_is_in_the_openapi_schema_with_its_item_shape(client):
    schema = client.get("/api/openapi.json").json()
    assert set(schema["paths"]["/api/notifications/batch/"]) == {"post"}
    item = schema["components"]["schemas"]["BatchIn"]["properties"]["items"]
    assert (item["minItems"], item["maxItems"]) == (1, services.BATCH_MAX)
    assert set(item["items"]["properties"]) == {"title", "body", "level", "data", "link", "users", "topic",
                                                "broadcast", "idempotency_key"}


def test_without_credentials_401(client):
    response = client.post(BATCH, {"items": [{"title": "hi", "broadcast": True}]}, content_type="application/json")
    assert_error(response, 401, "unauthenticated", "Authentication required: a Bearer token or a session.")


def test_a_database_failure_mid_batch_is_503_and_stores_nothing(client, staff_token, alice,
                                                               django_capture_on_commit_callbacks):
    items = [
        {"title": "plain", "users": ["alice"]},
        {"title": "keyed one", "broadcast": True, "idempotency_key": "a"},
        {"title": "keyed two", "users": ["alice"], "idempotency_key": "b"},
    ]
    real_reserve_users = streams.reserve_users
    with mock.patch.object(streams, "reserve_users", side_effect=OperationalError("server closed the connection")):
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            response = post_batch(client, staff_token, {"items": items})
    assert_error(response, 503, "unavailable", "The database is unavailable; try again shortly.")
    assert response["Retry-After"] == "2"
    assert callbacks == []
    assert (Notification.objects.count(), IdempotencyKey.objects.count()) == (0, 0)
    assert not Stream.objects.filter(head__gt=0).exists()  # the reserved offsets were rolled back too
    assert streams.reserve_users is real_reserve_users
    results = batch(client, staff_token, items)  # the retry stores everything once
    assert [r["status"] for r in results] == [201, 201, 201]
    assert list(Notification.objects.filter(recipient=alice).order_by("offset").values_list("offset", "title")) == [
        (1, "plain"), (2, "keyed two")]


# The service, from code


def test_the_service_takes_topics_and_users_as_objects_and_names_unknown_fields(staff, alice, deploys):
    results = services.notification_send_batch([
        {"title": "topic", "topic": deploys},
        {"title": "user", "users": [alice]},
        {"title": "typo", "user": [alice]},
        {"body": "no title", "broadcast": True},
        ["not", "a", "mapping"],
    ], actor=staff)
    assert [r.outcome for r in results] == ["stored", "stored", "invalid", "invalid", "invalid"]
    assert results[0].notifications[0].topic == deploys
    assert results[1].notifications[0].recipient_id == alice.pk
    assert results[2].error.message_dict == {"user": ["Unknown field."]}
    assert list(results[3].error.message_dict) == ["title"]


@pytest.mark.parametrize("count", [0, services.BATCH_MAX + 1])
def test_the_service_refuses_zero_or_too_many_items(staff, count):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        services.notification_send_batch([{"title": "x", "broadcast": True}] * count, actor=staff)


def test_reserve_counts_gives_n_offsets_per_stream_and_locks_at_zero(db):
    assert streams.reserve_counts({"u.1": 3, "b": 1, "t.9": 0}) == {"u.1": 3, "b": 1, "t.9": 0}
    assert streams.reserve_counts({"u.1": 2, "t.9": 0}) == {"u.1": 5, "t.9": 0}
    assert streams.heads(["u.1", "b", "t.9"]) == {"u.1": 5, "b": 1, "t.9": 0}
    with pytest.raises(ValueError):
        streams.reserve_counts({"u.1": -1})


# Pushes: every stored row reaches the connected sockets, after commit, over both layers


def _post_batch_sync(token: str, items: list) -> list[dict]:
    response = Client().post(BATCH, {"items": items}, content_type="application/json", **auth(token))
    assert response.status_code == 200, response.content
    return response.json()["results"]


@pytest.mark.django_db(transaction=True)
async def test_every_stored_row_of_a_batch_is_pushed_to_the_connected_sockets(
    layer, ws, alice, bob, alice_token, bob_token, staff_token
):
    tab, hello = await ws(alice_token)
    other, _ = await ws(bob_token)
    items = [{"title": f"a{i}", "data": {"i": i, "nested": [None, True, "x"]}, "users": ["alice"]} for i in range(20)]
    items += [
        {"title": "both", "users": ["alice", "bob"]},
        {"title": "bad", "level": "nope", "users": ["alice"]},
        {"title": "everyone", "broadcast": True, "link": "https://example.com/e"},
        {"title": "keyed", "users": ["alice"], "idempotency_key": "push-1"},
    ]
    results = await sync_to_async(_post_batch_sync)(staff_token, items)
    assert [r["status"] for r in results] == [201] * 21 + [400, 201, 201]
    by_id = {n["id"]: n for r in results if r["status"] == 201 for n in r["notifications"]}
    alice_stream, bob_stream = f"u.{alice.pk}", f"u.{bob.pk}"
    start = hello["cursor"][alice_stream]

    frames = [await tab.receive_json_from(timeout=5) for _ in range(23)]  # 20 + "both" + "everyone" + "keyed"
    assert {f["type"] for f in frames} == {"notification"}
    for frame in frames:  # each frame is the stored row the API answered, and its position
        assert {k: v for k, v in frame.items() if k not in ("type", "stream", "offset")} == by_id[frame["id"]]
    personal = [f for f in frames if f["stream"] == alice_stream]
    assert [f["offset"] for f in personal] == list(range(start + 1, start + 23))  # in order, no gap
    assert [f["title"] for f in personal] == [f"a{i}" for i in range(20)] + ["both", "keyed"]
    assert [(f["stream"], f["title"]) for f in frames if f["stream"] == "b"] == [("b", "everyone")]
    assert await tab.receive_nothing(timeout=0.3)

    bob_frames = [await other.receive_json_from(timeout=5) for _ in range(2)]
    assert sorted((f["stream"], f["title"]) for f in bob_frames) == [("b", "everyone"), (bob_stream, "both")]
    assert await other.receive_nothing(timeout=0.3)


# PostgreSQL: concurrent batches over the same streams


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
def test_concurrent_batches_to_overlapping_users_keep_every_stream_gap_free(staff, make_user):
    """Four threads send batches to the same users in opposite orders, with keys: no deadlock,
    and every user's offsets are 1..n, each once."""
    require_postgres()
    users = [make_user(f"c{i}") for i in range(6)]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def sender(k: int) -> None:
        try:
            order = users if k % 2 else users[::-1]
            barrier.wait(timeout=10)
            for round_ in range(5):
                items: list[dict] = [{"title": f"{k}-{round_}-{u.pk}", "users": [u.pk]} for u in order]
                items += [{"title": "keyed", "users": [order[-1].pk, order[0].pk],
                           "idempotency_key": f"{k}-{round_}-{j}"} for j in range(2)]
                results = services.notification_send_batch(items, actor=staff)
                assert {r.outcome for r in results} == {"stored"}
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for user in users:
        offsets = sorted(Notification.objects.filter(recipient=user).values_list("offset", flat=True))
        assert offsets == list(range(1, len(offsets) + 1))
        assert head(streams.user_stream(user.pk)) == len(offsets)
    assert Notification.objects.count() == 4 * 5 * (6 + 2 * 2)
