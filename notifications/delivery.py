"""Delivery beyond the open socket: email, digests and Web Push (docs/delivery.md).

The path of a notification to a user's mailbox or browser, each step stored before the next:

1. **The send** writes one ``DeliveryJob`` beside its notifications, in the sending transaction
   (``job_create``; one row whatever the audience's size; none when no default and no rule can
   ask for an external channel), and wakes this process's worker after commit.
2. **Planning** (``plan_due``): a worker takes the job, asks the preferences which users get
   which channels (``recipients``: one query per 500 users, and for a broadcast or topic only
   the users who have a rule, when no default turns a channel on), and writes one ``Delivery``
   per notification, user and channel, due now or when the user's quiet hours end, deleting the
   job in the same transaction.
3. **Sending** (``send_due``): a worker claims due deliveries of one channel (``claim``), sends
   them (``mail.send_emails``, ``webpush.send_pushes``) and marks each at once
   (``mark_sent``, ``mark_failed``, ``mark_skipped``). Digests are sent by
   ``manage.py send_digests`` (``digests``).

A claim is one conditional UPDATE that moves ``due_at`` past now by ``DELIVERY_LEASE`` and
writes a fresh token: two workers never hold the same row, on PostgreSQL (which also skips
rows another claim has locked) and on SQLite. A worker that dies holding a claim loses it when
the lease runs out, and the rows are sent by the next; so a crash between a send and its mark
sends that one message again (the mark follows each message at once), and nothing else is ever
sent twice: the mark of a claim that was lost and taken again matches no row.

The worker (``Worker``) is a thread of each server process (``DELIVERY_WORKER``; started by the
ASGI lifespan, or by the first request under a server without one), woken after commit and
looking every ``DELIVERY_POLL_INTERVAL`` seconds; ``manage.py deliver`` runs one on its own. Any
number run at once.
"""

import logging
import secrets
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import cast

from django.contrib.auth import get_user_model
from django.db import close_old_connections, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from . import conf, metrics, preferences
from .models import (
    Audience,
    Delivery,
    DeliveryChannel,
    DeliveryJob,
    DeliverySettings,
    DeliveryStatus,
    DigestFrequency,
    Follow,
    Notification,
    Preference,
    PreferenceScope,
    PushSubscription,
)
from .outage_log import OutageLog

logger = logging.getLogger(__name__)
failures = OutageLog(logger)

CHUNK = 500  # users per query (SQLite takes at most 999 parameters)
MAX_BACKOFF = timedelta(hours=6)
SENT_NOW = (DeliveryChannel.EMAIL, DeliveryChannel.PUSH)  # what the worker sends; digests wait for send_digests


def enabled_channels() -> set[str]:
    """The external channels this site delivers on: ``DELIVERY_CHANNELS``, without ``push`` when
    no VAPID key is set."""
    channels = set(conf.settings.DELIVERY_CHANNELS or ()) & set(preferences.CHANNELS)
    if not conf.settings.VAPID_PRIVATE_KEY:
        channels.discard(DeliveryChannel.PUSH)
    return channels


# 1. The send


def job_create(rows: list[Notification]) -> bool:
    """Inside the sending transaction: store that these notifications' deliveries are to be planned
    (the caller wakes the worker after commit: ``wake``). False, and nothing stored, when every
    external channel is off, or when no default and no user's rule turns one on for these
    notifications (``preferences.may_deliver``: one indexed lookup)."""
    enabled = enabled_channels()
    if not rows or not enabled or not preferences.may_deliver(rows, enabled):
        return False
    DeliveryJob.objects.create(notification_ids=[row.id for row in rows], due_at=timezone.now())
    return True


# 2. Planning


def chunks(ids: list[int]) -> Iterable[list[int]]:
    """``ids`` ``CHUNK`` at a time (the lists of an ``IN (...)`` each)."""
    for start in range(0, len(ids), CHUNK):
        yield ids[start:start + CHUNK]


