"""The Web Push channel (notifications.webpush): sends through the real pywebpush to a real local
HTTPS push service (tests/pushservice.py) that checks VAPID and decrypts each message; the REST
endpoints of subscriptions, the system checks and ``manage.py generate_vapid_keys``.

Nothing here skips: the push service is started by the tests themselves."""

import io
import json
import re
import socket
import sys
import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.core.management import call_command
from django.utils import timezone
from py_vapid import Vapid

from notifications import checks, delivery, services, webpush
from notifications.models import Delivery, DeliverySettings, Notification, Preference, PushSubscription
from notifications.presence import Connection, get_presence
from project import settings as project_settings
from tests.pushservice import PushService, Subscription, b64url, b64url_decode, verify_vapid

pytestmark = [pytest.mark.django_db(transaction=False)]

SITE = "https://notify.example"
SUBJECT = "mailto:ops@notify.example"
PUSH = "/api/push/"
SUBSCRIPTIONS = "/api/push/subscriptions/"


@pytest.fixture
def push_service(tmp_path, monkeypatch):
    """A local push service over HTTPS, trusted through REQUESTS_CA_BUNDLE."""
    with PushService(tmp_path / "push-service") as service:
        for name, value in service.environ().items():
            monkeypatch.setenv(name, value)
        yield service


@pytest.fixture
def vapid_keys() -> tuple[str, str]:
    return webpush.generate_keys()


@pytest.fixture(autouse=True)
def push_settings(settings, vapid_keys):
    private, public = vapid_keys
    settings.NOTIFICATIONS = {
        **settings.NOTIFICATIONS, "SITE_URL": SITE, "VAPID_PRIVATE_KEY": private, "VAPID_SUBJECT": SUBJECT,
        "PRESENCE_BACKEND": "notifications.presence.LocalPresence", "DELIVERY_RETRY_BASE": 10,
    }


def configure(settings, **values) -> None:
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, **values}


@pytest.fixture
def carol(make_user):
    user = make_user("carol", email="carol@example.com")
    Preference.objects.create(user=user, scope="own", push=True)
    return user


def browser(user, service: PushService, name: str | None = None) -> tuple[Subscription, PushSubscription]:
    """A new browser of ``user`` subscribed on ``service`` (as the REST API stores it)."""
    subscription = service.subscribe(name)
    row, _ = services.push_subscription_add(user=user, subscription=subscription.json, user_agent="TestBrowser/1")
    return subscription, row


@pytest.fixture
def sent(django_capture_on_commit_callbacks):
    def send(**kwargs) -> Notification:
        kwargs.setdefault("title", "Deploy finished")
        with django_capture_on_commit_callbacks(execute=True):
            return services.notification_send(**kwargs)[0]

    return send


def row_of(notification: Notification) -> Delivery:
    return Delivery.objects.get(notification=notification, channel="push")


def retry_now() -> None:
    Delivery.objects.filter(status="pending").update(due_at=timezone.now())


# Sending


def test_a_push_reaches_each_browser_of_the_user_encrypted_and_signed(sent, carol, push_service, vapid_keys):
    first, first_row = browser(carol, push_service)
    second, second_row = browser(carol, push_service)
    notification = sent(users=[carol], body="Version 42 is live.", link="/deploys/42", level="success")
    delivery.run_until_idle()
    expected = {"id": notification.pk, "title": "Deploy finished", "body": "Version 42 is live.",
                "level": "success", "link": f"{SITE}/deploys/42", "tag": f"notification-{notification.pk}",
                "created_at": notification.created_at.isoformat()}
    for subscription in (first, second):
        (request,) = push_service.received(subscription)
        assert request.errors == []
        assert request.json() == expected
        assert request.payload == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()
        assert request.vapid_key == vapid_keys[1]
        assert request.claims is not None
        assert (request.claims["aud"], request.claims["sub"]) == (push_service.origin, SUBJECT)
        assert request.claims["exp"] > time.time()
        assert request.headers["ttl"] == str(24 * 3600)
        assert request.headers["content-encoding"] == "aes128gcm"
    row = row_of(notification)
    assert (row.status, row.attempts, row.error) == ("sent", 1, "")
    assert sorted(row.sent_to) == sorted([first_row.pk, second_row.pk])
    assert all(s.last_success_at is not None for s in PushSubscription.objects.all())


