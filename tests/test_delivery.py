"""Delivery beyond the socket (notifications.delivery, notifications.mail): planning from the
preferences, the email channel, claims, retries, quiet hours, one-click unsubscribe."""

import re
from datetime import timedelta

import pytest
from django.core import mail as outbox
from django.core import signing
from django.test import Client
from django.utils import timezone

from notifications import delivery, mail, preferences, services
from notifications.models import (
    Delivery,
    DeliveryJob,
    DeliverySettings,
    DeliveryStatus,
    Follow,
    Notification,
    Preference,
    Topic,
)

pytestmark = [pytest.mark.django_db(transaction=False), pytest.mark.usefixtures("locmem_email")]


@pytest.fixture
def deploys():
    return Topic.objects.create(slug="deploys", title="Deploys")


@pytest.fixture
def dave(make_user):
    return make_user("dave", email="dave@example.com")


def rule(user, scope, key="", **channels):
    return Preference.objects.create(user=user, scope=scope, key=key, **channels)


def send(django_capture_on_commit_callbacks, **kwargs) -> Notification:
    kwargs.setdefault("title", "Deploy finished")
    with django_capture_on_commit_callbacks(execute=True):
        return services.notification_send(**kwargs)[0]


@pytest.fixture
def sent(django_capture_on_commit_callbacks):
    return lambda **kwargs: send(django_capture_on_commit_callbacks, **kwargs)


# Planning: who gets what


def test_a_send_stores_one_job_and_the_worker_plans_only_what_the_preferences_ask(sent, carol, dave, deploys):
    rule(carol, "topic", "deploys", email=True)
    for user in (carol, dave):
        Follow.objects.create(user=user, topic=deploys)
    notification = sent(topic=deploys)
    assert DeliveryJob.objects.count() == 1
    assert delivery.plan_due() == 1
    assert not DeliveryJob.objects.exists()
    assert list(Delivery.objects.values_list("user_id", "channel", "status")) == [
        (carol.pk, "email", "pending")]
    assert Delivery.objects.get().notification == notification


def test_a_broadcast_with_a_default_plans_every_active_user_and_a_level_rule_adds_its_channel(
        sent, carol, dave, make_user, settings):
    make_user("eve", email="eve@example.com", is_active=False)
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_DEFAULTS": {"digest": True}}
    rule(dave, "level", "error", email=True)
    sent(broadcast=True, level="error")
    delivery.plan_due()
    assert sorted(Delivery.objects.values_list("user__username", "channel")) == [
        ("carol", "digest"), ("dave", "digest"), ("dave", "email")]


def test_a_topic_notification_reaches_only_who_followed_when_it_was_sent(sent, carol, dave, deploys):
    for user in (carol, dave):
        rule(user, "topic", "deploys", email=True)
    Follow.objects.create(user=carol, topic=deploys)
    sent(topic=deploys)
    Follow.objects.create(user=dave, topic=deploys)  # too late for it
    delivery.plan_due()
    assert list(Delivery.objects.values_list("user_id", flat=True)) == [carol.pk]


