"""The socket channel's delivery records (``SocketReceipt``): how far each user's sockets got in
each stream, so "was this notification's frame sent to this user, and by when" has an answer
without a row per notification and user.

The hub (and a resume's replay) notes ``(user, stream) -> offset`` in memory as it hands frames to
sockets (``note``: a dict assignment per socket); every ``SOCKET_RECEIPTS_INTERVAL`` (30 s; 0:
none) the hub writes what was noted since in one statement per 300 pairs (``flush``, on a
database thread), keeping the greater offset when two processes write the same pair. The cost is
per user and stream with news in the interval, not per notification. A crash loses at most the
last interval's notes: the records say less than was sent, never more.
"""

from datetime import datetime

from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import QuerySet
from django.utils import timezone

from . import streams
from .models import Audience, Notification, SocketReceipt

CHUNK = 300  # pairs per statement: 3 parameters each, under SQLite's 999

Marks = dict[tuple[int, str], int]


def note(marks: Marks, user_id: int, stream: str, offset: int) -> None:
    """Note that ``offset`` of ``stream`` was handed to a socket of ``user_id``."""
    if marks.get((user_id, stream), 0) < offset:
        marks[(user_id, stream)] = offset


def flush(marks: Marks, now: datetime | None = None) -> int:
    """Write ``marks`` (the caller hands over a dict it no longer writes); returns how many pairs."""
    if not marks:
        return 0
    now = now or timezone.now()
    qn = connection.ops.quote_name
    table = qn(SocketReceipt._meta.db_table)
    user, stream, offset, at = (qn(SocketReceipt._meta.get_field(name).column)  # type: ignore[union-attr, arg-type]
                                for name in ("user", "stream", "offset", "at"))
    greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"
    items = sorted(marks.items(), key=lambda item: (item[0][1], item[0][0]))  # one lock order for every process
    users = get_user_model()._meta
    user_table, user_pk = qn(users.db_table), qn(users.pk.column)
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        values = ", ".join(["(%s, %s, %s, %s)"] * len(chunk))
        params: list = []
        for (user_id, key), value in chunk:
            params += [user_id, key, value, now]
        with connection.cursor() as cursor:
            # Through the users table: a user deleted since the note is left out, not an error.
            cursor.execute(
                f"WITH v(u, s, o, t) AS (VALUES {values}) "  # noqa: S608 - quoted names and placeholders only
                f"INSERT INTO {table} ({user}, {stream}, {offset}, {at}) "
                f"SELECT v.u, v.s, v.o, v.t FROM v JOIN {user_table} ON {user_table}.{user_pk} = v.u WHERE true "
                f"ON CONFLICT ({stream}, {user}) DO UPDATE SET {offset} = {greatest}({table}.{offset}, "
                f"excluded.{offset}), {at} = excluded.{at} WHERE excluded.{offset} > {table}.{offset}",
                params,
            )
    return len(items)


def receipts_of(notification: Notification) -> QuerySet[SocketReceipt]:
    """The users whose sockets were handed ``notification`` (their receipt is at or past its offset)."""
    key = streams.stream_of(notification)
    query = SocketReceipt.objects.filter(stream=key, offset__gte=notification.offset)
    if notification.audience == Audience.USER:
        query = query.filter(user=notification.recipient_id)
    return query


def frame_sent(notification: Notification, user_id: int) -> bool:
    """Whether ``notification``'s frame was handed to a socket of ``user_id``."""
    return receipts_of(notification).filter(user=user_id).exists()