def test_a_notification_without_a_link_links_to_the_inbox(sent, carol, push_service):
    subscription, _ = browser(carol, push_service)
    sent(users=[carol])
    delivery.run_until_idle()
    assert push_service.received(subscription)[0].json()["link"] == f"{SITE}/"


def test_ttl_and_timeout_settings_are_used(sent, carol, push_service, settings):
    configure(settings, WEBPUSH_TTL=60)
    subscription, _ = browser(carol, push_service)
    sent(users=[carol])
    delivery.run_until_idle()
    assert push_service.received(subscription)[0].headers["ttl"] == "60"


@pytest.mark.parametrize("status", [404, 410])
def test_a_gone_subscription_is_removed_and_the_others_still_get_it(sent, carol, push_service, status):
    gone, gone_row = browser(carol, push_service)
    alive, alive_row = browser(carol, push_service)
    push_service.respond(gone, status)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    assert len(push_service.received(gone)) == 1 and len(push_service.received(alive)) == 1
    assert list(PushSubscription.objects.values_list("pk", flat=True)) == [alive_row.pk]
    row = row_of(notification)
    assert (row.status, row.sent_to) == ("sent", [alive_row.pk])


@pytest.mark.parametrize("status", [404, 410])
def test_when_the_only_subscription_is_gone_the_row_is_skipped(sent, carol, push_service, status):
    gone, _ = browser(carol, push_service)
    push_service.respond(gone, status)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    assert not PushSubscription.objects.exists()
    row = row_of(notification)
    assert (row.status, row.error) == ("skipped", "no push subscription")


def test_a_server_error_is_retried_with_backoff_and_the_retry_skips_the_browser_that_got_it(
        sent, carol, push_service):
    reached, reached_row = browser(carol, push_service)
    failing, failing_row = browser(carol, push_service)
    push_service.respond(failing, 500)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    row = row_of(notification)
    assert (row.status, row.attempts, row.sent_to) == ("pending", 1, [reached_row.pk])
    assert f"subscription {failing_row.pk}: HTTP 500" in row.error
    assert timedelta(seconds=9) < row.due_at - timezone.now() <= timedelta(seconds=10)
    push_service.respond(failing, 201)
    retry_now()
    delivery.run_until_idle()
    row.refresh_from_db()
    assert (row.status, row.attempts, row.error) == ("sent", 2, "")
    assert sorted(row.sent_to) == sorted([reached_row.pk, failing_row.pk])
    assert len(push_service.received(reached)) == 1  # not sent again
    assert len(push_service.received(failing)) == 2


def test_429_with_retry_after_waits_that_long(sent, carol, push_service):
    subscription, _ = browser(carol, push_service)
    push_service.respond(subscription, 429, retry_after=3600)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    row = row_of(notification)
    assert (row.status, row.sent_to) == ("pending", [])
    assert "HTTP 429" in row.error
    assert timedelta(seconds=3590) < row.due_at - timezone.now() <= timedelta(seconds=3600)


def test_retries_give_up_after_the_most_attempts(sent, carol, push_service, settings):
    configure(settings, DELIVERY_MAX_ATTEMPTS=2)
    subscription, _ = browser(carol, push_service)
    push_service.respond(subscription, 503)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    retry_now()
    delivery.run_until_idle()
    row = row_of(notification)
    assert (row.status, row.attempts) == ("failed", 2)
    assert PushSubscription.objects.exists()  # a server error is not the subscription's fault


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_refused_connection_is_retried(sent, carol, push_service):
    unreachable = Subscription(f"https://127.0.0.1:{closed_port()}/push/nobody",
                               ec.generate_private_key(ec.SECP256R1()), b"0123456789abcdef")
    services.push_subscription_add(user=carol, subscription=unreachable.json)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    row = row_of(notification)
    assert (row.status, row.attempts) == ("pending", 1)
    assert "ConnectionError" in row.error


