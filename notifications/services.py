"""Every write of notification state. Each function validates, writes in a transaction,
and schedules its push with ``transaction.on_commit`` (through ``push``, the one choke point).
"""

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import time, timedelta
from functools import partial
from typing import Any, Literal, cast

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import URLValidator
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import conf, delivery, preferences, protocol, push, selectors, streams, webpush
from .auth import ALL_SESSIONS, session_digest
from .models import (
    Audience,
    Delivery,
    DeliverySettings,
    DeliveryStatus,
    DigestFrequency,
    Follow,
    IdempotencyKey,
    InboxState,
    Level,
    Notification,
    Preference,
    PreferenceScope,
    PushSubscription,
    Receipt,
    Topic,
    time_zone_names,
)

TITLE_MAX = 200
BODY_MAX = 10_000
DATA_MAX_BYTES = 16 * 1024
DATA_MAX_DEPTH = 10
USERS_MAX = 10_000
LEVELS = frozenset(Level.values)


def _depth(value: Any, level: int = 1) -> int:
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def _validate_data(data: Any) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationError({"data": "data must be a JSON object."})
    try:
        encoded = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError({"data": f"data must contain only JSON values ({exc})."}) from None
    if len(encoded.encode()) > DATA_MAX_BYTES:
        raise ValidationError({"data": f"data must encode to at most {DATA_MAX_BYTES} bytes of JSON."})
    if _depth(data) > DATA_MAX_DEPTH:
        raise ValidationError({"data": f"data must nest at most {DATA_MAX_DEPTH} levels deep."})
    if not all(protocol.is_storable_text(text) for text in _strings(data)):
        raise ValidationError({"data": UNSTORABLE})
    return data


# NUL cannot be stored by PostgreSQL, and a lone surrogate cannot be encoded as UTF-8.
UNSTORABLE = "Text may not contain NUL characters or unpaired surrogates."


def _strings(value: Any):
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


_OFF_SITE_TRAPS = re.compile(r"[\\\x00-\x20\x7f]")


def _validate_link(link: str | None) -> str:
    if not link:
        return ""
    if not isinstance(link, str) or len(link) > 2000:
        raise ValidationError({"link": "link must be a string of at most 2000 characters."})
    if _OFF_SITE_TRAPS.search(link):
        # Browsers drop tabs and newlines from URLs and read a backslash as a slash: a path
        # "/<backslash>evil.example" or "/<tab>/evil.example" is an off-site link.
        raise ValidationError({"link": "link may not contain backslashes, spaces or control characters."})
    if link.startswith("/") and not link.startswith("//"):
        return link
    try:
        URLValidator(schemes=["http", "https"])(link)
    except ValidationError:
        raise ValidationError({"link": "link must be an http(s) URL or a path starting with '/'."}) from None
    return link


def _user_ids(users: Iterable) -> list[int]:
    """The ids of users given as User instances or primary keys (checked to exist and be active
    when their streams are reserved: ``streams.reserve_users``)."""
    User = get_user_model()
    given = list(users)
    if not given or len(given) > USERS_MAX:
        raise ValidationError({"users": f"users must list 1 to {USERS_MAX} users."})
    ids = [u.pk if isinstance(u, User) else u for u in given]
    if any(not isinstance(pk, int) or isinstance(pk, bool) or not 0 < pk < 2**63 for pk in ids):
        raise ValidationError({"users": "users must be User instances or positive integer ids."})
    return list(dict.fromkeys(ids))


def _resolve_topic(topic: Topic | str) -> Topic:
    if isinstance(topic, Topic):
        return topic
    try:
        return Topic.objects.get(slug=topic)
    except Topic.DoesNotExist:
        raise ValidationError({"topic": f"Unknown topic {topic!r}."}) from None


def notification_send(
    *,
    title: str,
    body: str = "",
    level: str = Level.INFO,
    data: dict | None = None,
    link: str | None = None,
    actor=None,
    users: Iterable | None = None,
    topic: Topic | str | None = None,
    broadcast: bool = False,
    idempotency_key: str | None = None,
) -> "Sent":
    """Store a notification for exactly one audience and push it after commit.

    ``users`` stores one row per user; ``topic`` and ``broadcast`` store one row in all.
    Returns the stored rows. With ``idempotency_key``, a retry of the same request (same
    sender, key and content) within ``IDEMPOTENCY_TTL`` returns the first send's rows
    (``.replayed`` is True) and sends nothing; the same key with different content raises
    ``IdempotencyConflict``.
    """
    rows = _notification_rows(title=title, body=body, level=level, data=data, link=link, actor=actor,
                              users=users, topic=topic, broadcast=broadcast)
    return _send_rows(rows, actor=actor, idempotency_key=idempotency_key)