def test_with_every_external_channel_off_a_send_writes_no_job(sent, carol, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_CHANNELS": []}
    rule(carol, "own", email=True)
    sent(users=[carol])
    assert not DeliveryJob.objects.exists()


def test_a_send_no_default_and_no_rule_asks_for_writes_no_job(sent, carol, dave, deploys):
    rule(dave, "topic", "deploys", email=True)  # another audience's rule
    rule(dave, "level", "error", email=True)  # another level's
    rule(carol, "broadcast")  # a rule with every channel off
    rule(carol, "own", push=True)  # a channel the site has off (no VAPID key)
    sent(users=[carol])
    sent(broadcast=True)
    assert not DeliveryJob.objects.exists()
    sent(broadcast=True, level="error")  # dave's level rule asks
    sent(topic=deploys)  # dave's topic rule asks (planning then finds he does not follow it)
    assert DeliveryJob.objects.count() == 2


def test_a_staff_default_of_a_topic_makes_its_sends_write_a_job(sent, deploys):
    services.topic_default_set(topic=deploys, email=False, digest=True, push=False)
    sent(topic=deploys)
    assert DeliveryJob.objects.count() == 1


def test_push_is_not_planned_without_a_vapid_key_or_a_browser(sent, carol):
    rule(carol, "own", email=True, push=True)
    sent(users=[carol])
    delivery.plan_due()
    assert list(Delivery.objects.values_list("channel", flat=True)) == ["email"]


def test_digests_turned_off_plan_no_digest(sent, carol):
    rule(carol, "own", digest=True, email=True)
    DeliverySettings.objects.create(user=carol, digest="off")
    sent(users=[carol])
    delivery.plan_due()
    assert list(Delivery.objects.values_list("channel", flat=True)) == ["email"]


def test_a_job_planned_twice_writes_each_delivery_once(sent, carol):
    rule(carol, "own", email=True)
    notification = sent(users=[carol])
    delivery.plan_due()
    DeliveryJob.objects.create(notification_ids=[notification.pk], due_at=timezone.now())  # a crash replays it
    delivery.plan_due()
    assert Delivery.objects.count() == 1


def test_a_batch_send_is_one_job(carol, dave, staff, django_capture_on_commit_callbacks):
    rule(carol, "own", email=True)
    with django_capture_on_commit_callbacks(execute=True):
        services.notification_send_batch([{"title": "a", "users": [carol.pk]}, {"title": "b", "users": [dave.pk]}],
                                         actor=staff)
    assert DeliveryJob.objects.count() == 1
    delivery.plan_due()
    assert Delivery.objects.count() == 1


def test_a_send_to_many_users_is_planned_in_a_few_queries_per_500_users(
        carol, make_user, staff, django_capture_on_commit_callbacks, django_assert_max_num_queries):
    users = [make_user(f"many-{i}") for i in range(delivery.CHUNK + 100)]
    rule(carol, "own", email=True)
    rule(users[0], "own", push=True, digest=True)
    rule(users[-1], "own", email=True)
    with django_capture_on_commit_callbacks(execute=True):
        services.notification_send(title="To many", users=[carol, *users], actor=staff)
    users[-1].is_active = False  # deactivated after the send, before planning: nothing for them
    users[-1].save(update_fields=["is_active"])
    with django_assert_max_num_queries(20):
        assert delivery.plan_due() == 1
    assert sorted(Delivery.objects.values_list("user__username", "channel")) == [
        ("carol", "email"), ("many-0", "digest")]  # many-0 has no browser: no push


def test_quiet_hours_hold_email_until_they_end(sent, carol):
    now = timezone.now()
    start = (now - timedelta(hours=1)).time().replace(second=0, microsecond=0)
    end = (now + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    DeliverySettings.objects.create(user=carol, quiet_start=start, quiet_end=end)
    rule(carol, "own", email=True)
    sent(users=[carol])
    delivery.run_until_idle()
    row = Delivery.objects.get()
    assert row.status == "pending" and row.due_at > now + timedelta(hours=1)
    assert outbox.outbox == []
    assert row.due_at == preferences.held_until(carol, now)


# Email


def test_an_email_is_rendered_from_the_templates_with_the_unsubscribe_headers(sent, carol):
    rule(carol, "own", email=True)
    notification = sent(users=[carol], body="Version 42 is live.", link="/deploys/42")
    assert delivery.run_until_idle() >= 2
    (message,) = outbox.outbox
    assert message.to == ["carol@example.com"]
    assert message.subject == "Deploy finished"
    assert "Version 42 is live." in message.body and "https://notify.example/deploys/42" in message.body
    html, mimetype = message.alternatives[0]
    assert mimetype == "text/html" and "Version 42 is live." in html
    link = re.search(r"<(https://notify\.example/unsubscribe/[^>]+/)>", message.extra_headers["List-Unsubscribe"])
    assert link and link.group(1) in message.body
    assert message.extra_headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.extra_headers["Message-ID"] == f"<notification-{notification.pk}.user-{carol.pk}@notify.example>"
    row = Delivery.objects.get()
    assert (row.status, row.attempts, row.error) == ("sent", 1, "")
    assert row.sent_at is not None


def test_a_host_template_overrides_the_apps(sent, carol, settings, tmp_path):
    folder = tmp_path / "notifications" / "email"
    folder.mkdir(parents=True)
    (folder / "notification_subject.txt").write_text("[Acme] {{ notification.title }}")
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [tmp_path]}]
    rule(carol, "own", email=True)
    sent(users=[carol])
    delivery.run_until_idle()
    assert outbox.outbox[0].subject == "[Acme] Deploy finished"


def test_a_user_without_an_address_is_skipped_with_the_reason(sent, alice):
    rule(alice, "own", email=True)
    sent(users=[alice])
    delivery.run_until_idle()
    row = Delivery.objects.get()
    assert (row.status, row.error) == ("skipped", "the user has no email address")