def test_a_push_service_slower_than_the_timeout_is_retried(sent, carol, push_service, settings):
    configure(settings, WEBPUSH_TIMEOUT=0.3)
    subscription, _ = browser(carol, push_service)
    push_service.respond(subscription, 201, delay=1.5)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    row = row_of(notification)
    assert row.status == "pending"
    assert "Timeout" in row.error


@pytest.mark.parametrize("status", [400, 403, 413])
def test_another_client_error_fails_the_row_for_good(sent, carol, push_service, status):
    subscription, subscription_row = browser(carol, push_service)
    push_service.respond(subscription, status)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    row = row_of(notification)
    assert (row.status, row.attempts) == ("failed", 1)
    assert f"subscription {subscription_row.pk}: HTTP {status}" in row.error
    assert PushSubscription.objects.filter(pk=subscription_row.pk).exists()


def test_a_refusing_subscription_beside_one_that_got_it_is_named_in_the_sent_row(sent, carol, push_service):
    refusing, refusing_row = browser(carol, push_service)
    reached, reached_row = browser(carol, push_service)
    push_service.respond(refusing, 403)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    row = row_of(notification)
    assert (row.status, row.sent_to) == ("sent", [reached_row.pk])
    assert f"subscription {refusing_row.pk}: HTTP 403" in row.error


def connect_socket(user) -> None:
    async_to_sync(get_presence().add)(Connection(id="c1", user_id=user.pk, username=user.username,
                                                 since=time.time()))


def test_push_waits_for_no_open_socket_by_default_it_is_skipped_while_one_is_open(sent, carol, push_service):
    subscription, _ = browser(carol, push_service)
    connect_socket(carol)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    assert push_service.received() == []
    row = row_of(notification)
    assert (row.status, row.error) == ("skipped", "a socket of the user was open")
    async_to_sync(get_presence().remove)("c1")
    later = sent(users=[carol])
    delivery.run_until_idle()
    assert [r.json()["id"] for r in push_service.received(subscription)] == [later.pk]


def test_a_user_who_wants_push_always_gets_it_with_a_socket_open(sent, carol, push_service):
    DeliverySettings.objects.create(user=carol, push_only_offline=False)
    subscription, _ = browser(carol, push_service)
    connect_socket(carol)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    assert len(push_service.received(subscription)) == 1
    assert row_of(notification).status == "sent"


