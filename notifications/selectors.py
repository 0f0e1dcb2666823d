"""Every read of notification state: the API, the consumer and the admin share these queries.

Visibility: a user sees

- notifications addressed to them (``audience="user"``),
- topic notifications created while they followed the topic,
- broadcasts created after they joined,

minus the ones they dismissed. Each of the three parts walks its own index newest
first; they are combined with ``UNION ALL`` (the parts are disjoint by audience).
"""

from collections.abc import Iterable

from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import BooleanField, Exists, ExpressionWrapper, F, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from . import push, streams
from .models import Audience, Follow, InboxState, Notification, Receipt, Store, Stream, Topic, ensure_store

INBOX_PAGE_MAX = 100
# Streams whose heads store_heads reads in one written-out statement (a join usually asks a few).
HEADS_IN_ONE_STATEMENT = 100


def _watermark(user) -> Coalesce:
    return Coalesce(
        Subquery(InboxState.objects.filter(user=user).values("read_watermark")[:1]), Value(0)
    )


def _receipts(user, **filters) -> Exists:
    return Exists(Receipt.objects.filter(user=user, notification=OuterRef("pk"), **filters))


def _visible_parts(user, condition: Q | None = None, *, per_part: tuple[Q, Q, Q] | None = None) -> list[QuerySet]:
    """The three audience parts visible to ``user``, not dismissed, filtered by ``condition`` (and
    each by its own condition of ``per_part``: personal, topical, broadcast)."""
    condition = condition or Q()
    own_personal, own_topical, own_broadcast = per_part or (Q(), Q(), Q())
    not_dismissed = ~_receipts(user, dismissed_at__isnull=False)
    personal = Notification.objects.filter(condition, own_personal, not_dismissed, recipient=user)
    topical = Notification.objects.filter(
        Q(topic__follows__ended_at__isnull=True) | Q(created_at__lt=F("topic__follows__ended_at")),
        condition,
        own_topical,
        not_dismissed,
        topic__follows__user=user,
        created_at__gte=F("topic__follows__created_at"),
    )
    broadcast = Notification.objects.filter(
        condition, own_broadcast, not_dismissed, audience=Audience.BROADCAST, created_at__gte=user.date_joined
    )
    return [personal, topical, broadcast]


def _union_ids(parts: list[QuerySet]) -> QuerySet:
    first, *rest = (part.order_by().values("id") for part in parts)
    return first.union(*rest, all=True)


def visible_ids(user, ids: Iterable[int]) -> set[int]:
    """The subset of ``ids`` that ``user`` may see (and has not dismissed)."""
    ids = list(ids)
    if not ids:
        return set()
    return {row["id"] for row in _union_ids(_visible_parts(user, Q(id__in=ids)))}


def unread_count_for(user, *, through: dict[str, int] | None = None) -> int:
    """How many visible notifications ``user`` has not read: one query. With ``through``, the
    streams it names count only up to its offsets (what a connection's cursor covers: the later
    ones arrive live and count then); the others count whole.

    Every handshake and resume asks this, so it is one SQL statement written out rather than
    built by the ORM from ``_visible_parts`` (about 9 ms of CPU per call on this machine, more
    than the rest of a handshake): the same three parts, the same visibility and read rules.
    ``unread_count_orm`` is that ORM form; tests hold the two equal."""
    qn = connection.ops.quote_name
    n, f = qn(Notification._meta.db_table), qn(Follow._meta.db_table)
    r, w = qn(Receipt._meta.db_table), qn(InboxState._meta.db_table)
    offset = qn("offset")
    windows: dict[str, list] = {"personal": [], "topical": [], "broadcast": []}
    clauses = {"personal": "", "topical": "", "broadcast": ""}
    if through is not None:
        topic_windows = []
        for key, last in through.items():
            parsed = streams.parse(key)
            if parsed is None:
                continue
            kind, number = parsed
            window = f"n.{offset} > 0 AND n.{offset} <= %s"
            if kind == "u" and number == user.pk:
                clauses["personal"], windows["personal"] = f" AND {window}", [last]
            elif kind == "b":
                clauses["broadcast"], windows["broadcast"] = f" AND {window}", [last]
            elif kind == "t":
                topic_windows.append((number, last))
        if topic_windows:
            listed = ", ".join(["%s"] * len(topic_windows))
            within = " OR ".join([f"(n.topic_id = %s AND {window})"] * len(topic_windows))
            clauses["topical"] = f" AND (n.topic_id NOT IN ({listed}) OR {within})"
            windows["topical"] = [t for t, _ in topic_windows] + [v for t, last in topic_windows for v in (t, last)]
    sql = (
        f"SELECT COUNT(*) FROM ("  # noqa: S608 - only quoted names and placeholders are interpolated
        f"SELECT n.id FROM {n} n WHERE n.recipient_id = %s{clauses['personal']} "
        f"UNION ALL SELECT n.id FROM {n} n INNER JOIN {f} f ON f.topic_id = n.topic_id "
        f"WHERE f.user_id = %s AND n.created_at >= f.created_at "
        f"AND (f.ended_at IS NULL OR n.created_at < f.ended_at){clauses['topical']} "
        f"UNION ALL SELECT n.id FROM {n} n WHERE n.audience = %s AND n.created_at >= %s{clauses['broadcast']}"
        f") v WHERE v.id > COALESCE((SELECT w.read_watermark FROM {w} w WHERE w.user_id = %s), 0) "
        f"AND NOT EXISTS (SELECT 1 FROM {r} r WHERE r.user_id = %s AND r.notification_id = v.id "
        f"AND (r.read_at IS NOT NULL OR r.dismissed_at IS NOT NULL))"
    )
    params = [user.pk, *windows["personal"], user.pk, *windows["topical"], Audience.BROADCAST.value,
              user.date_joined, *windows["broadcast"], user.pk, user.pk]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def unread_count_orm(user, *, through: dict[str, int] | None = None) -> int:
    """``unread_count_for`` built by the ORM from ``_visible_parts`` (the reference for tests)."""
    per_part = None
    if through is not None:
        per_part = _range_parts(user, {key: (0, offset) for key, offset in through.items()}, others=True)
    return _union_ids(_visible_parts(user, ~_read(user), per_part=per_part)).count()


