"""Digests (notifications.digests, manage.py send_digests) on Django's locmem email backend: who
is due, what a digest lists, the marks, the claim, the one-click unsubscribe."""

import re
from datetime import timedelta

import pytest
from django.core import mail as outbox
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from notifications import delivery, digests, services
from notifications.models import Delivery, DeliverySettings, Notification, Preference
from tests.support import FailingEmailBackend, StubEmailBackend

pytestmark = [pytest.mark.django_db(transaction=False), pytest.mark.usefixtures("locmem_email")]


@pytest.fixture
def dave(make_user):
    return make_user("dave", email="dave@example.com")


def digest_rule(user) -> None:
    Preference.objects.get_or_create(user=user, scope="own", key="", defaults={"digest": True})


def notify(user, *titles: str) -> list[Notification]:
    """Send ``titles`` to ``user`` (whose rule sends them to the digest) and plan the deliveries."""
    digest_rule(user)
    rows = [services.notification_send(users=[user], title=title)[0] for title in titles]
    delivery.plan_due()
    return rows


def statuses(user) -> list[tuple[str, str, str]]:
    return list(Delivery.objects.filter(user=user, channel="digest").order_by("notification_id")
                .values_list("notification__title", "status", "error"))


def later(**delta) -> timezone.datetime:
    return timezone.now() + timedelta(**delta)


# Who is due


def test_a_user_without_settings_gets_a_daily_digest_and_it_is_recorded(carol):
    notify(carol, "Deploy 1", "Deploy 2")
    report = digests.send_digests()
    assert (report.sent, report.skipped, report.failed) == (1, 0, 0)
    (message,) = outbox.outbox
    assert message.to == ["carol@example.com"]
    assert message.subject == "2 unread notifications"
    assert "Deploy 1" in message.body and "Deploy 2" in message.body
    row = DeliverySettings.objects.get(user=carol)
    assert row.digest == "daily" and row.last_digest_at is not None and row.digest_claim_until is None
    assert statuses(carol) == [("Deploy 1", "sent", ""), ("Deploy 2", "sent", "")]
    assert digests.send_digests() == digests.DigestReport()  # nothing pending: nothing to do


@pytest.mark.parametrize(("frequency", "ago", "due"), [
    ("hourly", None, True),
    ("hourly", timedelta(minutes=30), False),
    ("hourly", timedelta(minutes=54), False),
    ("hourly", timedelta(minutes=55, seconds=1), True),  # the timer fired a little early: the slack
    ("hourly", timedelta(hours=3), True),
    ("daily", timedelta(hours=23), False),
    ("daily", timedelta(hours=23, minutes=56), True),
    ("daily", None, True),
    ("off", None, False),
    ("off", timedelta(days=9), False),
])
def test_the_digest_is_due_after_its_period_less_five_minutes(carol, frequency, ago, due):
    notify(carol, "Deploy")
    now = timezone.now()
    DeliverySettings.objects.create(user=carol, digest=frequency, last_digest_at=ago and now - ago)
    assert digests.due_users(now) == ([carol.pk] if due else [])
    assert digests.send_digests(now).sent == int(due)
    assert len(outbox.outbox) == int(due)
    assert statuses(carol)[0][1] == ("sent" if due else "skipped" if frequency == "off" else "pending")


def test_an_hourly_digest_goes_out_again_an_hour_later_with_only_what_is_new(carol):
    DeliverySettings.objects.create(user=carol, digest="hourly")
    notify(carol, "First")
    assert digests.send_digests().sent == 1
    notify(carol, "Second")
    assert digests.send_digests().sent == 0  # not an hour yet
    assert digests.send_digests(later(minutes=59)).sent == 1
    assert [m.subject for m in outbox.outbox] == ["1 unread notification", "1 unread notification"]
    assert "Second" in outbox.outbox[1].body and "First" not in outbox.outbox[1].body


# What a digest lists


def test_a_digest_lists_only_the_unread_and_skips_the_read_with_the_reason(carol):
    first, second, third = notify(carol, "Read", "Unread", "Dismissed")
    services.notification_mark_read(user=carol, ids=[first.pk])
    services.notification_dismiss(user=carol, notification_id=third.pk)
    assert digests.send_digests().sent == 1
    (message,) = outbox.outbox
    assert message.subject == "1 unread notification"
    assert "Unread" in message.body and "Read\n" not in message.body and "Dismissed" not in message.body
    assert statuses(carol) == [("Read", "skipped", "read before the digest"), ("Unread", "sent", ""),
                               ("Dismissed", "skipped", "read before the digest")]