def _audience_of(notification: Notification, among: list[int] | None) -> list[int]:
    """The active users who see a topic or broadcast ``notification`` (as ``selectors`` defines it),
    among ``among`` if given. (Personal ones are planned together: ``_personal_recipients``.)"""
    query: QuerySet
    if notification.audience == Audience.TOPIC:
        query = Follow.objects.filter(
            Q(ended_at__isnull=True) | Q(ended_at__gt=notification.created_at),
            topic=notification.topic_id, created_at__lte=notification.created_at, user__is_active=True,
        )
        field = "user_id"
    else:
        query = get_user_model().objects.filter(is_active=True, date_joined__lte=notification.created_at)
        field = "pk"
    if among is None:
        return list(query.order_by(field).values_list(field, flat=True).distinct())
    found: list[int] = []
    for chunk in chunks(among):
        found += query.filter(**{f"{field}__in": chunk}).values_list(field, flat=True).distinct()
    return sorted(set(found))


def _users_with_rules(notification: Notification, channels: set[str]) -> list[int]:
    """The users with a rule that may turn one of ``channels`` on for ``notification``."""
    scope, key = preferences.audience_rule(notification)
    any_on = Q()
    for channel in channels:
        any_on |= Q(**{channel: True})
    rules = Preference.objects.filter(
        Q(scope=scope, key=key) | Q(scope=PreferenceScope.LEVEL, key=notification.level), any_on, user__isnull=False
    )
    return sorted(set(rules.values_list("user_id", flat=True)))


def recipients(notification: Notification) -> dict[int, set[str]]:
    """``{user id: channels}`` of the users who get ``notification`` on an enabled external channel
    (only users with at least one). The preferences decide (``preferences.channels_for_users``)."""
    enabled = enabled_channels()
    if not enabled:
        return {}
    fallback = preferences.default_channels(notification) & enabled
    # With no default on, only a user's own rule can turn a channel on: look only at them.
    audience = _audience_of(notification, None if fallback else _users_with_rules(notification, enabled))
    return _wanted(audience, notification, enabled)


def _wanted(user_ids: Iterable[int], notification: Notification, enabled: set[str]) -> dict[int, set[str]]:
    """The enabled channels the preferences give each of ``user_ids`` for ``notification``, for
    those with at least one (``preferences.channels_for_users``, 500 users per query)."""
    wanted: dict[int, set[str]] = {}
    for chunk in chunks(list(user_ids)):
        for user_id, channels in preferences.channels_for_users(chunk, notification).items():
            channels &= enabled
            if channels:
                wanted[user_id] = channels
    return wanted


def _personal_recipients(notifications: list[Notification]) -> dict[int, set[str]]:
    """``recipients`` for many personal notifications of one level at once (a send to many users):
    one query per 500 users instead of one round of queries per notification."""
    users = sorted({cast(int, n.recipient_id) for n in notifications})
    active = [user_id for chunk in chunks(users) for user_id in
              get_user_model().objects.filter(pk__in=chunk, is_active=True).order_by("pk").values_list("pk", flat=True)]
    return _wanted(active, notifications[0], enabled_channels())


def _rows(pairs: list[tuple[Notification, int]], wanted: dict[int, set[str]], now: datetime) -> list[Delivery]:
    """The deliveries of ``(notification, user)`` pairs on the channels ``wanted`` gives each user:
    email and push due when the user's quiet hours end (now outside them), digests now; none for
    digests turned off or for push without a browser."""
    ids = sorted({user_id for _, user_id in pairs if user_id in wanted})
    held: dict[int, datetime | None] = {}
    digest_off: set[int] = set()
    with_browser: set[int] = set()
    for chunk in chunks(ids):
        held |= preferences.held_until_for_users(chunk, now)
        digest_off |= set(DeliverySettings.objects.filter(user_id__in=chunk, digest=DigestFrequency.OFF)
                          .values_list("user_id", flat=True))
        if any(DeliveryChannel.PUSH in wanted[uid] for uid in chunk):
            with_browser |= set(PushSubscription.objects.filter(user_id__in=chunk).values_list("user_id", flat=True))
    rows = []
    for notification, user_id in pairs:
        for channel in sorted(wanted.get(user_id, ())):
            if channel == DeliveryChannel.DIGEST and user_id in digest_off:
                continue  # the user turned digests off (or unsubscribed from them)
            if channel == DeliveryChannel.PUSH and user_id not in with_browser:
                continue  # no browser to push to
            due = now if channel == DeliveryChannel.DIGEST else (held.get(user_id) or now)
            rows.append(Delivery(notification=notification, user_id=user_id, channel=channel, due_at=due))
    return rows