def test_quiet_hours_hold_push(sent, carol, push_service):
    now = timezone.now()
    start = (now - timedelta(hours=1)).time().replace(second=0, microsecond=0)
    end = (now + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    DeliverySettings.objects.create(user=carol, quiet_start=start, quiet_end=end)
    browser(carol, push_service)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    row = row_of(notification)
    assert row.status == "pending" and row.due_at > now + timedelta(hours=1)
    assert push_service.received() == []


def test_a_pem_private_key_sends_too_and_its_public_key_is_derived(sent, carol, push_service, settings):
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    configure(settings, VAPID_PRIVATE_KEY=pem)
    public = b64url(key.public_key().public_bytes(serialization.Encoding.X962,
                                                  serialization.PublicFormat.UncompressedPoint))
    assert webpush.public_key() == public
    subscription, _ = browser(carol, push_service)
    sent(users=[carol])
    delivery.run_until_idle()
    assert push_service.received(subscription)[0].vapid_key == public


def test_a_long_body_is_cut_to_fit_one_push_message(sent, carol, push_service):
    subscription, _ = browser(carol, push_service)
    notification = sent(users=[carol], body="é" * 9000, link="/" + "x" * 1900)
    delivery.run_until_idle()
    (request,) = push_service.received(subscription)
    message = request.json()
    assert webpush.MAX_PAYLOAD_BYTES - 3 <= len(request.payload) <= webpush.MAX_PAYLOAD_BYTES
    assert message["body"].endswith("…") and message["body"].startswith("éé")
    assert message["link"] == f"{SITE}/{'x' * 1900}" and message["id"] == notification.pk


# The REST API


def auth(token: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def post(client, token: str, body, **extra):
    text = body if isinstance(body, str) else json.dumps(body)
    return client.post(SUBSCRIPTIONS, text, content_type="application/json", **auth(token), **extra)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.content
    return response.json()["error"]


def test_get_push_gives_the_key_whether_enabled_and_the_callers_subscriptions(client, alice, alice_token, bob,
                                                                            push_service, vapid_keys):
    _, row = browser(alice, push_service)
    browser(bob, push_service)
    response = client.get(PUSH, **auth(alice_token))
    assert response.status_code == 200
    assert response.json() == {"public_key": vapid_keys[1], "enabled": True, "subscriptions": [
        {"id": row.pk, "endpoint": row.endpoint, "created_at": row.created_at.isoformat(), "last_success_at": None}]}


def test_get_push_without_a_key_is_disabled(client, alice_token, settings):
    configure(settings, VAPID_PRIVATE_KEY="")
    assert client.get(PUSH, **auth(alice_token)).json() == {"public_key": None, "enabled": False,
                                                            "subscriptions": []}


def test_get_push_needs_authentication(client):
    assert error_of(client.get(PUSH), 401)["code"] == "unauthenticated"


def test_post_stores_the_subscription_then_answers_200_for_the_same_endpoint(client, alice, alice_token,
                                                                           push_service):
    subscription = push_service.subscribe()
    response = post(client, alice_token, subscription.json, HTTP_USER_AGENT="Mozilla/5.0 " + "x" * 400)
    assert response.status_code == 201, response.content
    row = PushSubscription.objects.get()
    assert response.json() == {"id": row.pk, "endpoint": subscription.endpoint,
                               "created_at": row.created_at.isoformat(), "last_success_at": None}
    assert (row.user, row.p256dh, row.auth) == (alice, subscription.p256dh, b64url(subscription.auth))
    assert row.user_agent == ("Mozilla/5.0 " + "x" * 400)[:300]
    again = post(client, alice_token, subscription.json)
    assert again.status_code == 200 and again.json()["id"] == row.pk
    assert PushSubscription.objects.count() == 1


def test_an_endpoint_of_another_user_moves_to_the_caller(client, alice, bob, bob_token, push_service):
    subscription, row = browser(alice, push_service)
    response = post(client, bob_token, subscription.json)
    assert response.status_code == 201
    assert list(PushSubscription.objects.values_list("pk", "user_id")) == [(row.pk, bob.pk)]


def test_past_the_most_subscriptions_the_oldest_is_removed(alice, push_service, settings):
    configure(settings, WEBPUSH_MAX_SUBSCRIPTIONS=2)
    rows = [browser(alice, push_service)[1] for _ in range(3)]
    assert sorted(PushSubscription.objects.values_list("pk", flat=True)) == [rows[1].pk, rows[2].pk]


def valid_body(push_service) -> dict:
    return push_service.subscribe().json


def off_curve_point() -> str:
    return b64url(b"\x04" + b"\x01" * 64)


def compressed_point() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return b64url(key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint))


@pytest.mark.parametrize(("change", "field"), [
    ({"endpoint": "http://push.example/x"}, "endpoint"),
    ({"endpoint": "https:///nohost"}, "endpoint"),
    ({"endpoint": "push.example/x"}, "endpoint"),
    ({"endpoint": "https://push.example/" + "x" * 2000}, "endpoint"),
    ({"endpoint": 42}, "endpoint"),
    ({"endpoint": None}, "endpoint"),
    ({"keys": None}, "keys"),
    ({"keys": "abc"}, "keys"),
    ({"keys": {"auth": b64url(b"0123456789abcdef")}}, "keys.p256dh"),
    ({"keys.p256dh": "not base64!"}, "keys.p256dh"),
    ({"keys.p256dh": b64url(b"\x04" + b"\x01" * 10)}, "keys.p256dh"),
    ({"keys.p256dh": off_curve_point()}, "keys.p256dh"),
    ({"keys.p256dh": compressed_point()}, "keys.p256dh"),
    ({"keys.p256dh": 7}, "keys.p256dh"),
    ({"keys.auth": b64url(b"short")}, "keys.auth"),
    ({"keys.auth": "!!!"}, "keys.auth"),
    ({"keys.auth": None}, "keys.auth"),
    ({"expirationTime": "soon"}, "expirationTime"),
    ({"extra": 1}, "extra"),
])
def test_a_bad_subscription_is_a_400_naming_the_field_and_stores_nothing(client, alice_token, push_service,
                                                                       change, field):
    body = valid_body(push_service)
    for name, value in change.items():
        if name.startswith("keys."):
            body["keys"][name[5:]] = value
        else:
            body[name] = value
    error = error_of(post(client, alice_token, body), 400)
    assert error["code"] == "invalid" and list(error["fields"]) == [field], error
    assert not PushSubscription.objects.exists()


@pytest.mark.parametrize("missing", ["endpoint", "keys"])
def test_a_missing_field_is_named(client, alice_token, push_service, missing):
    body = valid_body(push_service)
    del body[missing]
    error = error_of(post(client, alice_token, body), 400)
    assert list(error["fields"]) == [missing]
    assert not PushSubscription.objects.exists()


def test_malformed_json_is_a_400(client, alice_token):
    assert error_of(post(client, alice_token, '{"endpoint": '), 400)["code"] == "bad_json"
    assert not PushSubscription.objects.exists()


@pytest.mark.parametrize("change", [{"VAPID_PRIVATE_KEY": ""}, {"DELIVERY_CHANNELS": ["email"]}])
def test_post_while_push_is_disabled_is_a_503(client, alice_token, push_service, settings, change):
    configure(settings, **change)
    error = error_of(post(client, alice_token, valid_body(push_service)), 503)
    assert error["code"] == "push_disabled"
    assert not PushSubscription.objects.exists()


def test_delete_removes_the_callers_subscription_and_404s_for_others(client, alice, alice_token, bob,
                                                                     push_service):
    _, mine = browser(alice, push_service)
    _, bobs = browser(bob, push_service)

    def delete(endpoint):
        return client.delete(SUBSCRIPTIONS, json.dumps({"endpoint": endpoint}), content_type="application/json",
                             **auth(alice_token))

    assert error_of(delete(bobs.endpoint), 404)["code"] == "not_found"
    response = delete(mine.endpoint)
    assert response.status_code == 204 and response.content == b""
    assert list(PushSubscription.objects.values_list("pk", flat=True)) == [bobs.pk]
    assert error_of(delete(mine.endpoint), 404)["code"] == "not_found"
    assert list(error_of(delete(""), 400)["fields"]) == ["endpoint"]


# The system checks


def test_good_vapid_settings_pass_the_checks():
    assert checks.webpush_check() == []


def test_no_vapid_key_is_no_check(settings):
    configure(settings, VAPID_PRIVATE_KEY="", VAPID_SUBJECT="")
    assert checks.webpush_check() == []


def test_a_vapid_key_that_does_not_parse_is_an_error(settings):
    configure(settings, VAPID_PRIVATE_KEY="not-a-key")
    (error,) = checks.webpush_check()
    assert error.id == "notifications.E002" and "does not parse" in error.msg


def test_a_public_key_that_is_not_the_private_keys_is_an_error(settings):
    configure(settings, VAPID_PUBLIC_KEY=webpush.generate_keys()[1])
    (error,) = checks.webpush_check()
    assert error.id == "notifications.E003"
    assert webpush.public_key_of(settings.NOTIFICATIONS["VAPID_PRIVATE_KEY"]) in error.hint


def test_a_vapid_key_without_a_subject_is_a_warning(settings):
    configure(settings, VAPID_SUBJECT="")
    (warning,) = checks.webpush_check()
    assert warning.id == "notifications.W006"


def test_a_vapid_key_without_pywebpush_is_a_warning(settings, monkeypatch):
    monkeypatch.setitem(sys.modules, "pywebpush", None)  # import pywebpush raises ImportError
    (warning,) = checks.webpush_check()
    assert warning.id == "notifications.W007" and "webpush" in warning.hint
    assert warning in checks.startup_warnings()


def test_without_pywebpush_the_rows_fail_with_the_fix(sent, carol, push_service, monkeypatch):
    browser(carol, push_service)
    monkeypatch.setitem(sys.modules, "pywebpush", None)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    row = row_of(notification)
    assert row.status == "pending" and "pip install" in row.error


# manage.py generate_vapid_keys


def generated(*args: str) -> dict[str, str]:
    """The pair ``manage.py generate_vapid_keys`` prints, read from either format."""
    out = io.StringIO()
    call_command("generate_vapid_keys", *args, stdout=out, stderr=io.StringIO())
    values = {}
    for line in out.getvalue().splitlines():
        if "--format" in args:
            name, value = line.split("=", 1)
        else:
            name, value = (json.loads(part) for part in line.strip().rstrip(",").split(": "))
        values[name] = value
    return values


def assert_a_working_pair(private: str, public: str) -> None:
    vapid = Vapid.from_string(private_key=private)
    assert webpush.public_key_of(private) == public
    assert len(b64url_decode(public)) == 65 and b64url_decode(public)[0] == 4
    headers = vapid.sign({"sub": SUBJECT, "aud": "https://push.example", "exp": int(time.time()) + 600})
    claims, key = verify_vapid(headers["Authorization"], "https://push.example")
    assert key == public and claims["sub"] == SUBJECT
    signature = vapid.private_key.sign(b"data", ec.ECDSA(hashes.SHA256()))
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(public)).verify(
        signature, b"data", ec.ECDSA(hashes.SHA256()))