def latest_visible_id(user) -> int:
    """The newest visible notification id (0 when there is none)."""
    rows = _union_ids(_visible_parts(user)).order_by("-id")[:1]
    return rows[0]["id"] if rows else 0


def _read(user) -> Q:
    # Q | Exists is a Q (Django combines conditional expressions); the stubs say Combinable.
    return Q(id__lte=_watermark(user)) | _receipts(user, read_at__isnull=False)  # type: ignore[return-value]


def _with_read_state(user, ids: list[int], order: str) -> list[Notification]:
    return list(
        Notification.objects.filter(id__in=ids)
        .select_related("topic", "actor")
        .annotate(is_read=ExpressionWrapper(_read(user), output_field=BooleanField()))
        .order_by(order)
    )


def unread_among(user, ids: Iterable[int]) -> list[Notification]:
    """The notifications among ``ids`` that ``user`` sees, has not dismissed and has not read, oldest first."""
    ids = list(ids)
    if not ids:
        return []
    found = [row["id"] for row in _union_ids(_visible_parts(user, Q(id__in=ids) & ~_read(user)))]
    return list(Notification.objects.filter(id__in=found).select_related("topic", "actor").order_by("id"))


def inbox_for(
    user, *, unread_only: bool = False, before: int | None = None, limit: int = 50
) -> list[Notification]:
    """A page of the user's inbox, newest first; each item carries ``is_read``."""
    condition = Q()
    if before is not None:
        condition &= Q(id__lt=before)
    if unread_only:
        condition &= ~_read(user)
    limit = max(1, min(limit, INBOX_PAGE_MAX))
    page_ids = [row["id"] for row in _union_ids(_visible_parts(user, condition)).order_by("-id")[:limit]]
    return _with_read_state(user, page_ids, "-id")


def active_follows():
    return Follow.objects.filter(ended_at__isnull=True)


def followed_topics(user) -> dict[int, str]:
    """The topics ``user`` follows now, as {topic id: slug}."""
    return dict(active_follows().filter(user=user).values_list("topic_id", "topic__slug"))


def topics_for(user) -> QuerySet:
    """Topics ``user`` may see: public ones and private ones they are a member of."""
    following = Exists(active_follows().filter(user=user, topic=OuterRef("pk")))
    return (
        Topic.objects.filter(Q(private=False) | Q(members=user))
        .distinct()
        .annotate(following=following)
        .order_by("slug")
    )


def topic_readable_by(topic: Topic, user) -> bool:
    return not topic.private or topic.members.filter(pk=user.pk).exists()