def deliveries_of(notifications: list[Notification], now: datetime) -> list[Delivery]:
    """The unsaved deliveries the preferences ask for, for the notifications of one job."""
    rows: list[Delivery] = []
    personal: dict[str, list[Notification]] = {}
    for notification in notifications:
        if notification.audience == Audience.USER:
            personal.setdefault(notification.level, []).append(notification)
        else:
            wanted = recipients(notification)
            rows += _rows([(notification, user_id) for user_id in sorted(wanted)], wanted, now)
    for same_level in personal.values():
        wanted = _personal_recipients(same_level)
        rows += _rows([(n, cast(int, n.recipient_id)) for n in same_level], wanted, now)
    return rows


def plan_due(limit: int | None = None) -> int:
    """Plan the deliveries of the due jobs (at most ``limit``, default ``DELIVERY_BATCH``); returns
    how many jobs were planned."""
    token, jobs = claim(DeliveryJob.objects.all(), limit or conf.settings.DELIVERY_BATCH)
    for job in jobs:
        now = timezone.now()
        notifications: list[Notification] = []
        for chunk in chunks(sorted(job.notification_ids)):
            notifications += Notification.objects.filter(id__in=chunk).select_related("topic")
        rows = deliveries_of(notifications, now)
        with transaction.atomic():
            if not DeliveryJob.objects.filter(pk=job.pk, claim=token).exists():
                continue  # our lease ran out and another worker took the job: it plans it
            Delivery.objects.bulk_create(rows, ignore_conflicts=True, batch_size=CHUNK)
            DeliveryJob.objects.filter(pk=job.pk).delete()
        for channel in DeliveryChannel.values:
            metrics.deliveries_planned(channel, sum(1 for row in rows if row.channel == channel))
    return len(jobs)


# 3. Claims and marks


def claim(rows: QuerySet, limit: int) -> tuple[str, list]:
    """Claim up to ``limit`` due rows of ``rows`` (``DeliveryJob`` or ``Delivery``) for this worker:
    ``(token, rows)``. The claim holds them for ``DELIVERY_LEASE`` seconds."""
    model = rows.model
    token = secrets.token_hex(8)
    now = timezone.now()
    due = rows.filter(due_at__lte=now)
    with transaction.atomic():
        locked = due.order_by("due_at", "pk").select_for_update(skip_locked=True)
        ids = list(locked.values_list("pk", flat=True)[:limit])
        if not ids:
            return token, []
        changes = {"claim": token, "due_at": now + timedelta(seconds=conf.settings.DELIVERY_LEASE)}
        if model is Delivery:
            changes["attempts"] = F("attempts") + 1
        # The condition again: on SQLite (no row locks) a second worker's UPDATE finds them taken.
        due.filter(pk__in=ids).update(**changes)
    claimed = model.objects.filter(pk__in=ids, claim=token)
    if model is Delivery:
        claimed = claimed.select_related("notification__topic", "notification__actor", "user")
    return token, list(claimed.order_by("pk"))


def _mark(delivery: Delivery, token: str, **changes) -> bool:
    """Change a claimed delivery; False when the claim was lost (the lease ran out and another took it)."""
    return bool(Delivery.objects.filter(pk=delivery.pk, claim=token).update(claim="", **changes))


def mark_sent(delivery: Delivery, token: str, *, error: str = "", **changes) -> bool:
    """Sent (``error``: what went wrong on the way, e.g. a push subscription that refused it)."""
    now = timezone.now()
    done = _mark(delivery, token, status=DeliveryStatus.SENT, sent_at=now, error=error[:2000], **changes)
    if done:
        metrics.delivery(delivery.channel, "sent")
    return done


def mark_skipped(delivery: Delivery, token: str, reason: str) -> bool:
    done = _mark(delivery, token, status=DeliveryStatus.SKIPPED, error=reason)
    if done:
        metrics.delivery(delivery.channel, "skipped")
    return done


