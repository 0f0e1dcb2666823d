"""The only module that talks to the channel layer.

Services call these functions from ``transaction.on_commit`` callbacks, so nothing is
pushed for a transaction that rolls back. Every message is JSON-safe (strings, ints,
bools) before ``group_send``, so it survives msgpack on Redis. A frame is encoded once
per notification and written unchanged by every consumer that receives it.

A failed push is logged and swallowed: the notification is stored, and clients catch
up from the store (``GET /api/notifications/`` or, later, resume).
"""

import logging
from collections.abc import Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from . import protocol

logger = logging.getLogger(__name__)

BROADCAST_GROUP = "broadcast"


def user_group(user_id: int) -> str:
    return f"user.{user_id}"


def topic_group(slug: str) -> str:
    return f"topic.{slug}"


def notification_group(notification) -> str:
    if notification.recipient_id is not None:
        return user_group(notification.recipient_id)
    if notification.topic_id is not None:
        return topic_group(notification.topic.slug)
    return BROADCAST_GROUP


def _frame(text: str) -> dict:
    return {"type": "push.frame", "frame": text}


def _send(messages: Iterable[tuple[str, dict]]) -> None:
    messages = list(messages)
    if not messages:
        return
    layer = get_channel_layer()
    if layer is None:
        return

    async def send_all() -> None:
        for group, message in messages:
            await layer.group_send(group, message)

    try:
        async_to_sync(send_all)()
    except Exception as exc:  # the store is the source of truth; clients catch up from it
        logger.error("push failed for %d message(s): %s: %s", len(messages), type(exc).__name__, exc)


def notifications_created(notifications: Iterable) -> None:
    """Push each stored notification to its audience's group, one encoded frame each."""
    _send(
        (notification_group(n), _frame(protocol.encode(protocol.notification_frame(n))))
        for n in notifications
    )


def unread_count_changed(user_id: int, count: int) -> None:
    _send([(user_group(user_id), _frame(protocol.encode({"type": "unread_count", "count": count})))])


def topic_followed(user_id: int, slug: str) -> None:
    """Tell every connection of the user to join the topic's group."""
    _send([(user_group(user_id), {"type": "push.follow", "topic": slug})])


def topic_unfollowed(user_id: int, slug: str) -> None:
    _send([(user_group(user_id), {"type": "push.unfollow", "topic": slug})])


def connections_close(user_ids: Iterable[int], *, code: int, reason: str, token_id: int | None = None) -> None:
    """Close every live connection of these users, on every server process (only those
    opened with ``token_id`` when it is given)."""
    message = {"type": "push.close", "code": code, "reason": reason, "token_id": token_id}
    _send((user_group(user_id), message) for user_id in user_ids)
