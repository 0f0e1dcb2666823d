"""The only module that talks to the channel layer.

Services call these functions from ``transaction.on_commit`` callbacks, so nothing is
pushed for a transaction that rolls back. Each message goes to the group of its audience's
stream (``notifications.streams``: ``u.<user id>``, ``t.<topic id>``, ``b``), which only the
server processes with a local socket of that audience have joined (``notifications.hub``): a
process receives what its own sockets need, and fans it out to them. Messages hold only
JSON-safe values (str, int, bool, None), so they survive msgpack on Redis. A notification
frame is encoded once, here, and written unchanged to every socket that receives it.

A failed push is logged and swallowed (``notifications.transport``): the notification is
stored, and every hub that serves its stream finds it in the store (it watches the heads of
its streams), so connected clients still get it.
"""

import time
from collections.abc import Iterable

from . import metrics, protocol, streams, transport


def notification_message(notification) -> dict:
    """The stream message of a stored notification (also rebuilt from the store by the hub)."""
    return {
        "type": "stream.notification",
        "stream": streams.stream_of(notification),
        "offset": notification.offset,
        "id": notification.id,
        "frame": protocol.encode(protocol.notification_frame(notification)),
    }


def _send(messages: Iterable[tuple[str, dict]]) -> None:
    """``(group, message)`` pairs, each to its group."""
    transport.publish(list(messages))


def notifications_created(notifications: Iterable) -> None:
    """Push each stored notification to the processes serving its stream, one encoded frame each.

    ``t`` is the commit time (this runs in ``on_commit``): the hubs measure push latency from it."""
    committed_at = time.time()
    messages = []
    for n in notifications:
        message = notification_message(n) | {"t": committed_at}
        messages.append((message["stream"], message))
        metrics.sent(str(n.audience))
    _send(messages)


def _user_event(user_id: int, op: str, **fields) -> tuple[str, dict]:
    """A control message for one user's connections: to the user's stream group."""
    return streams.user_stream(user_id), {"type": "stream.user", "user": user_id, "op": op, **fields}


def inbox_changed(user_id: int, change: dict, count: int) -> None:
    """A read-state change (``read``/``dismissed`` frame) and the new unread count, to every connection."""
    frames = (change, {"type": "unread_count", "count": count})
    _send([_user_event(user_id, "frame", frame=protocol.encode(frame)) for frame in frames])


def topic_followed(user_id: int, topic_id: int, slug: str) -> None:
    """Every connection of the user starts receiving the topic."""
    _send([_user_event(user_id, "follow", topic_id=topic_id, topic=slug)])


def topic_unfollowed(user_id: int, topic_id: int, slug: str) -> None:
    _send([_user_event(user_id, "unfollow", topic_id=topic_id, topic=slug)])


def topic_changed(topic_id: int, op: str, slug: str, old_slug: str = "") -> None:
    """A topic was renamed (``op="renamed"``) or deleted (``"deleted"``): one message, applied by
    each process to its local sockets the topic is routed to, however many follow it."""
    message = {"type": "stream.topic", "topic_id": topic_id, "op": op, "topic": slug, "old_topic": old_slug}
    _send([(streams.topic_stream(topic_id), message)])


def connections_close(user_ids: Iterable[int], *, code: int, reason: str, token_id: int | None = None,
                      session: str | None = None, error: str = protocol.DISCONNECTED) -> None:
    """Close every live connection of these users, on every server process: only those opened
    with ``token_id`` when it is given; only session-authenticated ones when ``session`` is given
    (``auth.ALL_SESSIONS``, or the ``auth.session_digest`` of one session). The client hears an
    ``error`` frame (code ``error``, message ``reason``), then the close."""
    _send(_user_event(u, "close", code=code, reason=reason, token_id=token_id, session=session, error=error)
          for u in user_ids)
