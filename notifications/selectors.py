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
from django.db.models import BooleanField, Exists, ExpressionWrapper, F, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from . import push
from .models import Audience, Follow, InboxState, Notification, Receipt, Stream, Topic, ensure_stream

INBOX_PAGE_MAX = 100


def _watermark(user) -> Coalesce:
    return Coalesce(
        Subquery(InboxState.objects.filter(user=user).values("read_watermark")[:1]), Value(0)
    )


def _receipts(user, **filters) -> Exists:
    return Exists(Receipt.objects.filter(user=user, notification=OuterRef("pk"), **filters))


def _visible_parts(user, condition: Q | None = None) -> list[QuerySet]:
    """The three audience parts visible to ``user``, not dismissed, filtered by ``condition``."""
    condition = condition or Q()
    not_dismissed = ~_receipts(user, dismissed_at__isnull=False)
    personal = Notification.objects.filter(condition, not_dismissed, recipient=user)
    topical = Notification.objects.filter(
        Q(topic__follows__ended_at__isnull=True) | Q(created_at__lt=F("topic__follows__ended_at")),
        condition,
        not_dismissed,
        topic__follows__user=user,
        created_at__gte=F("topic__follows__created_at"),
    )
    broadcast = Notification.objects.filter(
        condition, not_dismissed, audience=Audience.BROADCAST, created_at__gte=user.date_joined
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


def unread_count_for(user, *, through: int | None = None) -> int:
    """How many visible notifications ``user`` has not read (up to id ``through``): one query."""
    condition = ~_read(user) if through is None else ~_read(user) & Q(id__lte=through)
    return _union_ids(_visible_parts(user, condition)).count()


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


def stream_state() -> tuple[int, str]:
    """The stream head (the newest committed notification id) and epoch, read together."""
    row = Stream.objects.filter(pk=1).values_list("head", "epoch").first()
    if row is None:
        ensure_stream()
        row = Stream.objects.filter(pk=1).values_list("head", "epoch").get()
    return row


def stream_head() -> int:
    return stream_state()[0]


def stream_epoch() -> str:
    """Identifies this store; cursors from another epoch cannot be resumed."""
    return stream_state()[1]


def stream_messages(first: int, last: int) -> list[dict]:
    """The stream messages of notifications ``first..last`` (for a hub that missed them)."""
    rows = Notification.objects.filter(id__gte=first, id__lte=last).select_related("topic", "actor").order_by("id")
    return [push.notification_message(n) for n in rows]


def replay_for(user, *, since: int, limit: int) -> list[Notification]:
    """The user's visible notifications after ``since``, oldest first, at most ``limit``; each with ``is_read``."""
    ids = [row["id"] for row in _union_ids(_visible_parts(user, Q(id__gt=since))).order_by("id")[:limit]]
    return _with_read_state(user, ids, "id")