def test_generate_vapid_keys_prints_the_settings_lines_of_a_new_pair():
    out = io.StringIO()
    call_command("generate_vapid_keys", stdout=out, stderr=io.StringIO())
    pattern = r'    "VAPID_PRIVATE_KEY": "[\w-]{43}",\n    "VAPID_PUBLIC_KEY": "[\w-]{87}",\n'
    assert re.fullmatch(pattern, out.getvalue())
    values = generated()
    assert_a_working_pair(values["VAPID_PRIVATE_KEY"], values["VAPID_PUBLIC_KEY"])
    assert values != generated()  # a new pair each time


def test_generate_vapid_keys_env_format_prints_the_variables(settings):
    values = generated("--format", "env")
    assert list(values) == ["VAPID_PRIVATE_KEY", "VAPID_PUBLIC_KEY"]
    assert set(values) <= set(project_settings.ENVIRONMENT_SETTINGS)  # the variables settings.py reads
    assert_a_working_pair(values["VAPID_PRIVATE_KEY"], values["VAPID_PUBLIC_KEY"])
    configure(settings, VAPID_PRIVATE_KEY=values["VAPID_PRIVATE_KEY"], VAPID_PUBLIC_KEY=values["VAPID_PUBLIC_KEY"])
    assert checks.webpush_check() == []


# The push service itself checks what it is sent


def test_the_push_service_refuses_a_vapid_header_signed_by_another_key():
    signer, other = Vapid(), Vapid()
    signer.generate_keys()
    other.generate_keys()
    header = signer.sign({"sub": SUBJECT, "aud": "https://push.example", "exp": int(time.time()) + 600})
    token = header["Authorization"].split("t=", 1)[1].split(",")[0]
    other_key = b64url(other.public_key.public_bytes(serialization.Encoding.X962,
                                                     serialization.PublicFormat.UncompressedPoint))
    with pytest.raises(ValueError, match="does not verify"):
        verify_vapid(f"vapid t={token}, k={other_key}", "https://push.example")
    with pytest.raises(ValueError, match="aud"):
        verify_vapid(header["Authorization"], "https://elsewhere.example")