def backoff(attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failed try: ``DELIVERY_RETRY_BASE * 2**(attempts - 1)``, at most 6 hours."""
    seconds = conf.settings.DELIVERY_RETRY_BASE * 2 ** max(0, min(attempts - 1, 30))
    return min(timedelta(seconds=seconds), MAX_BACKOFF)


def mark_failed(delivery: Delivery, token: str, reason: str, *, permanent: bool = False,
                retry_after: float | None = None, **changes) -> bool:
    """A failed try: retried after ``backoff`` (or ``retry_after`` seconds, if longer), or given up
    when ``permanent`` or after ``DELIVERY_MAX_ATTEMPTS`` tries. ``reason`` is kept either way."""
    reason = reason[:2000]
    if permanent or delivery.attempts >= conf.settings.DELIVERY_MAX_ATTEMPTS:
        done = _mark(delivery, token, status=DeliveryStatus.FAILED, error=reason, **changes)
        outcome = "failed"
    else:
        wait = backoff(delivery.attempts)
        if retry_after:
            wait = max(wait, timedelta(seconds=min(retry_after, MAX_BACKOFF.total_seconds())))
        done = _mark(delivery, token, due_at=timezone.now() + wait, error=reason, **changes)
        outcome = "retried"
    if done:
        metrics.delivery(delivery.channel, outcome)
        logger.warning("delivery %s of notification %s to user %s %s: %s", delivery.channel,
                       delivery.notification_id, delivery.user_id, outcome, reason)
    return done


def fail_all(rows: list[Delivery], token: str, reason: str) -> None:
    """A failed try of every claimed row (the channel cannot send at all now): each retried later."""
    for row in rows:
        mark_failed(row, token, reason)


# The senders, by channel: each takes the claimed rows and their token, and marks every row.
Sender = Callable[[list[Delivery], str], None]


def _senders() -> dict[str, Sender]:
    from . import mail, webpush

    return {DeliveryChannel.EMAIL: mail.send_emails, DeliveryChannel.PUSH: webpush.send_pushes}


def send_due(channel: str, limit: int | None = None) -> int:
    """Send up to ``limit`` due deliveries of ``channel`` (``email`` or ``push``); returns how many
    were claimed."""
    pending = Delivery.objects.filter(channel=channel, status=DeliveryStatus.PENDING)
    token, rows = claim(pending, limit or conf.settings.DELIVERY_BATCH)
    if rows:
        _senders()[channel](rows, token)
    return len(rows)


def run_once() -> int:
    """One round of the worker: plan due jobs, then send due emails and pushes; how much it did."""
    done = plan_due()
    for channel in SENT_NOW:
        done += send_due(channel)
    return done


def run_until_idle(max_rounds: int = 1000) -> int:
    """Rounds until nothing is due (tests, ``manage.py deliver --once``); how much was done."""
    total = 0
    for _ in range(max_rounds):
        done = run_once()
        total += done
        if not done:
            break
    return total


# The worker


class Worker(threading.Thread):
    """Runs ``run_once`` until nothing is due, then waits to be woken or for the poll interval."""

    def __init__(self, poll_interval: float | None = None):
        super().__init__(name="notifications-delivery", daemon=True)
        self.poll_interval = poll_interval
        self.woken = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                done = run_once()
            except Exception as exc:  # the database is away, say: tried again after the poll interval
                failures.failure("delivery worker round failed", exc)
                done = 0
            else:
                failures.recovered("delivery worker round failed")
            finally:
                close_old_connections()
            if not done:
                self.woken.wait(self.poll_interval or conf.settings.DELIVERY_POLL_INTERVAL)
                self.woken.clear()
        from django.db import connection

        connection.close()

    def stop(self, timeout: float | None = 10.0) -> None:
        self.stopping.set()
        self.woken.set()
        self.join(timeout)


_worker: Worker | None = None
_worker_lock = threading.Lock()


def worker_enabled() -> bool:
    return bool(conf.settings.DELIVERY_WORKER)


def start_worker() -> Worker | None:
    """Start this process's worker thread once (``DELIVERY_WORKER``); None when it is off."""
    global _worker
    if not worker_enabled():
        return None
    with _worker_lock:
        if _worker is None or not _worker.is_alive():
            _worker = Worker()
            _worker.start()
        return _worker


def stop_worker() -> None:
    global _worker
    with _worker_lock:
        worker, _worker = _worker, None
    if worker is not None:
        worker.stop()


def wake() -> None:
    """After a commit that stored work: wake this process's worker, if it runs one (a server
    process does; a script's send waits for a server's next look, or for ``manage.py deliver``)."""
    worker = _worker
    if worker is not None:
        worker.woken.set()