def test_a_failed_send_is_retried_with_backoff_then_given_up(sent, carol, settings):
    settings.EMAIL_BACKEND = "tests.support.FailingEmailBackend"
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_MAX_ATTEMPTS": 3, "DELIVERY_RETRY_BASE": 10}
    rule(carol, "own", email=True)
    sent(users=[carol])
    delivery.run_until_idle()
    row = Delivery.objects.get()
    assert (row.status, row.attempts) == ("pending", 1)
    assert "the server said no" in row.error
    assert timedelta(seconds=9) < row.due_at - timezone.now() <= timedelta(seconds=10)
    Delivery.objects.update(due_at=timezone.now())
    delivery.run_until_idle()
    row.refresh_from_db()
    assert row.attempts == 2 and timedelta(seconds=19) < row.due_at - timezone.now() <= timedelta(seconds=20)
    Delivery.objects.update(due_at=timezone.now())
    delivery.run_until_idle()
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("failed", 3)


def test_a_claimed_delivery_is_not_claimed_again_until_its_lease_runs_out(sent, carol):
    rule(carol, "own", email=True)
    sent(users=[carol])
    delivery.plan_due()
    pending = Delivery.objects.filter(status="pending")
    token, rows = delivery.claim(pending, 10)
    assert len(rows) == 1
    assert delivery.claim(pending, 10)[1] == []  # a second worker finds nothing
    Delivery.objects.update(due_at=timezone.now())  # the first worker died: its lease ran out
    other, again = delivery.claim(pending, 10)
    assert [row.pk for row in again] == [rows[0].pk]
    assert not delivery.mark_sent(rows[0], token)  # the dead claim's mark matches nothing
    assert delivery.mark_sent(again[0], other)
    assert Delivery.objects.get().status == DeliveryStatus.SENT


def test_a_sent_email_is_never_sent_again(sent, carol):
    rule(carol, "own", email=True)
    sent(users=[carol])
    delivery.run_until_idle()
    Delivery.objects.update(due_at=timezone.now() - timedelta(days=1))
    delivery.run_until_idle()
    assert len(outbox.outbox) == 1


# One-click unsubscribe


def unsubscribe_link(message) -> str:
    return re.search(r"<https://notify\.example(/unsubscribe/[^>]+/)>",
                     message.extra_headers["List-Unsubscribe"]).group(1)


