"""Digests: one email per user listing their pending ``digest`` deliveries still unread
(``manage.py send_digests``, run by a timer; docs/delivery.md, docs/deployment.md).

A user is **due** when they have pending digest deliveries, their ``DeliverySettings.digest`` is
``hourly`` or ``daily`` (no settings row: the default, daily) and their last digest was sent
never or at least the period ago, less ``SLACK`` (so an hourly timer that fires a little early
still sends).

``send_digests`` walks the users with pending digest deliveries in id order, a chunk at a time,
and **claims** each due user with one conditional UPDATE of their settings row (setting
``digest_claim_until`` to now + ``DELIVERY_LEASE`` where it is empty or past, and the user is
still due): two runs never hold the same user, on PostgreSQL (the second UPDATE waits for the
first's row lock, then finds the row taken) and on SQLite (writes are serialized). Holding the
user, it takes their pending digest deliveries created before the claim, lists the unread ones
(at most ``DIGEST_MAX_ITEMS``, oldest first; the rest are counted as "more"), sends one email
(one connection for the whole run, ``mail.Mailer``), then in one transaction marks those deliveries sent,
the read ones skipped ("read before the digest"), records ``last_digest_at`` and releases the
claim.

- Nothing unread: the deliveries are skipped, no email, ``last_digest_at`` unchanged.
- No email address: the deliveries are skipped ("the user has no email address").
- Digests turned off (``off``, or the digest's unsubscribe link) after deliveries were planned:
  they are skipped ("digests turned off") at the start of the next run.
- The send fails: the claim is released and the deliveries stay pending (their ``attempts`` and
  ``error`` say so); the next run tries again. Opening the connection fails: the run stops there.
- **The only repeat**: a run that dies after the server accepted a digest and before that
  transaction commits sends the digest again at the first run after its lease (with the same
  ``Message-ID``). A run that dies before the server accepted sends nothing twice.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from . import conf, delivery, mail, metrics, selectors
from .models import Delivery, DeliveryChannel, DeliverySettings, DeliveryStatus, DigestFrequency

logger = logging.getLogger(__name__)

SLACK = timedelta(minutes=5)
PERIODS: dict[str, timedelta] = {DigestFrequency.HOURLY: timedelta(hours=1), DigestFrequency.DAILY: timedelta(hours=24)}
READ = "read before the digest"
TURNED_OFF = "digests turned off"


@dataclass
class DigestReport:
    """How many users a run sent a digest to, skipped (nothing unread, no address), failed to send to."""

    sent: int = 0
    skipped: int = 0
    failed: int = 0

    def __str__(self) -> str:
        return f"Digests: {self.sent} sent, {self.skipped} skipped, {self.failed} failed."


def _due(now: datetime) -> Q:
    """The condition on ``DeliverySettings`` of a user whose digest is due at ``now``."""
    condition = Q(pk__in=[])
    for frequency, period in PERIODS.items():
        condition |= Q(digest=frequency) & (Q(last_digest_at__isnull=True)
                                            | Q(last_digest_at__lte=now - period + SLACK))
    return condition


def _pending() -> QuerySet[Delivery]:
    return Delivery.objects.filter(channel=DeliveryChannel.DIGEST, status=DeliveryStatus.PENDING)


def _users_with_pending() -> Iterator[list[int]]:
    """The ids of the users with pending digest deliveries, ascending, ``delivery.CHUNK`` at a time."""
    after = 0
    while True:
        ids = list(_pending().filter(user_id__gt=after).order_by("user_id")
                   .values_list("user_id", flat=True).distinct()[:delivery.CHUNK])
        if not ids:
            return
        yield ids
        after = ids[-1]


def _due_in(ids: list[int], now: datetime) -> list[int]:
    """Those of ``ids`` whose digest is due: the ones with no settings yet (daily, never sent) too."""
    not_due = set(DeliverySettings.objects.filter(pk__in=ids).exclude(_due(now)).values_list("pk", flat=True))
    return [user_id for user_id in ids if user_id not in not_due]


def due_users(now: datetime | None = None) -> list[int]:
    """The ids of the users whose digest is due (``--dry-run``; a run may still find one taken)."""
    now = now or timezone.now()
    return [user_id for ids in _users_with_pending() for user_id in _due_in(ids, now)]


def claim(user_id: int, now: datetime) -> datetime | None:
    """Hold the user's digest for this run until the returned time (now + ``DELIVERY_LEASE``);
    None when it is not due or another run holds it."""
    DeliverySettings.objects.get_or_create(user_id=user_id)
    until = now + timedelta(seconds=conf.settings.DELIVERY_LEASE)
    free = Q(digest_claim_until__isnull=True) | Q(digest_claim_until__lt=now)
    taken = DeliverySettings.objects.filter(_due(now), free, pk=user_id).update(digest_claim_until=until)
    return until if taken == 1 else None


def release(user_id: int, until: datetime) -> None:
    """Give the claim up (the deliveries stay pending for the next run)."""
    DeliverySettings.objects.filter(pk=user_id, digest_claim_until=until).update(digest_claim_until=None)


def _finish(user_id: int, until: datetime, now: datetime, *, sent: list[int], skipped: list[int],
            reason: str, digest_sent: bool) -> None:
    """In one transaction: mark the deliveries, record the digest (if one was sent), release the claim."""
    with transaction.atomic():
        done = 0
        for chunk in delivery.chunks(sent):
            done += _pending().filter(pk__in=chunk).update(status=DeliveryStatus.SENT, sent_at=now, error="",
                                                           attempts=F("attempts") + 1)
        dropped = 0
        for chunk in delivery.chunks(skipped):
            dropped += _pending().filter(pk__in=chunk).update(status=DeliveryStatus.SKIPPED, error=reason)
        changes: dict = {"digest_claim_until": None}
        if digest_sent:
            changes["last_digest_at"] = now
        if not DeliverySettings.objects.filter(pk=user_id, digest_claim_until=until).update(**changes):
            # The lease ran out and another run may hold the user now: leave its claim alone.
            logger.warning("digest of user %s: the claim ran out before the marks (DELIVERY_LEASE too short?); "
                           "another run may send it too", user_id)
            if digest_sent:
                DeliverySettings.objects.filter(pk=user_id).update(last_digest_at=now)
    metrics.delivery(DeliveryChannel.DIGEST, "sent", done)
    metrics.delivery(DeliveryChannel.DIGEST, "skipped", dropped)


def _send_one(user, until: datetime, now: datetime, mailer: mail.Mailer) -> str:
    """Send the digest of a claimed user: "sent", "skipped", "failed" (or "" with nothing to send)."""
    rows = list(_pending().filter(user=user, created_at__lte=now).order_by("notification_id")
                .values_list("pk", "notification_id"))
    if not rows:
        release(user.pk, until)  # only deliveries newer than the claim (a clock fixed in the past)
        return ""
    delivery_of = {notification_id: pk for pk, notification_id in rows}
    if not user.email:
        _finish(user.pk, until, now, sent=[], skipped=[pk for pk, _ in rows], reason=mail.NO_ADDRESS,
                digest_sent=False)
        return "skipped"
    unread = [n for chunk in delivery.chunks(list(delivery_of)) for n in selectors.unread_among(user, chunk)]
    unread_ids = {n.pk for n in unread}
    read = [pk for notification_id, pk in delivery_of.items() if notification_id not in unread_ids]
    if not unread:
        _finish(user.pk, until, now, sent=[], skipped=read, reason=READ, digest_sent=False)
        return "skipped"
    limit = max(1, conf.settings.DIGEST_MAX_ITEMS)
    frequency = DeliverySettings.objects.filter(pk=user.pk).values_list("digest", flat=True).first()
    listed = unread[:limit]
    try:
        mailer.send(mail.digest_email(user, listed, len(unread) - len(listed),
                                      frequency if frequency in PERIODS else DigestFrequency.DAILY))
    except Exception as exc:
        reason = str(exc) if isinstance(exc, mail.ConnectionFailed) else f"{type(exc).__name__}: {exc}"
        reason = reason[:2000]
        release(user.pk, until)
        ids = [pk for pk, _ in rows]
        for chunk in delivery.chunks(ids):
            _pending().filter(pk__in=chunk).update(attempts=F("attempts") + 1, error=reason)
        metrics.delivery(DeliveryChannel.DIGEST, "retried", len(ids))
        logger.warning("digest to user %s failed (tried again at the next run): %s", user.pk, reason)
        if isinstance(exc, mail.ConnectionFailed):
            raise
        return "failed"
    sent = [delivery_of[n.pk] for n in unread]
    _finish(user.pk, until, now, sent=sent, skipped=read, reason=READ, digest_sent=True)
    return "sent"


def send_digests(now: datetime | None = None) -> DigestReport:
    """Send every due user's digest once (module docstring); ``now`` fixes the clock (tests)."""
    def clock() -> datetime:
        return now if now is not None else timezone.now()

    report = DigestReport()
    turned_off = _pending().filter(user__delivery_settings__digest=DigestFrequency.OFF).update(
        status=DeliveryStatus.SKIPPED, error=TURNED_OFF)  # planned before the user turned digests off
    metrics.delivery(DeliveryChannel.DIGEST, "skipped", turned_off)
    mailer = mail.Mailer()
    users = get_user_model().objects
    try:
        for ids in _users_with_pending():
            due = _due_in(ids, clock())
            by_id = users.in_bulk(due)
            for user_id in due:
                if user_id not in by_id:
                    continue  # deleted meanwhile
                moment = clock()
                until = claim(user_id, moment)
                if until is None:
                    continue  # sent meanwhile, or another run holds it
                try:
                    outcome = _send_one(by_id[user_id], until, moment, mailer)
                except mail.ConnectionFailed:
                    report.failed += 1
                    return report
                if outcome:
                    setattr(report, outcome, getattr(report, outcome) + 1)
    finally:
        mailer.close()
    return report