def read_count(notification: Notification) -> int:
    """How many of the notification's recipients have read it (receipt or read watermark)."""
    read_receipt = Exists(
        Receipt.objects.filter(user=OuterRef("user_id"), notification=notification, read_at__isnull=False)
    )
    past_watermark = Exists(
        InboxState.objects.filter(user=OuterRef("user_id"), read_watermark__gte=notification.pk)
    )
    audience: QuerySet
    if notification.audience == Audience.USER:
        recipient = notification.recipient_id  # set for every personal notification
        audience = get_user_model().objects.filter(pk=recipient).annotate(user_id=F("pk"))  # type: ignore[misc]
    elif notification.audience == Audience.TOPIC:
        audience = Follow.objects.filter(
            Q(ended_at__isnull=True) | Q(ended_at__gt=notification.created_at),
            topic_id=notification.topic_id,  # type: ignore[misc]  # set for every topic notification
            created_at__lte=notification.created_at,
        )
    else:
        audience = get_user_model().objects.filter(date_joined__lte=notification.created_at).annotate(
            user_id=F("pk")
        )
    return audience.filter(read_receipt | past_watermark).count()


def store_epoch() -> str:
    """Identifies this store; cursors from another epoch cannot be resumed."""
    return ensure_store()


def store_heads(keys: list[str]) -> tuple[str, dict[str, int]]:
    """The store's epoch and the committed head of each stream, read together: one written-out
    statement for a join's usual few streams (on the path of every handshake), the ORM for more."""
    wanted = list(set(keys))
    if not wanted or len(wanted) > HEADS_IN_ONE_STATEMENT:
        return ensure_store(), streams.heads(wanted)
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT st.epoch, s.{quote('key')}, s.head FROM {quote(Store._meta.db_table)} st "  # noqa: S608 - only quoted names and placeholders are interpolated
            f"LEFT JOIN {quote(Stream._meta.db_table)} s ON s.{quote('key')} IN ({', '.join(['%s'] * len(wanted))}) "
            "WHERE st.id = 1",
            wanted,
        )
        rows = cursor.fetchall()
    if not rows:  # no store row yet (a flushed test database): ensure_store creates it
        return ensure_store(), streams.heads(wanted)
    found = {key: head for _, key, head in rows if key is not None}
    return rows[0][0], {key: found.get(key, 0) for key in wanted}


def _stream_condition(key: str) -> Q:
    """The notifications of one stream, as a condition on the notification table."""
    parsed = streams.parse(key)
    if parsed is None:
        return Q(pk__in=[])
    kind, number = parsed
    if kind == "u":
        return Q(audience=Audience.USER, recipient_id=number)
    if kind == "t":
        return Q(audience=Audience.TOPIC, topic_id=number)
    return Q(audience=Audience.BROADCAST)


def stream_messages(key: str, first: int, last: int) -> list[dict]:
    """The stream messages of offsets ``first..last`` of one stream (for a hub that missed them)."""
    rows = (Notification.objects.filter(_stream_condition(key), offset__gte=first, offset__lte=last)
            .select_related("topic", "actor").order_by("offset"))
    return [push.notification_message(n) for n in rows]


Ranges = dict[str, tuple[int, int | None]]


def _range_parts(user, ranges: Ranges, *, others: bool = False) -> tuple[Q, Q, Q]:
    """Per-audience conditions for ``{stream: (after, through)}`` (``through`` None: no upper bound);
    a stream not in ``ranges`` contributes nothing, or (``others``) all of its notifications."""
    nothing = Q(pk__in=[])
    everything = Q()
    personal, broadcast = (everything, everything) if others else (nothing, nothing)
    topical = nothing
    if others:
        listed = [number for kind, number in filter(None, map(streams.parse, ranges)) if kind == "t"]
        topical = ~Q(topic_id__in=listed)
    for key, (after, through) in ranges.items():
        parsed = streams.parse(key)
        if parsed is None:
            continue
        kind, number = parsed
        window = Q(offset__gt=after) if through is None else Q(offset__gt=after, offset__lte=through)
        if kind == "u" and number == user.pk:
            personal = window
        elif kind == "t":
            topical |= window & Q(topic_id=number)
        elif kind == "b":
            broadcast = window
    return personal, topical, broadcast


def replay_for(user, *, ranges: Ranges, limit: int) -> list[Notification]:
    """The user's visible notifications in the given stream ranges, oldest first (by id: within a
    stream that is offset order), at most ``limit``; each with ``is_read``."""
    parts = _visible_parts(user, per_part=_range_parts(user, ranges))
    ids = [row["id"] for row in _union_ids(parts).order_by("id")[:limit]]
    return _with_read_state(user, ids, "id")
