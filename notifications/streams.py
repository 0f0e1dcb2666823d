"""Streams: one per audience, each numbered on its own (docs/guarantees.md, "Cursors").

A stream's key names its audience: ``u.<user id>`` (one user's personal notifications),
``t.<topic id>`` (a topic's, by the topic's identity, never its slug) and ``b`` (broadcasts).
The same key is the channel-layer group a server process joins while it has local sockets of
that audience, and the name a client's cursor uses for its position in that stream.

``reserve`` gives out the next offsets in the sending transaction: one upsert that increments
each stream's row and holds the row's lock until commit, so offsets are gap-free and committed
in order within a stream, and sends to different audiences never wait for each other.
``reserve_counts`` does the same for a batch, several offsets per stream at once.
"""

from collections.abc import Iterable, Mapping

from django.contrib.auth import get_user_model
from django.db import connection

from .models import Audience, Stream

BROADCAST = "b"
# Rows per statement: below SQLite's and PostgreSQL's limits on parameters.
CHUNK = 5000


def user_stream(user_id: int) -> str:
    return f"u.{user_id}"


def topic_stream(topic_id: int) -> str:
    return f"t.{topic_id}"


def stream_of(notification) -> str:
    """The stream of a notification: its audience's."""
    if notification.audience == Audience.USER:
        return user_stream(notification.recipient_id)
    if notification.audience == Audience.TOPIC:
        return topic_stream(notification.topic_id)
    return BROADCAST


def parse(key: str) -> tuple[str, int | None] | None:
    """``("u", 42)``, ``("t", 7)`` or ``("b", None)`` for a well-formed key, else None."""
    if key == BROADCAST:
        return BROADCAST, None
    kind, dot, number = key.partition(".")
    if kind not in ("u", "t") or not dot or not number.isdigit() or len(number) > 18 or number != str(int(number)):
        return None
    return kind, int(number)


def reserve(keys: Iterable[str]) -> dict[str, int]:
    """Take the next offset of each stream (created when missing) for the current transaction.

    The rows stay locked until the transaction ends; they are locked in key order, so two
    sends to overlapping sets of users cannot deadlock."""
    return reserve_counts(dict.fromkeys(keys, 1))


def reserve_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """``reserve`` of ``n`` offsets at once per stream, for a batch: ``{key: new head}``; the
    stream's offsets for this transaction are ``head - n + 1`` to ``head``.

    One upsert per ``CHUNK`` streams, the rows locked in key order as ``reserve`` locks them. A
    count of 0 takes no offset but still locks (and creates, at head 0) the row: a batch locks
    every stream it may send to in this one statement, so two batches cannot deadlock."""
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in counts.values()):
        raise ValueError("Stream counts are integers >= 0.")
    table, key = connection.ops.quote_name(Stream._meta.db_table), connection.ops.quote_name("key")
    new_heads: dict[str, int] = {}
    ordered = sorted(counts.items())
    for start in range(0, len(ordered), CHUNK):
        chunk = ordered[start : start + CHUNK]
        values = ", ".join(["(%s, %s)"] * len(chunk))
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({key}, head) VALUES {values} "  # noqa: S608 - only quoted names and placeholders are interpolated
                f"ON CONFLICT ({key}) DO UPDATE SET head = {table}.head + EXCLUDED.head "
                f"RETURNING {key}, head",
                [param for pair in chunk for param in pair],
            )
            new_heads.update(cursor.fetchall())
    return new_heads


def reserve_users(user_ids: Iterable[int]) -> dict[int, int]:
    """``reserve`` for the personal streams of the given users that exist and are active, in
    the same statement that checks them: ``{user id: offset}``, without the unknown or inactive.

    One round trip per send instead of a lookup of the users and then the upsert; the rows are
    locked in key order, as ``reserve`` locks them."""
    User = get_user_model()
    qn = connection.ops.quote_name
    table, users = qn(Stream._meta.db_table), qn(User._meta.db_table)
    pk, active = qn(User._meta.pk.column), qn(User._meta.get_field("is_active").column)
    key = qn("key")
    offsets: dict[int, int] = {}
    ordered = sorted(set(user_ids))
    for start in range(0, len(ordered), CHUNK):
        chunk = ordered[start : start + CHUNK]
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({key}, head) "  # noqa: S608 - only quoted names and placeholders are interpolated
                f"SELECT 'u.' || CAST({pk} AS TEXT), 1 FROM {users} "
                f"WHERE {pk} IN ({', '.join(['%s'] * len(chunk))}) AND {active} = %s ORDER BY 1 "
                f"ON CONFLICT ({key}) DO UPDATE SET head = {table}.head + 1 RETURNING {key}, head",
                [*chunk, True],
            )
            offsets.update((int(stream.partition(".")[2]), head) for stream, head in cursor.fetchall())
    return offsets


def heads(keys: Iterable[str]) -> dict[str, int]:
    """The committed head of each stream (0 for a stream that has had no notification)."""
    wanted = list(set(keys))
    found: dict[str, int] = {}
    for start in range(0, len(wanted), CHUNK):
        found.update(Stream.objects.filter(key__in=wanted[start : start + CHUNK]).values_list("key", "head"))
    return {key: found.get(key, 0) for key in wanted}
