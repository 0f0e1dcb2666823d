"""The WebSocket consumer: parse, authorize, call a service, send.

Database work sits in ``database_sync_to_async`` helpers; nothing here blocks the
event loop or loops per message. Frames from the channel layer arrive pre-encoded
and are written unchanged.
"""

import logging
import os
import socket
import time
import uuid

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.core.exceptions import PermissionDenied

from . import protocol, selectors, services
from .models import Notification, Topic
from .net import scope_client_ip, scope_headers
from .presence import Connection, get_presence
from .protocol import ProtocolError
from .push import BROADCAST_GROUP, topic_group, user_group

logger = logging.getLogger(__name__)

SERVER_ID = settings.NOTIFICATIONS["SERVER_ID"] or f"{socket.gethostname()}:{os.getpid()}"


class NotificationConsumer(AsyncWebsocketConsumer):
    """One WebSocket connection of one authenticated user.

    Options come through ``NotificationConsumer.as_asgi(max_frame_bytes=...)``.
    """

    def __init__(self, *args, max_frame_bytes: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.joined: set[str] = set()
        self.user = None
        self.connection_id = uuid.uuid4().hex
        self.max_frame_bytes = max_frame_bytes or settings.NOTIFICATIONS["WS_MAX_FRAME_BYTES"]

    # Connection lifecycle

    async def connect(self):
        offered = self.scope.get("subprotocols") or []
        await self.accept(protocol.SUBPROTOCOL if protocol.SUBPROTOCOL in offered else None)
        failure = self.scope.get("auth_error")
        if failure is not None:
            await self.send_frame(protocol.error_frame(failure.code, failure.message))
            await self.close(code=failure.close_code, reason=failure.message[:120])
            return
        self.user = self.scope["user"]
        slugs, unread = await self._initial_state()
        for group in [user_group(self.user.pk), BROADCAST_GROUP, *map(topic_group, slugs)]:
            await self._join(group)
        await get_presence().add(self._presence_record(slugs))
        await self.send_frame(
            {
                "type": "hello",
                "protocol": protocol.SUBPROTOCOL,
                "version": protocol.PROTOCOL_VERSION,
                "user": {"id": self.user.pk, "username": self.user.get_username()},
                "unread_count": unread,
                "topics": slugs,
                "max_frame_bytes": self.max_frame_bytes,
            }
        )

    async def disconnect(self, code):
        if self.user is not None:
            await get_presence().remove(self.connection_id)
        for group in list(self.joined):
            await self._leave(group)

    async def receive(self, text_data=None, bytes_data=None):
        if self.user is None:
            return
        if text_data is None:
            await self.send_frame(
                protocol.error_frame(protocol.BINARY_NOT_SUPPORTED, "Send JSON text frames, not binary frames.")
            )
            return
        if len(text_data) > self.max_frame_bytes or len(text_data.encode()) > self.max_frame_bytes:
            await self.send_frame(
                protocol.error_frame(
                    protocol.FRAME_TOO_LARGE, f"Frames are limited to {self.max_frame_bytes} bytes."
                )
            )
            await self.close(code=protocol.CLOSE_TOO_LARGE)
            return
        request = None
        try:
            request = protocol.parse_client_frame(text_data)
            await getattr(self, f"handle_{request.type}")(request)
        except ProtocolError as error:
            await self.send_frame(error.frame())
        except Exception:
            kind = getattr(request, "type", "?")
            logger.exception("unexpected error handling a %s frame for user %s", kind, self.user.pk)
            message = "The server failed to handle this frame."
            await self.send_frame(protocol.error_frame(protocol.SERVER_ERROR, message, getattr(request, "id", None)))

    # Client requests

    async def handle_ping(self, request):
        await self.send_frame(self._reply("pong", request))

    async def handle_subscribe(self, request):
        await self._follow(request.topic, request.id)
        await self._join(topic_group(request.topic))
        await self.send_frame(self._reply("subscribed", request, topic=request.topic))

    async def handle_unsubscribe(self, request):
        await self._unfollow(request.topic, request.id)
        await self._leave(topic_group(request.topic))
        await self.send_frame(self._reply("unsubscribed", request, topic=request.topic))

    async def handle_mark_read(self, request):
        count = await self._mark_read(request.ids, request.id)
        await self.send_frame(self._reply("ack", request, op="mark_read", unread_count=count))

    async def handle_mark_all_read(self, request):
        count = await self._mark_all_read()
        await self.send_frame(self._reply("ack", request, op="mark_all_read", unread_count=count))

    # Channel layer events (sent only by notifications.push)

    async def push_frame(self, event):
        await self.send(text_data=event["frame"])

    async def push_follow(self, event):
        group = topic_group(event["topic"])
        if group not in self.joined:
            await self._join(group)
            await self.send_frame({"type": "subscribed", "topic": event["topic"]})

    async def push_unfollow(self, event):
        group = topic_group(event["topic"])
        if group in self.joined:
            await self._leave(group)
            await self.send_frame({"type": "unsubscribed", "topic": event["topic"]})

    async def push_close(self, event):
        """Close this connection (an admin disconnect, or its token was revoked)."""
        if event.get("token_id") is not None and event["token_id"] != self.scope.get("auth_token_id"):
            return
        await self.send_frame(protocol.error_frame(protocol.DISCONNECTED, event["reason"]))
        await self.close(code=event["code"], reason=event["reason"])

    # Helpers

    async def send_frame(self, frame: dict):
        await self.send(text_data=protocol.encode(frame))

    @staticmethod
    def _reply(kind: str, request, **fields) -> dict:
        frame = {"type": kind, **fields}
        if request.id is not None:
            frame["id"] = request.id
        return frame

    def _topics(self) -> list[str]:
        prefix = topic_group("")
        return sorted(g.removeprefix(prefix) for g in self.joined if g.startswith(prefix))

    def _presence_record(self, topics: list[str]) -> Connection:
        return Connection(
            id=self.connection_id,
            user_id=self.user.pk,
            username=self.user.get_username(),
            since=time.time(),
            ip=scope_client_ip(self.scope),
            user_agent=scope_headers(self.scope).get("user-agent", "")[:300],
            server=SERVER_ID,
            topics=sorted(topics),
        )

    async def _join(self, group: str):
        await self.channel_layer.group_add(group, self.channel_name)
        self.joined.add(group)
        if self.user is not None and group.startswith(topic_group("")):
            await get_presence().update_topics(self.connection_id, self._topics())

    async def _leave(self, group: str):
        self.joined.discard(group)
        await self.channel_layer.group_discard(group, self.channel_name)
        if self.user is not None and group.startswith(topic_group("")):
            await get_presence().update_topics(self.connection_id, self._topics())

    @database_sync_to_async
    def _initial_state(self) -> tuple[list[str], int]:
        return selectors.followed_topic_slugs(self.user), selectors.unread_count_for(self.user)

    def _topic(self, slug: str, request_id) -> Topic:
        topic = Topic.objects.filter(slug=slug).first()
        if topic is None:
            raise ProtocolError(protocol.NOT_FOUND, f"No topic {slug!r}.", request_id)
        return topic

    @database_sync_to_async
    def _follow(self, slug: str, request_id):
        try:
            services.topic_follow(user=self.user, topic=self._topic(slug, request_id))
        except PermissionDenied as exc:
            raise ProtocolError(protocol.FORBIDDEN, str(exc), request_id) from None

    @database_sync_to_async
    def _unfollow(self, slug: str, request_id):
        services.topic_unfollow(user=self.user, topic=self._topic(slug, request_id))

    @database_sync_to_async
    def _mark_read(self, ids, request_id) -> int:
        try:
            return services.notification_mark_read(user=self.user, ids=ids)
        except Notification.DoesNotExist as exc:
            raise ProtocolError(protocol.NOT_FOUND, str(exc), request_id) from None

    @database_sync_to_async
    def _mark_all_read(self) -> int:
        return services.notification_mark_all_read(user=self.user)
