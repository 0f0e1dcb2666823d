"""Idempotent sends: a retry returns the first result; a different request with the same key is refused."""

import threading

import pytest
from django.db import connection

from notifications import services
from notifications.models import IdempotencyKey, Notification
from notifications.services import IdempotencyConflict

from .conftest import require_postgres


@pytest.mark.django_db
def test_retry_with_the_same_key_returns_the_first_result_and_sends_nothing(alice, staff,
                                                                             django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as first_callbacks:
        first = services.notification_send(users=[alice], title="Once", actor=staff, idempotency_key="k1")
    with django_capture_on_commit_callbacks(execute=False) as retry_callbacks:
        retry = services.notification_send(users=[alice], title="Once", actor=staff, idempotency_key="k1")
    assert (first.replayed, retry.replayed) == (False, True)
    assert [n.pk for n in retry] == [n.pk for n in first]
    assert Notification.objects.count() == 1
    assert (len(first_callbacks), len(retry_callbacks)) == (1, 0)  # the retry pushes nothing


@pytest.mark.django_db
def test_same_key_with_a_different_request_is_a_conflict(alice, staff):
    services.notification_send(users=[alice], title="Once", actor=staff, idempotency_key="k1")
    with pytest.raises(IdempotencyConflict, match="already used for a different request"):
        services.notification_send(users=[alice], title="Changed", actor=staff, idempotency_key="k1")
    assert Notification.objects.count() == 1


@pytest.mark.django_db
def test_keys_are_scoped_to_the_sender(alice, bob, staff, make_user):
    other_sender = make_user("other", staff=True)
    services.notification_send(users=[alice], title="A", actor=staff, idempotency_key="same")
    services.notification_send(users=[bob], title="B", actor=other_sender, idempotency_key="same")
    assert Notification.objects.count() == 2


@pytest.mark.django_db
def test_an_expired_key_can_be_used_again(alice, staff, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "IDEMPOTENCY_TTL": -1}
    services.notification_send(users=[alice], title="One", actor=staff, idempotency_key="k")
    again = services.notification_send(users=[alice], title="Two", actor=staff, idempotency_key="k")
    assert not again.replayed
    assert Notification.objects.count() == 2
    assert IdempotencyKey.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize("key", ["", "x" * 201])
def test_bad_keys_are_a_validation_error(alice, key):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError):
        services.notification_send(users=[alice], title="x", idempotency_key=key)


@pytest.mark.django_db(transaction=True)
@pytest.mark.postgres
def test_concurrent_duplicates_create_one_notification(alice, staff):
    """Eight threads send the same keyed request at once: one notification, eight equal answers."""
    require_postgres()
    barrier = threading.Barrier(8)
    results, errors = [], []

    def send():
        try:
            barrier.wait(timeout=10)
            sent = services.notification_send(broadcast=True, title="Deploy", actor=staff, idempotency_key="deploy-7")
            results.append(tuple(n.pk for n in sent))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 8
    assert Notification.objects.count() == 1


def _post(client, token, body, key=None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    if key is not None:
        headers["HTTP_IDEMPOTENCY_KEY"] = key
    return client.post("/api/notifications/", body, content_type="application/json", **headers)


@pytest.mark.django_db
def test_api_retry_with_idempotency_key_returns_200_with_the_first_result(client, alice, staff_token):
    body = {"title": "Deploy", "users": ["alice"], "data": {"n": 1}}
    first = _post(client, staff_token, body, key="abc")
    retry = _post(client, staff_token, body, key="abc")
    assert (first.status_code, retry.status_code) == (201, 200)
    assert retry.json() == first.json()
    assert Notification.objects.count() == 1


@pytest.mark.django_db
def test_api_same_key_different_body_is_409(client, alice, staff_token):
    _post(client, staff_token, {"title": "Deploy", "users": ["alice"]}, key="abc")
    response = _post(client, staff_token, {"title": "Other", "users": ["alice"]}, key="abc")
    assert response.status_code == 409
    assert response.json() == {"error": {
        "code": "idempotency_conflict",
        "message": "The idempotency key 'abc' was already used for a different request; use a new key.",
    }}


@pytest.mark.django_db
def test_api_without_key_sends_twice(client, alice, staff_token):
    body = {"title": "Deploy", "users": ["alice"]}
    assert [_post(client, staff_token, body).status_code for _ in range(2)] == [201, 201]
    assert Notification.objects.count() == 2


@pytest.mark.django_db
def test_api_database_unavailable_is_503_json(client, alice, staff_token, monkeypatch):
    from django.db import OperationalError

    def down(**kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(services, "notification_send", down)
    response = _post(client, staff_token, {"title": "x", "users": ["alice"]})
    assert response.status_code == 503 and response["Retry-After"] == "2"
    assert response.json() == {"error": {"code": "unavailable",
                                         "message": "The database is unavailable; try again shortly."}}
