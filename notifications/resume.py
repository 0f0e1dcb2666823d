"""Resume: what a reconnecting client missed, read from the store, or why it cannot be.

A cursor names a position in each stream the client reads (``{"u.42": 17, "t.7": 3, "b": 120}``,
``protocol.parse_cursor``). A connection is registered with the hub first (its live frames held
back) at ``positions``; the replay is then, for each stream, what the user may see after the
cursor's offset and up to the registered position: everything later arrives live. So nothing is
missed between the two and nothing is sent twice (docs/guarantees.md, "Resume").

A stream the cursor does not name (a topic followed since, from another device) is replayed from
its start, as far as the user may see it (from when they followed). A topic in the cursor that
the user no longer follows is replayed up to its head: what arrived while they still followed it.
"""

from datetime import timedelta

from django.utils import timezone

from . import conf, selectors, streams


def outcome(user, cursor: dict[str, int], epoch: str | None, positions: dict[str, int],
            current_epoch: str | None = None) -> dict:
    """Decide a resume (database work; run it in a thread): ``{"recovered": True, "count": n, "rows":
    [...], "skip": {...}}`` or ``{"recovered": False, "reason": ..., "count": 0}``.

    ``skip``: streams where the cursor is ahead of this process's position (the client heard a
    newer offset from another process that this one has not delivered yet): live frames up to the
    cursor's offset are dropped for this connection, the client has them. ``current_epoch``: the
    store's epoch as this process knows it (the hub's), or None to read it."""
    options = conf.settings
    if epoch is not None and epoch != (current_epoch or selectors.store_epoch()):
        return {"recovered": False, "reason": "epoch_changed", "count": 0}
    readable = {key: offset for key, offset in cursor.items() if _readable(user, key)}
    heads = streams.heads(readable)
    if any(offset > heads[key] for key, offset in readable.items()):
        return {"recovered": False, "reason": "cursor_ahead", "count": 0}
    ranges: selectors.Ranges = {key: (readable.get(key, 0), through) for key, through in positions.items()}
    for key, after in readable.items():
        ranges.setdefault(key, (after, None))  # no longer followed: what arrived while it was
    rows = selectors.replay_for(user, ranges=ranges, limit=options.REPLAY_MAX_COUNT + 1)
    # Judged by this user's own streams: the age of someone else's notification is not theirs to learn.
    oldest_allowed = timezone.now() - timedelta(seconds=options.REPLAY_MAX_AGE)
    if rows and rows[0].created_at < oldest_allowed:
        return {"recovered": False, "reason": "too_old", "count": 0}
    if len(rows) > options.REPLAY_MAX_COUNT:
        return {"recovered": False, "reason": "too_many", "count": 0}
    skip = {key: offset for key, offset in readable.items() if key in positions and offset > positions[key]}
    return {"recovered": True, "count": len(rows), "rows": rows, "skip": skip}


def _readable(user, key: str) -> bool:
    """Streams a user's cursor may name: their own, the broadcast stream, and topics (whether the
    user may see a topic's notifications is decided by their follow periods)."""
    parsed = streams.parse(key)
    return parsed is not None and (parsed[0] != "u" or parsed[1] == user.pk)


def cursor_after(positions: dict[str, int], rows) -> dict[str, int]:
    """The connection's cursor once the replayed ``rows`` are sent: the registered positions,
    moved past anything replayed beyond them (streams no longer followed)."""
    cursor = dict(positions)
    for row in rows:
        key = streams.stream_of(row)
        cursor[key] = max(cursor.get(key, 0), row.offset)
    return cursor