def _notification_rows(
    *,
    title: str,
    body: str = "",
    level: str = Level.INFO,
    data: dict | None = None,
    link: str | None = None,
    actor=None,
    users: Iterable | None = None,
    topic: Topic | str | None = None,
    broadcast: bool = False,
) -> list[Notification]:
    """The unsaved rows of one send, validated (``ValidationError`` names the field otherwise):
    one per user, or one for the topic or broadcast; no offsets yet. The one validation of
    ``notification_send`` and of every item of ``notification_send_batch``."""
    audiences = [users is not None, topic is not None, bool(broadcast)]
    if sum(audiences) != 1:
        raise ValidationError("Give exactly one audience: users, topic, or broadcast=True.")
    errors = {}
    if not isinstance(title, str) or not title.strip() or len(title) > TITLE_MAX:
        errors["title"] = f"title is required, at most {TITLE_MAX} characters."
    if not isinstance(body, str) or len(body) > BODY_MAX:
        errors["body"] = f"body must be a string of at most {BODY_MAX} characters."
    if not isinstance(level, str) or level not in LEVELS:
        errors["level"] = f"level must be one of {', '.join(Level.values)}."
    for name, text in (("title", title), ("body", body), ("link", link)):
        if isinstance(text, str) and not protocol.is_storable_text(text) and name not in errors:
            errors[name] = UNSTORABLE
    if errors:
        raise ValidationError(errors)
    fields = {
        "title": title,
        "body": body,
        "level": level,
        "data": _validate_data(data),
        "link": _validate_link(link),
        "actor": actor,
    }
    if users is not None:
        return [Notification(audience=Audience.USER, recipient_id=pk, **fields) for pk in _user_ids(users)]
    if topic is not None:
        return [Notification(audience=Audience.TOPIC, topic=_resolve_topic(topic), **fields)]
    return [Notification(audience=Audience.BROADCAST, **fields)]


def _send_rows(rows: list[Notification], *, actor, idempotency_key: str | None) -> "Sent":
    """Store the rows of one send (``_notification_rows``) in a transaction (a savepoint inside
    the caller's), and push them after commit; or replay the send claimed by ``idempotency_key``."""
    with transaction.atomic():
        claim = _claim_idempotency_key(idempotency_key, actor, rows) if idempotency_key is not None else None
        if claim is not None and claim.notification_ids:
            return Sent(Notification.objects.filter(id__in=claim.notification_ids).select_related(
                "topic", "actor", "recipient").order_by("id"), replayed=True)
        _reserve_offsets(rows)  # locks these streams only
        Notification.objects.bulk_create(rows)
        if claim is not None:
            claim.notification_ids = [row.id for row in rows]
            claim.save(update_fields=["notification_ids"])
        planned = delivery.job_create(rows)  # email and push, planned by the worker after commit
        transaction.on_commit(lambda: _after_commit(rows, planned))
    return Sent(rows)


def _after_commit(rows: list[Notification], planned: bool) -> None:
    """A send committed: push its notifications, and wake the delivery worker if it has work."""
    push.notifications_created(rows)
    if planned:
        delivery.wake()


def _reserve_offsets(rows: list[Notification]) -> None:
    """Give each row the next offset of its stream; for personal rows, in the statement that
    checks the recipients exist and are active (an error rolls the send back)."""
    if rows[0].audience == Audience.USER:
        user_ids = cast(list[int], [row.recipient_id for row in rows])  # set on every personal row
        offsets = streams.reserve_users(user_ids)
        missing = sorted(set(user_ids) - set(offsets))
        if missing:
            raise ValidationError({"users": f"Unknown or inactive user ids: {missing[:20]}"})
        for row, user_id in zip(rows, user_ids, strict=True):
            row.offset = offsets[user_id]
        return
    key = streams.stream_of(rows[0])
    rows[0].offset = streams.reserve([key])[key]


class Sent(list):
    """The notifications a send stored (or, for an idempotent retry, had stored before)."""

    def __init__(self, rows, *, replayed: bool = False):
        super().__init__(rows)
        self.replayed = replayed


class IdempotencyConflict(Exception):
    """The idempotency key was already used for a different request."""


