"""Email through a real SMTP server (tests/smtp.py: aiosmtpd on a loopback port): the immediate
email end to end, one session for a batch, a 4xx reply retried, and ``manage.py send_digests``
killed mid-run and run twice at once (subprocesses on the test database)."""

import os
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from notifications import delivery, services
from notifications.models import Delivery, Preference
from tests.server import APP_ENV, BASE_DIR, database_url
from tests.smtp import SmtpServer

from .conftest import require_postgres

SITE_URL = "https://notify.example"
FROM = "Notifications <notify@notify.example>"


@pytest.fixture
def smtp(settings):
    """A real SMTP server, and Django's SMTP backend pointed at it."""
    server = SmtpServer().start()
    for name, value in server.django_settings().items():
        setattr(settings, name, value)
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "SITE_URL": SITE_URL, "EMAIL_FROM": FROM}
    yield server
    server.stop()


def email_rule(user, **channels) -> None:
    Preference.objects.create(user=user, scope="own", key="", **(channels or {"email": True}))


# The email channel


@pytest.mark.django_db
def test_an_email_arrives_with_its_headers_and_its_one_click_link_stops_the_next(smtp, make_user):
    carol = make_user("carol", email="carol@example.com")
    email_rule(carol)
    (notification,) = services.notification_send(users=[carol], title="Deploy finished", body="Version 42 is live.",
                                                  link="/deploys/42")
    delivery.run_until_idle()
    (received,) = smtp.handler.messages
    message = received.message
    assert (message["From"], message["To"], message["Subject"]) == (FROM, "carol@example.com", "Deploy finished")
    assert received.rcpt_tos == ["carol@example.com"]
    plain = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert "Version 42 is live." in plain and f"{SITE_URL}/deploys/42" in plain
    assert "Version 42 is live." in html and "<html" in html
    link = re.fullmatch(r"<(https://notify\.example(/unsubscribe/[^>]+/))>",
                        message["List-Unsubscribe"].strip())  # a long header is folded: " <https://...>"
    assert link and link.group(1) in plain
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["Message-ID"] == f"<notification-{notification.pk}.user-{carol.pk}@notify.example>"
    done = Client().post(link.group(2), "List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
    assert done.status_code == 200
    services.notification_send(users=[carol], title="The next one")
    delivery.run_until_idle()
    assert len(smtp.handler.messages) == 1
    assert not Delivery.objects.filter(notification__title="The next one").exists()


@pytest.mark.django_db
def test_a_batch_of_50_recipients_is_50_messages_over_one_session(smtp, make_user):
    users = [make_user(f"user{i}", email=f"user{i}@example.com") for i in range(50)]
    for user in users:
        email_rule(user)
    services.notification_send(users=users, title="Maintenance tonight")
    delivery.run_until_idle()
    assert smtp.handler.sessions == 1
    assert {received.session for received in smtp.handler.messages} == {1}
    assert sorted(smtp.handler.recipients()) == sorted(user.email for user in users)
    assert Counter(received.to for received in smtp.handler.messages) == Counter(user.email for user in users)
    assert set(Delivery.objects.values_list("status", flat=True)) == {"sent"}


@pytest.mark.django_db
def test_a_451_reply_is_retried_with_backoff_then_sent_once(smtp, make_user, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_RETRY_BASE": 10}
    carol = make_user("carol", email="carol@example.com")
    email_rule(carol)
    smtp.handler.refuse("451 4.3.0 Try again later")
    services.notification_send(users=[carol], title="Deploy finished")
    delivery.run_until_idle()
    row = Delivery.objects.get()
    assert (row.status, row.attempts) == ("pending", 1) and "451" in row.error
    assert timedelta(seconds=9) < row.due_at - timezone.now() <= timedelta(seconds=10)
    assert smtp.handler.attempts == 1 and smtp.handler.messages == []
    delivery.run_until_idle()
    assert smtp.handler.attempts == 1  # not before its time
    smtp.handler.accept()
    Delivery.objects.update(due_at=timezone.now())  # the backoff has passed
    delivery.run_until_idle()
    row.refresh_from_db()
    assert (row.status, row.attempts, row.error) == ("sent", 2, "")
    Delivery.objects.update(due_at=timezone.now() - timedelta(days=1))
    delivery.run_until_idle()
    assert smtp.handler.recipients() == ["carol@example.com"]


# manage.py send_digests in other processes


def command_env(smtp: SmtpServer, **extra: str) -> dict[str, str]:
    """The environment of a ``manage.py`` process on the test database and the test SMTP server."""
    from django.conf import settings
    from django.db import connection

    env = {k: v for k, v in os.environ.items() if k not in APP_ENV}
    env.update(DJANGO_SETTINGS_MODULE="project.settings", PYTHONUNBUFFERED="1", SECRET_KEY=settings.SECRET_KEY,
               DATABASE_URL=database_url(connection.settings_dict), EMAIL_URL=smtp.email_url, SITE_URL=SITE_URL,
               DELIVERY_WORKER="0", **extra)
    return env


SEND_DIGESTS = [sys.executable, "manage.py", "send_digests"]


def users_with_due_digests(make_user, count: int) -> list:
    users = [make_user(f"digest{i}", email=f"digest{i}@example.com") for i in range(count)]
    for user in users:
        email_rule(user, digest=True)
    services.notification_send(users=users, title="Weekly report")
    services.notification_send(users=users, title="Deploy finished")
    delivery.plan_due()
    assert Delivery.objects.filter(channel="digest", status="pending").count() == 2 * count
    return users


def run_send_digests(env: dict[str, str]) -> str:
    result = subprocess.run(SEND_DIGESTS, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout.strip()


def sent_count(output: str) -> int:
    found = re.search(r"Digests: (\d+) sent, 0 skipped, 0 failed\.", output)
    assert found, output
    return int(found.group(1))


def killed_at_the_5th_message(command: list[str], env: dict[str, str], smtp: SmtpServer) -> None:
    """Run ``command`` until the server holds the 5th message's DATA reply, SIGKILL it there, then
    let the server answer (that message was never accepted)."""
    smtp.handler.stall(5)
    process = subprocess.Popen(command, cwd=BASE_DIR, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert smtp.handler.stalled.wait(60), f"{command[2]} never reached the 5th message"
        process.kill()
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    smtp.handler.release()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_send_digests_killed_mid_run_sends_each_digest_exactly_once_after_the_lease(smtp, make_user):
    """SIGKILL while the server holds the 5th digest's DATA reply (so it was never accepted): the
    next run sends users 6 to 10, the one after the 2 s lease user 5, and nobody gets two."""
    require_postgres()
    users = users_with_due_digests(make_user, 10)
    env = command_env(smtp, DELIVERY_LEASE="2")
    killed_at_the_5th_message(SEND_DIGESTS, env, smtp)
    assert len(smtp.handler.messages) == 4  # the 5th was not accepted
    assert sent_count(run_send_digests(env)) == 5  # users 6 to 10; the killed run still holds user 5
    assert users[4].email not in smtp.handler.recipients()
    time.sleep(2.5)  # the killed run's lease on user 5 runs out
    assert sent_count(run_send_digests(env)) == 1
    assert Counter(smtp.handler.recipients()) == Counter({user.email: 1 for user in users})
    assert set(Delivery.objects.values_list("status", flat=True)) == {"sent"}
    assert smtp.handler.messages[0].message["Subject"] == "2 unread notifications"


@pytest.mark.django_db(transaction=True)
def test_two_send_digests_at_once_send_each_user_one_digest(smtp, make_user):
    """Two runs started together over 30 users (the server answers each DATA after 30 ms, so the
    runs overlap): each user gets one digest, and the runs' counts add up to 30."""
    users = users_with_due_digests(make_user, 30)
    smtp.handler.delay = 0.03
    env = command_env(smtp)
    processes = [subprocess.Popen(SEND_DIGESTS, cwd=BASE_DIR, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, out + err[-3000:]
        outputs.append(out.strip())
    assert sum(sent_count(output) for output in outputs) == 30
    assert Counter(smtp.handler.recipients()) == Counter({user.email: 1 for user in users})
    assert set(Delivery.objects.values_list("status", flat=True)) == {"sent"}


# manage.py deliver: the email worker killed mid-batch, and two at once

DELIVER_ONCE = [sys.executable, "manage.py", "deliver", "--once"]


def users_with_pending_emails(make_user, count: int) -> list:
    users = [make_user(f"mailed{i}", email=f"mailed{i}@example.com") for i in range(count)]
    for user in users:
        email_rule(user)
    services.notification_send(users=users, title="Incident resolved")
    delivery.plan_due()
    assert Delivery.objects.filter(channel="email", status="pending").count() == count
    return users


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_deliver_killed_mid_batch_sends_each_email_exactly_once_after_the_lease(smtp, make_user):
    """SIGKILL while the server holds the 5th email's DATA reply: the four before it are marked
    sent, the next run after the 2 s lease sends the other six, and nobody gets two."""
    require_postgres()
    users = users_with_pending_emails(make_user, 10)
    env = command_env(smtp, DELIVERY_LEASE="2")
    killed_at_the_5th_message(DELIVER_ONCE, env, smtp)
    assert len(smtp.handler.messages) == 4
    assert Delivery.objects.filter(status="sent").count() == 4  # each marked as soon as it was sent
    time.sleep(2.5)  # the killed worker's lease on the other six runs out
    result = subprocess.run(DELIVER_ONCE, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert Counter(smtp.handler.recipients()) == Counter({user.email: 1 for user in users})
    assert set(Delivery.objects.values_list("status", flat=True)) == {"sent"}


@pytest.mark.django_db(transaction=True)
def test_two_deliver_processes_at_once_send_each_email_once(smtp, make_user):
    users = users_with_pending_emails(make_user, 40)
    smtp.handler.delay = 0.02
    env = command_env(smtp, DELIVERY_BATCH="5")
    processes = [subprocess.Popen(DELIVER_ONCE, cwd=BASE_DIR, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, out + err[-3000:]
    assert Counter(smtp.handler.recipients()) == Counter({user.email: 1 for user in users})
    assert set(Delivery.objects.values_list("status", flat=True)) == {"sent"}