def test_one_click_unsubscribe_turns_that_kind_of_email_off(sent, carol, deploys):
    Follow.objects.create(user=carol, topic=deploys)
    rule(carol, "topic", "deploys", email=True, push=True)
    rule(carol, "level", "warning", email=True)
    sent(topic=deploys, level="warning")
    delivery.run_until_idle()
    path = unsubscribe_link(outbox.outbox[0])
    client = Client()
    page = client.get(path)
    assert page.status_code == 200 and b"Unsubscribe?" in page.content
    assert preferences.channels_for(carol, Notification.objects.get()) == {"email", "push"}  # GET changes nothing
    done = client.post(path, "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert done.status_code == 200 and b"Unsubscribed" in done.content
    assert preferences.channels_for(carol, Notification.objects.get()) == {"push"}
    assert Preference.objects.get(user=carol, scope="level").email is False


def test_unsubscribe_from_a_default_writes_the_users_own_rule(sent, carol, deploys):
    Follow.objects.create(user=carol, topic=deploys)
    services.topic_default_set(topic=deploys, email=True, digest=True, push=False)
    sent(topic=deploys)
    delivery.run_until_idle()
    assert Client().post(unsubscribe_link(outbox.outbox[0])).status_code == 200
    own = Preference.objects.get(user=carol)
    assert (own.scope, own.key, own.email, own.digest, own.push) == ("topic", "deploys", False, True, False)


def test_a_tampered_unsubscribe_link_is_a_clear_page_and_changes_nothing(sent, carol):
    rule(carol, "own", email=True)
    token = mail.unsubscribe_token(carol.pk, "email", sent(users=[carol]))
    forged = signing.dumps({"u": carol.pk, "c": "email"}, salt="another.salt")
    for bad in (token[:-2] + "xx", forged, "nonsense"):
        response = Client().post(f"/unsubscribe/{bad}/")
        assert response.status_code == 400
        assert b"This link is not valid" in response.content
    assert Preference.objects.get(user=carol).email is True


def test_the_digest_unsubscribe_turns_digests_off(carol):
    token = mail.unsubscribe_token(carol.pk, "digest")
    assert Client().post(f"/unsubscribe/{token}/").status_code == 200
    assert DeliverySettings.objects.get(user=carol).digest == "off"


# Counted in /metrics, shown in the admin, run by a thread or a command


def metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_deliveries_are_counted_in_metrics_by_channel_and_outcome(sent, carol, alice, client):
    rule(carol, "own", email=True)
    rule(alice, "own", email=True)
    before = {outcome: metric("notifications_deliveries_total", channel="email", outcome=outcome)
              for outcome in ("sent", "skipped")}
    planned = metric("notifications_deliveries_planned_total", channel="email")
    sent(users=[carol, alice])
    delivery.run_until_idle()
    assert metric("notifications_deliveries_planned_total", channel="email") == planned + 2
    assert metric("notifications_deliveries_total", channel="email", outcome="sent") == before["sent"] + 1
    assert metric("notifications_deliveries_total", channel="email", outcome="skipped") == before["skipped"] + 1
    text = client.get("/metrics").content.decode()
    assert 'notifications_deliveries_total{channel="email",outcome="sent"}' in text


@pytest.fixture
def root_client(django_user_model):
    root = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(root)
    return client


def test_the_admin_lists_deliveries_and_sends_failed_ones_again(sent, carol, root_client, settings):
    settings.EMAIL_BACKEND = "tests.support.FailingEmailBackend"
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_MAX_ATTEMPTS": 1}
    rule(carol, "own", email=True)
    notification = sent(users=[carol])
    delivery.run_until_idle()
    row = Delivery.objects.get()
    assert row.status == "failed"
    page = root_client.get("/admin/notifications/delivery/?status__exact=failed")
    assert page.status_code == 200 and b"the server said no" in page.content
    detail = root_client.get(f"/admin/notifications/notification/{notification.pk}/change/")
    assert b"email failed: 1" in detail.content
    assert b"live frame handed to the sockets of 0 user(s)" in detail.content
    assert root_client.get(f"/admin/notifications/delivery/{row.pk}/change/").status_code == 200
    assert root_client.get("/admin/notifications/delivery/add/").status_code == 403
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    response = root_client.post("/admin/notifications/delivery/",
                                {"action": "send_again", "_selected_action": [row.pk]})
    assert response.status_code == 302
    delivery.run_until_idle()
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("sent", 1)
    assert len(outbox.outbox) == 1
    for page in ("deliveryjob", "pushsubscription", "deliverysettings", "socketreceipt"):
        assert root_client.get(f"/admin/notifications/{page}/").status_code == 200


def test_manage_py_deliver_once_sends_what_is_due(sent, carol):
    from django.core.management import call_command

    rule(carol, "own", email=True)
    sent(users=[carol])
    call_command("deliver", "--once")
    assert len(outbox.outbox) == 1


@pytest.mark.django_db(transaction=True)
def test_the_worker_thread_sends_after_commit_and_stops(carol, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_WORKER": True, "DELIVERY_POLL_INTERVAL": 30}
    rule(carol, "own", email=True)
    try:
        assert delivery.start_worker() is not None  # (a server process starts it with its first event)
        services.notification_send(title="Woken", users=[carol])  # wakes the worker after commit
        deadline = timezone.now() + timedelta(seconds=10)
        while not outbox.outbox and timezone.now() < deadline:
            threading_wait(0.05)
        assert [m.subject for m in outbox.outbox] == ["Woken"]
        worker = delivery.start_worker()
        assert worker is not None and worker.is_alive()
    finally:
        delivery.stop_worker()
    assert not worker.is_alive()


def threading_wait(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)


def test_without_the_worker_setting_nothing_starts_a_thread():
    assert delivery.start_worker() is None


async def test_the_asgi_application_starts_the_worker_with_its_first_event_not_at_import(settings):
    from notifications.asgi import notifications_application

    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_WORKER": True}

    async def http_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    application = notifications_application(http_app)
    assert delivery._worker is None  # building it started nothing
    sent_messages = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent_messages.append(message)

    try:
        await application({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)
        assert sent_messages[0]["status"] == 204
        assert delivery._worker is not None and delivery._worker.is_alive()
    finally:
        delivery.stop_worker()


# The site's address, for links


@pytest.mark.parametrize(("site_url", "debug", "channels", "warned"), [
    ("", False, ["email"], True),
    ("example.com", False, ["email"], True),
    ("https://example.com", False, ["email"], False),
    ("", True, ["email"], False),
    ("", False, [], False),
])
def test_w008_warns_without_an_absolute_site_url_in_production(settings, site_url, debug, channels, warned):
    from notifications import checks

    settings.DEBUG = debug
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "SITE_URL": site_url, "DELIVERY_CHANNELS": channels}
    assert [m.id for m in checks.site_url_check()] == (["notifications.W008"] if warned else [])


def test_links_are_absolute_from_site_url_and_debug_has_a_default(settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "SITE_URL": "https://notify.example/"}
    assert mail.absolute("/deploys/1") == "https://notify.example/deploys/1"
    assert mail.absolute("https://elsewhere.example/x") == "https://elsewhere.example/x"
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "SITE_URL": ""}
    settings.DEBUG = True
    assert mail.site_url() == "http://localhost:8000"