def _request_hash(actor, rows: list[Notification]) -> str:
    first = rows[0]
    request = {
        "title": first.title, "body": first.body, "level": first.level, "data": first.data, "link": first.link,
        "actor": actor.pk if actor else None, "audience": first.audience,
        "recipients": sorted(row.recipient_id or 0 for row in rows) if first.audience == Audience.USER else None,
        "topic": first.topic.slug if first.topic else None,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def _claim_idempotency_key(key: str, actor, rows: list[Notification]) -> IdempotencyKey:
    """Insert the key (the unique constraint makes concurrent duplicates wait, then see it),
    or return the earlier claim of the same request."""
    if not isinstance(key, str) or not 1 <= len(key) <= 200:
        raise ValidationError({"idempotency_key": "An idempotency key is 1 to 200 characters."})
    scope = f"user:{actor.pk}" if actor else ""
    request_hash = _request_hash(actor, rows)
    now = timezone.now()
    IdempotencyKey.objects.filter(scope=scope, key=key, expires_at__lte=now).delete()
    try:
        with transaction.atomic():
            return IdempotencyKey.objects.create(
                scope=scope, key=key, request_hash=request_hash,
                expires_at=now + timedelta(seconds=conf.settings.IDEMPOTENCY_TTL),
            )
    except IntegrityError:
        earlier = IdempotencyKey.objects.get(scope=scope, key=key)
    if earlier.request_hash != request_hash:
        raise IdempotencyConflict(
            f"The idempotency key {key!r} was already used for a different request; use a new key."
        )
    return earlier


BATCH_MAX = 1000
# An item of ``notification_send_batch``: ``notification_send``'s keyword arguments but ``actor``.
BATCH_FIELDS = frozenset(
    {"title", "body", "level", "data", "link", "users", "topic", "broadcast", "idempotency_key"}
)


@dataclass
class ItemResult:
    """The outcome of one item of a batch: ``stored`` now, ``replayed`` (an earlier send with the
    same idempotency key and content: its rows, nothing sent again), ``invalid`` (``error`` is the
    ``ValidationError``) or ``conflict`` (the key was used for a different request: ``error`` is
    the ``IdempotencyConflict``)."""

    outcome: Literal["stored", "replayed", "invalid", "conflict"]
    notifications: list[Notification] = field(default_factory=list)
    error: ValidationError | IdempotencyConflict | None = None


def notification_send_batch(items: Sequence[Mapping[str, Any]], *, actor=None) -> list[ItemResult]:
    """Many sends at once, one ``ItemResult`` per item, in item order; a bad item never stops
    the others.

    Each item holds ``notification_send``'s keyword arguments (``title``, ``body``, ``level``,
    ``data``, ``link``, one of ``users``/``topic``/``broadcast``, optionally ``idempotency_key``),
    validated as it validates them; ``actor`` sends them all. The whole batch is one transaction
    (a savepoint inside the caller's), pushed after commit:

    - the items without an idempotency key: their users checked in one query, the offsets of all
      their streams reserved in one upsert (``streams.reserve_counts``, consecutive per stream in
      item order), their rows inserted in one ``bulk_create`` and pushed by one ``on_commit``;
    - the items with a key, one by one in key order, each through ``notification_send``'s own
      path in its own savepoint, so a retried batch stores nothing twice.

    Its first write locks every stream the batch may send to, in key order (as ``reserve`` does
    for one send), and the keys are claimed in key order after it, so two batches cannot deadlock.
    (A single send with a key claims the key first: when it races a batch that has the same key
    and stream, PostgreSQL may abort one of the two with a deadlock error, a 503 to retry.) A
    database error propagates and rolls the whole batch back: nothing is stored, and a retry is
    safe.
    """
    if not 1 <= len(items) <= BATCH_MAX:
        raise ValidationError({"items": f"items must list 1 to {BATCH_MAX} notifications."})
    results: list[ItemResult | None] = [None] * len(items)
    planned: list[tuple[int, list[Notification], str | None]] = []
    slugs = {item["topic"] for item in items if isinstance(item, Mapping) and isinstance(item.get("topic"), str)}
    topics = {t.slug: t for t in Topic.objects.filter(slug__in=slugs)} if slugs else {}
    for index, item in enumerate(items):
        try:
            kwargs = _batch_item(item)
            key = kwargs.pop("idempotency_key", None)
            if isinstance(kwargs.get("topic"), str):
                kwargs["topic"] = topics.get(kwargs["topic"], kwargs["topic"])  # unknown: _resolve_topic says so
            planned.append((index, _notification_rows(actor=actor, **kwargs), key))
        except ValidationError as exc:
            results[index] = ItemResult("invalid", error=exc)
    active = _active_user_ids({row.recipient_id for _, rows, _ in planned for row in rows if row.recipient_id})
    plain: list[tuple[int, list[Notification]]] = []
    keyed: list[tuple[int, list[Notification], str]] = []
    counts: dict[str, int] = {}
    for index, rows, key in planned:
        missing = sorted({row.recipient_id for row in rows if row.recipient_id} - active)
        if key is not None:
            keyed.append((index, rows, key))
            for row in rows:  # locked below, at count 0; unknown users are notification_send's to refuse
                if row.recipient_id is None or row.recipient_id in active:
                    counts.setdefault(streams.stream_of(row), 0)
        elif missing:
            error = ValidationError({"users": f"Unknown or inactive user ids: {missing[:20]}"})
            results[index] = ItemResult("invalid", error=error)
        else:
            plain.append((index, rows))
            for row in rows:
                key_of_row = streams.stream_of(row)
                counts[key_of_row] = counts.get(key_of_row, 0) + 1
    with transaction.atomic():
        if counts:
            heads = streams.reserve_counts(counts)
            next_offset = {stream: heads[stream] - n + 1 for stream, n in counts.items()}
            stored = [row for _, rows in plain for row in rows]
            for row in stored:
                stream = streams.stream_of(row)
                row.offset = next_offset[stream]
                next_offset[stream] += 1
            if stored:
                Notification.objects.bulk_create(stored)
                has_job = delivery.job_create(stored)
                transaction.on_commit(lambda: _after_commit(stored, has_job))
            for index, rows in plain:
                results[index] = ItemResult("stored", rows)
        # Key order: two batches with the same keys claim them in the same order.
        for index, rows, key in sorted(keyed, key=lambda planned_item: planned_item[2]):
            try:
                sent = _send_rows(rows, actor=actor, idempotency_key=key)
            except ValidationError as exc:
                results[index] = ItemResult("invalid", error=exc)
            except IdempotencyConflict as exc:
                results[index] = ItemResult("conflict", error=exc)
            else:
                results[index] = ItemResult("replayed" if sent.replayed else "stored", list(sent))
    return cast(list[ItemResult], results)


def _batch_item(item: Any) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ValidationError("An item must be a mapping of notification_send's arguments.")
    unknown = sorted(set(item) - BATCH_FIELDS, key=str)
    if unknown:
        raise ValidationError({str(name): "Unknown field." for name in unknown})
    if "title" not in item:
        raise ValidationError({"title": f"title is required, at most {TITLE_MAX} characters."})
    return dict(item)


def _active_user_ids(user_ids: set[int]) -> set[int]:
    """Which of these users exist and are active: one query (per ``streams.CHUNK`` ids)."""
    ordered = sorted(user_ids)
    active: set[int] = set()
    users = get_user_model().objects.filter(is_active=True)
    for start in range(0, len(ordered), streams.CHUNK):
        active.update(users.filter(pk__in=ordered[start : start + streams.CHUNK]).values_list("pk", flat=True))
    return active


def _push_inbox_change_on_commit(user, change: dict) -> int:
    """After commit, tell every connection of the user what changed and the new unread count."""
    count = selectors.unread_count_for(user)
    transaction.on_commit(lambda: push.inbox_changed(user.pk, change, count))
    return count


def _require_visible(user, ids: Iterable[int]) -> list[int]:
    ids = list(dict.fromkeys(ids))
    visible = selectors.visible_ids(user, ids)
    missing = [i for i in ids if i not in visible]
    if missing:
        raise Notification.DoesNotExist(f"No notification with id(s) {missing} in your inbox.")
    return ids


def _upsert_receipts(user, ids: list[int], **stamp) -> None:
    Receipt.objects.bulk_create(
        [Receipt(user=user, notification_id=i, **stamp) for i in ids],
        update_conflicts=True,
        unique_fields=["user", "notification"],
        update_fields=list(stamp),
    )


def notification_mark_read(*, user, ids: Iterable[int]) -> int:
    """Mark the user's notifications read; raise ``Notification.DoesNotExist`` if any id is not theirs.

    Returns the new unread count, which is also pushed to every connection of the user.
    """
    with transaction.atomic():
        ids = _require_visible(user, ids)
        _upsert_receipts(user, ids, read_at=timezone.now())
        return _push_inbox_change_on_commit(user, {"type": "read", "ids": ids})


def notification_mark_all_read(*, user) -> int:
    """Mark everything the user can see read (moves the user's read watermark)."""
    with transaction.atomic():
        latest = selectors.latest_visible_id(user)
        state, _ = InboxState.objects.select_for_update().get_or_create(user=user)
        if latest > state.read_watermark:
            state.read_watermark = latest
            state.save(update_fields=["read_watermark"])
        return _push_inbox_change_on_commit(user, {"type": "read", "all": True})


def notification_dismiss(*, user, notification_id: int) -> int:
    """Remove a notification from the user's inbox (it counts as read). Returns the unread count."""
    with transaction.atomic():
        ids = _require_visible(user, [notification_id])
        now = timezone.now()
        _upsert_receipts(user, ids, read_at=now, dismissed_at=now)
        return _push_inbox_change_on_commit(user, {"type": "dismissed", "ids": ids})


class TooManyTopics(Exception):
    """The user already follows as many topics as ``WS_MAX_TOPICS`` allows."""


# Follow periods kept per user and topic: the oldest ended ones beyond this are deleted (their
# topic notifications leave the user's inbox), so following and unfollowing in a loop cannot
# grow the table without bound.
FOLLOW_PERIODS_MAX = 20


def topic_follow(*, user, topic: Topic) -> bool:
    """Follow a topic (persisted); every open connection of the user joins its group.

    Raises ``PermissionDenied`` for a private topic the user is not a member of, and
    ``TooManyTopics`` past ``WS_MAX_TOPICS`` followed topics (the one limit for every way of
    following: WebSocket, REST, code). Returns whether a new follow was created.

    Following again soon after unfollowing reopens the last period when no notification of the
    topic was sent in between (nothing in the inbox changes); otherwise a new period starts,
    and at most ``FOLLOW_PERIODS_MAX`` periods are kept per user and topic.
    """
    if not selectors.topic_readable_by(topic, user):
        raise PermissionDenied(f"Topic {topic.slug!r} is private; only its members may follow it.")
    limit = conf.settings.WS_MAX_TOPICS
    with transaction.atomic():
        # One user's follows are decided one at a time (two concurrent follows cannot both pass the limit).
        get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True).get()
        follows = selectors.active_follows().filter(user=user)
        if follows.filter(topic=topic).exists():
            return False
        if follows.count() >= limit:
            raise TooManyTopics(f"At most {limit} followed topics per user; unfollow one first.")
        periods = Follow.objects.filter(user=user, topic=topic)
        last = periods.order_by("-ended_at").first()
        if last is not None and not Notification.objects.filter(topic=topic, created_at__gte=last.ended_at).exists():
            periods.filter(pk=last.pk).update(ended_at=None)
        else:
            Follow.objects.create(user=user, topic=topic)
            stale = periods.exclude(ended_at__isnull=True).order_by("-ended_at")[FOLLOW_PERIODS_MAX - 1:]
            Follow.objects.filter(pk__in=list(stale.values_list("pk", flat=True))).delete()
        transaction.on_commit(lambda: push.topic_followed(user.pk, topic.pk, topic.slug))
    return True


