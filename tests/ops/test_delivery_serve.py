"""Email and Web Push from real server processes: ``bin/serve`` with its delivery worker thread,
a real SMTP server (aiosmtpd) and a local HTTPS push service. A send through the API is emailed
and pushed after commit by the server's own worker; several processes share the work and send
each message once."""

import time

import pytest

from notifications import webpush
from notifications.models import Delivery, Preference, PushSubscription
from tests.pushservice import PushService
from tests.smtp import SmtpServer

pytestmark = [pytest.mark.server, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

SITE = "https://notify.example.com"
DEADLINE = 20.0


@pytest.fixture
def smtp():
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
def push_service(tmp_path):
    service = PushService(tmp_path / "push").start()
    yield service
    service.stop()


def wait_for(condition, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def delivery_env(smtp: SmtpServer, **extra: str) -> dict[str, str]:
    # A long poll interval: what arrives is sent because the send woke the worker after commit.
    return {"EMAIL_URL": smtp.email_url, "SITE_URL": SITE, "DEFAULT_FROM_EMAIL": "bell@notify.example.com",
            "DELIVERY_WORKER": "1", "DELIVERY_POLL_INTERVAL": "60", **extra}


def test_an_api_send_is_emailed_by_the_servers_worker_after_commit(serve, smtp, make_user, superuser_token):
    carol = make_user("carol", email="carol@example.com")
    Preference.objects.create(user=carol, scope="own", email=True)
    server = serve("mail", **delivery_env(smtp))
    response = server.request("POST", "/api/notifications/", token=superuser_token,
                              json_body={"title": "Disk almost full", "body": "92% used", "users": ["carol"]})
    assert response.status == 201, response.text
    (received,) = wait_for(lambda: list(smtp.handler.messages), "the email")
    message = received.message
    assert (message["From"], message["To"], message["Subject"]) == (
        "bell@notify.example.com", "carol@example.com", "Disk almost full")
    assert message["List-Unsubscribe"].strip().startswith(f"<{SITE}/unsubscribe/")
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "92% used" in message.get_body(("plain",)).get_content()
    row = wait_for(lambda: Delivery.objects.filter(status="sent").first(), "the delivery marked sent")
    assert (row.user_id, row.channel, row.attempts) == (carol.pk, "email", 1)


def test_two_server_processes_email_a_broadcast_to_each_user_once(serve, smtp, make_user, superuser_token):
    users = [make_user(f"reader-{i}", email=f"reader-{i}@example.com") for i in range(60)]
    Preference.objects.bulk_create([Preference(user=user, scope="broadcast", email=True) for user in users])
    server = serve("mail-pair", workers=2, **delivery_env(smtp, DELIVERY_BATCH="5", DELIVERY_POLL_INTERVAL="0.2"))
    for round_ in range(3):
        response = server.request("POST", "/api/notifications/", token=superuser_token,
                                  json_body={"title": f"Maintenance {round_}", "broadcast": True})
        assert response.status == 201, response.text
    wait_for(lambda: len(smtp.handler.messages) >= 180, "180 emails")
    time.sleep(1.0)  # anything sent twice would arrive meanwhile
    got = sorted((r.message["To"], r.message["Subject"]) for r in smtp.handler.messages)
    assert got == sorted((f"reader-{i}@example.com", f"Maintenance {r}") for i in range(60) for r in range(3))
    assert Delivery.objects.filter(status="sent").count() == 180


def test_a_browser_subscribed_through_the_api_gets_the_push(serve, smtp, push_service, make_user, superuser_token):
    private_key, public_key = webpush.generate_keys()
    dave = make_user("dave")
    Preference.objects.create(user=dave, scope="own", push=True)
    server = serve("push", **delivery_env(smtp, VAPID_PRIVATE_KEY=private_key, VAPID_SUBJECT="mailto:ops@example.com",
                                          **push_service.environ()))
    from tests.conftest import token_for

    token = token_for(dave)
    info = server.request("GET", "/api/push/", token=token)
    assert info.status == 200 and info.json()["public_key"] == public_key
    browser = push_service.subscribe()
    registered = server.request("POST", "/api/push/subscriptions/", token=token, json_body=browser.json)
    assert registered.status == 201, registered.text
    response = server.request("POST", "/api/notifications/", token=superuser_token,
                              json_body={"title": "Build failed", "level": "error", "link": "/builds/7",
                                         "users": ["dave"]})
    assert response.status == 201, response.text
    (request,) = wait_for(lambda: push_service.received(browser), "the push")
    assert request.errors == []
    payload = request.json()
    assert (payload["title"], payload["level"], payload["link"]) == ("Build failed", "error", f"{SITE}/builds/7")
    push_service.respond(browser, 410)  # the browser unsubscribed: the service forgets the endpoint
    server.request("POST", "/api/notifications/", token=superuser_token,
                   json_body={"title": "Again", "users": ["dave"]})
    wait_for(lambda: not PushSubscription.objects.filter(user=dave).exists(), "the subscription removed")