def test_a_digest_lists_at_most_digest_max_items_and_counts_the_rest(carol, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DIGEST_MAX_ITEMS": 2}
    notify(carol, *(f"Deploy {i}" for i in range(5)))
    digests.send_digests()
    (message,) = outbox.outbox
    assert message.subject == "5 unread notifications"
    assert "Deploy 0" in message.body and "Deploy 1" in message.body and "Deploy 2" not in message.body
    assert "… and 3 more: https://notify.example/" in message.body
    assert "… and 3 more" in message.alternatives[0][0]
    assert {status for _, status, _ in statuses(carol)} == {"sent"}  # the counted ones too


def test_one_email_per_user_with_the_unsubscribe_headers_and_the_link_turns_digests_off(carol, dave):
    notify(carol, "For carol 1", "For carol 2")
    notify(dave, "For dave")
    assert digests.send_digests() == digests.DigestReport(sent=2)
    assert sorted(m.to[0] for m in outbox.outbox) == ["carol@example.com", "dave@example.com"]
    message = next(m for m in outbox.outbox if m.to == ["carol@example.com"])
    link = re.fullmatch(r"<https://notify\.example(/unsubscribe/[^>]+/)>", message.extra_headers["List-Unsubscribe"])
    assert link and f"https://notify.example{link.group(1)}" in message.body
    assert message.extra_headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert re.fullmatch(rf"<digest-{carol.pk}\.\d+-\d+@notify\.example>", message.extra_headers["Message-ID"])
    done = Client().post(link.group(1), "List-Unsubscribe=One-Click",
                         content_type="application/x-www-form-urlencoded")
    assert done.status_code == 200
    assert DeliverySettings.objects.get(user=carol).digest == "off"
    notify(carol, "After the unsubscribe")
    notify(dave, "Dave's next")
    assert not Delivery.objects.filter(user=carol, notification__title="After the unsubscribe").exists()
    assert digests.send_digests(later(days=2)) == digests.DigestReport(sent=1)
    assert outbox.outbox[-1].to == ["dave@example.com"]


def test_no_email_when_everything_was_read_and_the_last_digest_stays(carol):
    (notification,) = notify(carol, "Seen")
    services.notification_mark_all_read(user=carol)
    assert digests.send_digests() == digests.DigestReport(skipped=1)
    assert outbox.outbox == []
    assert statuses(carol) == [("Seen", "skipped", "read before the digest")]
    assert DeliverySettings.objects.get(user=carol).last_digest_at is None
    notify(carol, "New")
    assert digests.send_digests().sent == 1  # no digest was sent: the next one is not held back


def test_a_user_without_an_address_is_skipped_with_the_reason(alice):
    notify(alice, "Deploy")
    assert digests.send_digests() == digests.DigestReport(skipped=1)
    assert outbox.outbox == []
    assert statuses(alice) == [("Deploy", "skipped", "the user has no email address")]


def test_users_are_taken_in_id_order_a_chunk_at_a_time(make_user, monkeypatch):
    monkeypatch.setattr(delivery, "CHUNK", 2)  # (digests read users through delivery.chunks)
    users = [make_user(f"user{i}", email=f"user{i}@example.com") for i in range(5)]
    for user in users:
        notify(user, "Deploy")
    assert digests.send_digests().sent == 5
    assert [m.to[0] for m in outbox.outbox] == [f"user{i}@example.com" for i in range(5)]


# The claim


def test_two_claims_never_hold_the_same_user_until_the_lease_runs_out(carol, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_LEASE": 60}
    notify(carol, "Deploy")
    now = timezone.now()
    held = digests.claim(carol.pk, now)
    assert held == now + timedelta(seconds=60)
    assert digests.claim(carol.pk, now) is None
    assert digests.claim(carol.pk, now + timedelta(seconds=59)) is None
    assert digests.send_digests(now) == digests.DigestReport()  # a run finds the user taken
    assert outbox.outbox == []
    again = digests.claim(carol.pk, now + timedelta(seconds=61))  # the holder died: its lease ran out
    assert again is not None and again != held
    digests.release(carol.pk, held)  # the dead run's release matches nothing
    assert DeliverySettings.objects.get(user=carol).digest_claim_until == again


def test_a_user_just_sent_to_is_not_claimed_again(carol):
    notify(carol, "Deploy")
    now = timezone.now()
    digests.send_digests(now)
    Delivery.objects.update(status="pending")  # as if a second run had read them before the first marked
    assert digests.claim(carol.pk, now) is None


class OvertakenBackend(StubEmailBackend):
    """Sends, but so slowly that the lease runs out and another run claims the user meanwhile."""

    other_claim = timezone.now() + timedelta(days=1)

    def send_messages(self, messages):
        DeliverySettings.objects.update(digest_claim_until=self.other_claim)
        return len(messages)


def test_a_run_whose_lease_ran_out_marks_its_digest_but_leaves_the_new_claim(carol, settings, caplog):
    notify(carol, "Deploy")
    settings.EMAIL_BACKEND = f"{__name__}.OvertakenBackend"
    assert digests.send_digests().sent == 1
    row = DeliverySettings.objects.get(user=carol)
    assert row.digest_claim_until == OvertakenBackend.other_claim and row.last_digest_at is not None
    assert statuses(carol) == [("Deploy", "sent", "")]
    assert "the claim ran out before the marks" in caplog.text


class UnreachableBackend(FailingEmailBackend):
    opened = 0

    def open(self):
        type(self).opened += 1
        raise ConnectionRefusedError("no server")


def test_a_failed_send_releases_the_claim_and_the_next_run_sends(carol, dave, settings, caplog):
    notify(carol, "Deploy")
    notify(dave, "Deploy")
    settings.EMAIL_BACKEND = "tests.support.FailingEmailBackend"
    assert digests.send_digests() == digests.DigestReport(failed=2)
    assert "digest to user" in caplog.text and "the server said no" in caplog.text
    row = Delivery.objects.get(user=carol)
    assert (row.status, row.attempts) == ("pending", 1) and "the server said no" in row.error
    assert DeliverySettings.objects.get(user=carol).digest_claim_until is None
    assert DeliverySettings.objects.get(user=carol).last_digest_at is None
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert digests.send_digests() == digests.DigestReport(sent=2)
    row.refresh_from_db()
    assert (row.status, row.attempts, row.error) == ("sent", 2, "")


def test_a_run_stops_when_the_email_server_cannot_be_reached(carol, dave, settings):
    notify(carol, "Deploy")
    notify(dave, "Deploy")
    settings.EMAIL_BACKEND = f"{__name__}.UnreachableBackend"
    UnreachableBackend.opened = 0
    assert digests.send_digests() == digests.DigestReport(failed=1)
    assert UnreachableBackend.opened == 1  # not once per user
    assert set(Delivery.objects.values_list("status", flat=True)) == {"pending"}
    assert not DeliverySettings.objects.filter(digest_claim_until__isnull=False).exists()


# manage.py send_digests


def test_the_command_prints_the_counts_and_a_dry_run_sends_nothing(carol, alice, capsys):
    notify(carol, "Deploy")
    notify(alice, "Deploy")
    call_command("send_digests", "--dry-run")
    out = capsys.readouterr().out
    assert f"{carol.pk} carol carol@example.com" in out and "Digests due: 2 users (dry run" in out
    assert outbox.outbox == []
    call_command("send_digests")
    assert capsys.readouterr().out.strip() == "Digests: 1 sent, 1 skipped, 0 failed."
    assert len(outbox.outbox) == 1


def test_the_command_exits_1_when_a_digest_failed(carol, settings, capsys):
    notify(carol, "Deploy")
    settings.EMAIL_BACKEND = "tests.support.FailingEmailBackend"
    with pytest.raises(SystemExit) as exited:
        call_command("send_digests")
    assert exited.value.code == 1
    assert capsys.readouterr().out.strip() == "Digests: 0 sent, 0 skipped, 1 failed."


def test_digests_turned_off_after_planning_skip_the_pending_rows(django_capture_on_commit_callbacks, make_user):
    from notifications import delivery, digests, services
    from notifications.models import Delivery, DeliverySettings, Preference

    reader = make_user("late-quitter", email="late@example.com")
    Preference.objects.create(user=reader, scope="own", digest=True)
    with django_capture_on_commit_callbacks(execute=True):
        services.notification_send(title="planned", users=[reader])
    delivery.plan_due()
    DeliverySettings.objects.update_or_create(user=reader, defaults={"digest": "off"})
    assert str(digests.send_digests()) == "Digests: 0 sent, 0 skipped, 0 failed."
    row = Delivery.objects.get()
    assert (row.status, row.error) == ("skipped", "digests turned off")