def topic_unfollow(*, user, topic: Topic) -> bool:
    """Stop following a topic; every open connection of the user leaves its group."""
    with transaction.atomic():
        ended = selectors.active_follows().filter(user=user, topic=topic).update(ended_at=timezone.now())
        transaction.on_commit(lambda: push.topic_unfollowed(user.pk, topic.pk, topic.slug))
    return bool(ended)


def topic_renamed(*, topic: Topic, old_slug: str) -> None:
    """A topic's slug changed: open connections that follow it (routed by its id) keep it under
    the new slug, once committed. A new topic that takes the old slug is another topic. Delivery
    preferences of the topic (keyed by slug) follow it to the new one."""
    topic_rules = Preference.objects.filter(scope=PreferenceScope.TOPIC)
    topic_rules.filter(key=topic.slug).delete()  # (left by a deleted topic of that slug: not this one's)
    topic_rules.filter(key=old_slug).update(key=topic.slug)
    transaction.on_commit(lambda: push.topic_changed(topic.pk, "renamed", topic.slug, old_slug))


def topic_deleted(*, topic_id: int, slug: str) -> None:
    """A topic was deleted: take it off every open connection, on every server process, once
    committed; its delivery preferences go with it (a new topic of that slug starts without them)."""
    Preference.objects.filter(scope=PreferenceScope.TOPIC, key=slug).delete()
    transaction.on_commit(lambda: push.topic_changed(topic_id, "deleted", slug))


