"""The only module that talks to the channel layer.

Services call these functions from ``transaction.on_commit`` callbacks, so nothing is
pushed for a transaction that rolls back. Everything goes to one group, ``stream``,
whose members are the server processes' hubs (``notifications.hub``); each hub fans
out to its local sockets. Messages hold only JSON-safe values (str, int, bool, None),
so they survive msgpack on Redis. A notification frame is encoded once, here, and
written unchanged to every socket that receives it.

A failed push is logged and swallowed: the notification is stored, and every hub
finds it in the store (it watches the stream head), so connected clients still get it.
"""

import logging
import time
from collections.abc import Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from . import metrics, protocol
from .throttled_log import ThrottledLog

logger = logging.getLogger(__name__)
failures = ThrottledLog(logger)

STREAM_GROUP = "stream"
BROADCAST_GROUP = "broadcast"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def topic_group(topic_id: int) -> str:
    """By the topic's id, never its slug: a slug can be renamed, or deleted and taken by another topic."""
    return f"topic.{topic_id}"


def notification_group(notification) -> str:
    """The audience of a notification, as the hub routes it: user.<id>, topic.<id> or broadcast."""
    if notification.recipient_id is not None:
        return user_group(notification.recipient_id)
    if notification.topic_id is not None:
        return topic_group(notification.topic_id)
    return BROADCAST_GROUP


def notification_message(notification) -> dict:
    """The stream message of a stored notification (also rebuilt from the store by the hub)."""
    return {
        "type": "stream.notification",
        "id": notification.id,
        "group": notification_group(notification),
        "frame": protocol.encode(protocol.notification_frame(notification)),
    }


def _send(messages: Iterable[dict]) -> None:
    messages = list(messages)
    layer = get_channel_layer()
    if not messages or layer is None:
        return

    async def send_all() -> None:
        for message in messages:
            await layer.group_send(STREAM_GROUP, message)

    try:
        async_to_sync(send_all)()
    except Exception as exc:  # the store is the source of truth; hubs catch up from it
        metrics.push_failed()
        failures.failure("push failed (stored; hubs will read it from the store)", exc)
    else:
        failures.recovered("push failed (stored; hubs will read it from the store)")


def notifications_created(notifications: Iterable) -> None:
    """Push each stored notification to every server process, one encoded frame each.

    ``t`` is the commit time (this runs in ``on_commit``): the hubs measure push latency from it."""
    committed_at = time.time()
    messages = []
    for n in notifications:
        messages.append(notification_message(n) | {"t": committed_at})
        metrics.sent(str(n.audience))
    _send(messages)


def _user_event(user_id: int, op: str, **fields) -> dict:
    return {"type": "stream.user", "user": user_id, "op": op, **fields}


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
    _send([{"type": "stream.topic", "topic_id": topic_id, "op": op, "topic": slug, "old_topic": old_slug}])


def connections_close(user_ids: Iterable[int], *, code: int, reason: str, token_id: int | None = None,
                      session: str | None = None, error: str = protocol.DISCONNECTED) -> None:
    """Close every live connection of these users, on every server process: only those opened
    with ``token_id`` when it is given; only session-authenticated ones when ``session`` is given
    (``auth.ALL_SESSIONS``, or the ``auth.session_digest`` of one session). The client hears an
    ``error`` frame (code ``error``, message ``reason``), then the close."""
    _send(_user_event(u, "close", code=code, reason=reason, token_id=token_id, session=session, error=error)
          for u in user_ids)