def notification_resend(*, notification: Notification, actor=None) -> list[Notification]:
    """Send a copy of a stored notification to the same audience (a new notification, pushed again)."""
    audiences: dict[str, dict[str, Any]] = {
        Audience.USER: {"users": [notification.recipient_id]},
        Audience.TOPIC: {"topic": notification.topic},
        Audience.BROADCAST: {"broadcast": True},
    }
    audience = audiences[notification.audience]
    return notification_send(
        title=notification.title,
        body=notification.body,
        level=notification.level,
        data=notification.data,
        link=notification.link,
        actor=actor or notification.actor,
        **audience,
    )


def users_disconnect(*, user_ids: Iterable[int], reason: str = "disconnected by an administrator") -> None:
    """Close every live connection of these users on every server process (close code 4003)."""
    push.connections_close(list(user_ids), code=protocol.CLOSE_FORBIDDEN, reason=reason)


def topic_members_changed(*, topic: Topic) -> list[int]:
    """After a private topic lost members (or became private): end the follows of users who may
    no longer read it, and take the topic off their live connections on every server process.

    Returns the ids of the users removed.
    """
    if not topic.private:
        return []
    follows = selectors.active_follows().filter(topic=topic).exclude(user__in=topic.members.all())
    with transaction.atomic():
        removed = list(follows.values_list("user_id", flat=True))
        follows.update(ended_at=timezone.now())
        for user_id in removed:
            transaction.on_commit(partial(push.topic_unfollowed, user_id, topic.pk, topic.slug))
    return removed


def user_sessions_changed(*, user_id: int, reason: str, session_key: str | None = None) -> None:
    """Close, once committed, the user's session-authenticated connections on every server process:
    all of them (a password change ends the user's other sessions), or only those of
    ``session_key`` (a logout). Each gets ``session_changed`` and close 4010; a client that
    reconnects with a session that is still valid is served again, any other is refused (4001).
    Token and ticket connections stay (tokens follow revocation)."""
    session = session_digest(session_key) if session_key else ALL_SESSIONS
    transaction.on_commit(lambda: push.connections_close(
        [user_id], code=protocol.CLOSE_REAUTHENTICATE, reason=reason, session=session,
        error=protocol.SESSION_CHANGED,
    ))


def user_deactivated(*, user) -> None:
    """A user was deactivated: close their live connections (4003) once that is committed.
    (New connections are refused already: inactive users do not authenticate.)"""
    transaction.on_commit(
        lambda: push.connections_close([user.pk], code=protocol.CLOSE_FORBIDDEN, reason="user deactivated")
    )


# Delivery preferences (docs/delivery.md, "Preferences"; the rule itself: notifications.preferences)

RULES_MAX = 500
RULE_FIELDS = frozenset({"scope", "key", *preferences.CHANNELS})
SETTINGS_FIELDS = frozenset({"timezone", "quiet_start", "quiet_end", "digest", "push_only_offline"})
_CLOCK = re.compile(r"([01]\d|2[0-3]):[0-5]\d")


def _rule_errors(index: int, rule: Any, user, seen: set[tuple[str, str]], topics: dict[str, Topic]) -> dict[str, str]:
    where = f"rules.{index}"
    if not isinstance(rule, Mapping):
        return {where: "A rule must be an object."}
    errors = {f"{where}.{name}": "Unknown field." for name in rule if name not in RULE_FIELDS}
    scope, key = rule.get("scope"), rule.get("key", "")
    if scope not in PreferenceScope.values:
        errors[f"{where}.scope"] = f"scope must be one of {', '.join(PreferenceScope.values)}."
    elif not isinstance(key, str):
        errors[f"{where}.key"] = "key must be a string."
    elif scope in (PreferenceScope.OWN, PreferenceScope.BROADCAST) and key:
        errors[f"{where}.key"] = f"A rule of scope {scope!r} has no key (leave it empty)."
    elif scope == PreferenceScope.LEVEL and key not in LEVELS:
        errors[f"{where}.key"] = f"Unknown level {key!r}: one of {', '.join(Level.values)}."
    elif scope == PreferenceScope.TOPIC and (key not in topics or not selectors.topic_readable_by(topics[key], user)):
        errors[f"{where}.key"] = f"Unknown topic {key!r}."  # a private topic is not told apart from a missing one
    elif (scope, key) in seen:
        errors[f"{where}.key"] = f"A second rule for {scope} {key}".rstrip() + ": give one rule each."
    else:
        seen.add((scope, key))
    for channel in preferences.CHANNELS:
        if not isinstance(rule.get(channel, False), bool):
            errors[f"{where}.{channel}"] = f"{channel} must be true or false."
    return errors


def _clock(value: Any) -> time | None:
    if isinstance(value, time) and value.tzinfo is None:
        return value.replace(second=0, microsecond=0)
    if isinstance(value, str) and _CLOCK.fullmatch(value):
        return time.fromisoformat(value)
    return None


def _settings_values(values: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The delivery settings to store (missing keys at their defaults), and the errors."""
    if not isinstance(values, Mapping):
        return {}, {"settings": "settings must be an object."}
    errors = {f"settings.{name}": "Unknown field." for name in values if name not in SETTINGS_FIELDS}
    zone = values.get("timezone", "UTC")
    if not isinstance(zone, str) or zone not in time_zone_names():
        errors["settings.timezone"] = f"Unknown time zone {zone!r}: give an IANA name such as 'Europe/Paris'."
    digest = values.get("digest", DigestFrequency.DAILY)
    if digest not in DigestFrequency.values:
        errors["settings.digest"] = f"digest must be one of {', '.join(DigestFrequency.values)}."
    offline = values.get("push_only_offline", True)
    if not isinstance(offline, bool):
        errors["settings.push_only_offline"] = "push_only_offline must be true or false."
    clocks: dict[str, time | None] = {}
    for name in ("quiet_start", "quiet_end"):
        raw = values.get(name)
        clocks[name] = None if raw is None else _clock(raw)
        if raw is not None and clocks[name] is None:
            errors[f"settings.{name}"] = f"{name} must be a time of day, 'HH:MM' (24 hours)."
    start, end = values.get("quiet_start"), values.get("quiet_end")
    if (start is None) != (end is None):
        missing = "quiet_end" if end is None else "quiet_start"
        errors.setdefault(f"settings.{missing}", "Give quiet_start and quiet_end together (or neither).")
    elif start is not None and clocks["quiet_start"] is not None and clocks["quiet_start"] == clocks["quiet_end"]:
        errors.setdefault("settings.quiet_end", "quiet_end must differ from quiet_start.")
    return {"timezone": zone, "digest": digest, "push_only_offline": offline, **clocks}, errors


def preferences_set(*, user, rules: Sequence[Mapping[str, Any]], settings: Mapping[str, Any] | None = None) -> None:
    """Replace the user's rules, and (unless ``settings`` is None) their delivery settings.

    All or nothing: any invalid rule or setting raises ``ValidationError`` naming each bad field
    (``rules.<index>.<field>``, ``settings.<field>``) and stores nothing. A rule is
    ``{"scope", "key"?, "email"?, "digest"?, "push"?}`` (missing channels are off); settings are
    ``{"timezone"?, "quiet_start"?, "quiet_end"?, "digest"?, "push_only_offline"?}`` (missing keys at their defaults).
    """
    if not isinstance(rules, Sequence) or isinstance(rules, str | bytes) or len(rules) > RULES_MAX:
        raise ValidationError({"rules": f"rules must list at most {RULES_MAX} rules."})
    slugs = {r["key"] for r in rules
             if isinstance(r, Mapping) and r.get("scope") == PreferenceScope.TOPIC and isinstance(r.get("key"), str)}
    topics = {t.slug: t for t in Topic.objects.filter(slug__in=slugs)}
    errors: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for index, rule in enumerate(rules):
        errors.update(_rule_errors(index, rule, user, seen, topics))
    stored_settings: dict[str, Any] = {}
    if settings is not None:
        stored_settings, settings_errors = _settings_values(settings)
        errors.update(settings_errors)
    if errors:
        raise ValidationError(errors)
    rows = [
        Preference(user=user, scope=rule["scope"], key=rule.get("key", ""),
                   **{channel: rule.get(channel, False) for channel in preferences.CHANNELS})
        for rule in rules
    ]
    with transaction.atomic():
        # One user's preferences are replaced one request at a time.
        get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True).get()
        Preference.objects.filter(user=user).delete()
        Preference.objects.bulk_create(rows)
        if settings is not None:
            DeliverySettings.objects.update_or_create(user=user, defaults=stored_settings)


def topic_default_set(*, topic: Topic, email: bool, digest: bool, push: bool) -> Preference:
    """Set the staff default of a topic: the channels of its followers who have no rule of their own for it."""
    if not all(isinstance(value, bool) for value in (email, digest, push)):
        raise ValidationError("email, digest and push must be true or false.")
    channels = {"email": email, "digest": digest, "push": push}
    with transaction.atomic():
        Topic.objects.select_for_update().filter(pk=topic.pk).values_list("pk", flat=True).get()
        rule, _ = Preference.objects.update_or_create(
            user=None, scope=PreferenceScope.TOPIC, key=topic.slug, defaults=channels
        )
    return rule


def email_unsubscribe(*, user, channel: str, scope: str = "", key: str = "", level: str = "") -> None:
    """Turn one kind of email off (the one-click unsubscribe, ``mail``): ``digest`` turns digests
    off; ``email`` turns off the email of the audience's rule (``scope``, ``key``; written as the
    user's own rule, the other channels as they were) and of the ``level`` rule, so no later
    notification of that audience or level is emailed. Idempotent."""
    with transaction.atomic():
        get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True).get()
        if channel == "digest":
            DeliverySettings.objects.update_or_create(user=user, defaults={"digest": DigestFrequency.OFF})
            return
        rule = Preference.objects.filter(user=user, scope=scope, key=key).first()
        # (A topic that is gone, or renamed, took its rules with it: nothing to write for it.)
        topic_gone = scope == PreferenceScope.TOPIC and not Topic.objects.filter(slug=key).exists()
        if rule is None and not topic_gone:
            on = preferences.audience_default_channels(scope, key)
            rule = Preference(user=user, scope=scope, key=key,
                              **{name: name in on for name in preferences.CHANNELS})
        if rule is not None:
            rule.email = False
            rule.save()
        Preference.objects.filter(user=user, scope=PreferenceScope.LEVEL, key=level).update(email=False)


def deliveries_retry(*, ids: Iterable[int]) -> int:
    """Put failed or skipped deliveries back to be sent now (the admin's "Send again"); returns how many."""
    again = Delivery.objects.filter(pk__in=list(ids), status__in=[DeliveryStatus.FAILED, DeliveryStatus.SKIPPED])
    count = again.update(status=DeliveryStatus.PENDING, due_at=timezone.now(), attempts=0, claim="")
    if count:
        transaction.on_commit(delivery.wake)
    return count


# Web Push subscriptions (docs/delivery.md)

PUSH_ENDPOINT_MAX = 2000
USER_AGENT_MAX = 300
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def _base64url_bytes(value: Any, name: str, errors: dict[str, str]) -> bytes | None:
    """The bytes of a base64url string (padded or not); None, with ``errors[name]`` set, otherwise."""
    if isinstance(value, str) and _BASE64URL.fullmatch(value):
        text = value.rstrip("=")
        try:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            pass
    errors[name] = f"{name} must be a base64url string."
    return None


def _push_subscription_values(subscription: Any) -> dict[str, str]:
    """The stored fields of a browser's ``PushSubscription.toJSON()``; ``ValidationError`` naming
    each bad field (``endpoint``, ``keys``, ``keys.p256dh``, ``keys.auth``)."""
    if not isinstance(subscription, Mapping):
        raise ValidationError("The subscription must be a JSON object.")
    errors: dict[str, str] = {}
    endpoint = subscription.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        errors["endpoint"] = "endpoint must be the push service's https:// URL."
    elif len(endpoint) > PUSH_ENDPOINT_MAX:
        errors["endpoint"] = f"endpoint must be at most {PUSH_ENDPOINT_MAX} characters."
    else:
        try:
            URLValidator(schemes=["https"])(endpoint)
        except ValidationError:
            errors["endpoint"] = "endpoint must be an https:// URL with a host."
    keys = subscription.get("keys")
    p256dh = auth = None
    if not isinstance(keys, Mapping):
        errors["keys"] = 'keys must be an object: {"p256dh": ..., "auth": ...}.'
    else:
        raw = _base64url_bytes(keys.get("p256dh"), "keys.p256dh", errors)
        if raw is not None:
            if len(raw) != 65 or raw[0] != 4:
                errors["keys.p256dh"] = "keys.p256dh must be a 65-byte uncompressed P-256 point (0x04...)."
            else:
                from cryptography.hazmat.primitives.asymmetric import ec  # (the [webpush] extra's)

                try:
                    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
                    p256dh = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
                except ValueError:
                    errors["keys.p256dh"] = "keys.p256dh is not a point on the P-256 curve."
        secret = _base64url_bytes(keys.get("auth"), "keys.auth", errors)
        if secret is not None:
            if len(secret) != 16:
                errors["keys.auth"] = "keys.auth must be 16 bytes, base64url-encoded."
            else:
                auth = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    if errors:
        raise ValidationError(errors)
    return {"endpoint": cast(str, endpoint), "p256dh": cast(str, p256dh), "auth": cast(str, auth)}


class PushDisabled(Exception):
    """The site sends no Web Push (no VAPID key, or ``push`` not in ``DELIVERY_CHANNELS``)."""


def push_subscription_add(*, user, subscription: Mapping[str, Any], user_agent: str = "") -> tuple[Any, bool]:
    """Store a browser's ``PushSubscription.toJSON()`` for ``user``: ``(row, created)``.

    An endpoint the user has already is updated (created False); one of another user moves to
    ``user`` (a browser profile has one endpoint). Beyond ``WEBPUSH_MAX_SUBSCRIPTIONS`` the user's
    oldest are removed. Nothing is stored on ``ValidationError`` (naming each bad field) or, for a
    valid subscription, ``PushDisabled``.
    """
    values = _push_subscription_values(subscription)
    if not webpush.enabled():
        raise PushDisabled("Web Push is not enabled on this site.")
    agent = user_agent[:USER_AGENT_MAX] if protocol.is_storable_text(user_agent) else ""
    fields = {"p256dh": values["p256dh"], "auth": values["auth"], "user_agent": agent}
    with transaction.atomic():
        # One user's subscriptions change one request at a time (the limit below counts them).
        get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True).get()
        row = PushSubscription.objects.select_for_update().filter(endpoint=values["endpoint"]).first()
        created = row is None or row.user_id != user.pk
        if row is None:
            try:
                with transaction.atomic():
                    row = PushSubscription.objects.create(user=user, endpoint=values["endpoint"], **fields)
            except IntegrityError:  # another request stored this endpoint meanwhile
                row = PushSubscription.objects.select_for_update().get(endpoint=values["endpoint"])
        if row.user_id != user.pk or any(getattr(row, name) != value for name, value in fields.items()):
            if row.user_id != user.pk:
                row.user = user
                row.created_at = timezone.now()
                row.last_success_at = None
            for name, value in fields.items():
                setattr(row, name, value)
            row.save()
        keep = max(1, conf.settings.WEBPUSH_MAX_SUBSCRIPTIONS)
        mine = PushSubscription.objects.filter(user=user).order_by("-created_at", "-pk")
        extra = list(mine.exclude(pk=row.pk).values_list("pk", flat=True)[keep - 1:])
        if extra:
            PushSubscription.objects.filter(pk__in=extra).delete()
    return row, created


def push_subscription_remove(*, user, endpoint: str) -> bool:
    """Remove ``user``'s subscription of ``endpoint``; False when they have none."""
    deleted, _ = PushSubscription.objects.filter(user_id=user.pk, endpoint=endpoint).delete()
    return bool(deleted)
