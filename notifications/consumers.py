"""The WebSocket consumer: parse, authorize, call a service, send.

Live notifications do not come through a per-consumer channel: the process's hub
(``notifications.hub``) receives each one once and queues the same pre-encoded frame
in this connection's bounded ``Outbox``. Database work sits in
``database_sync_to_async`` helpers; nothing here blocks the event loop.
"""

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.core.exceptions import PermissionDenied
from django.db import InterfaceError, OperationalError

from . import conf, connection_events, db, metrics, protocol, resume, selectors, services, streams
from .auth import ALL_SESSIONS
from .db import database_sync_to_async
from .hub import Hub, get_hub
from .models import Notification, Topic
from .outage_log import OutageLog
from .outbox import Outbox
from .presence import Connection, get_presence
from .protocol import ProtocolError
from .proxies import scope_client_ip, scope_headers
from .rate_limits import TokenBucket

logger = logging.getLogger(__name__)
store_failures = OutageLog(logger)


def server_id() -> str:
    """This process's name in presence listings: ``SERVER_ID``, or host name and process id."""
    return conf.settings.SERVER_ID or f"{socket.gethostname()}:{os.getpid()}"


class NotificationConsumer(AsyncWebsocketConsumer):
    """One WebSocket connection of one authenticated user.

    Options come through ``NotificationConsumer.as_asgi(max_frame_bytes=..., max_queued_frames=...)``.
    """

    # No per-connection channel: the hub delivers (see notifications.hub).
    channel_layer_alias = None

    def __init__(self, *args, max_frame_bytes: int | None = None, max_queued_frames: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        options = conf.settings
        self.max_frame_bytes = max_frame_bytes or options.WS_MAX_FRAME_BYTES
        self.max_queued_frames = max_queued_frames or options.WS_MAX_QUEUED_FRAMES
        self.user: Any = None
        self.hub: Hub | None = None
        self.outbox: Outbox | None = None
        self.connection_id = uuid.uuid4().hex
        # Where this connection started reading each stream (hello's cursor; topics added later too).
        self.positions: dict[str, int] = {}
        self.resumed = False
        self.own_topic_requests: set[str] = set()
        self.routing = asyncio.Lock()  # one topic route at a time (see _route_topic)
        self.max_connections = options.WS_MAX_CONNECTIONS_PER_USER
        self.bucket = TokenBucket(rate=options.WS_RATE, burst=options.WS_BURST)
        self.violations = 0

    # Connection lifecycle

    async def connect(self):
        offered = self.scope.get("subprotocols") or []
        if protocol.SUBPROTOCOL not in offered and any(old in offered for old in protocol.OLD_SUBPROTOCOLS):
            await self._refuse_old_protocol(offered)
            return
        await self.accept(protocol.SUBPROTOCOL if protocol.SUBPROTOCOL in offered else None)
        failure = self.scope.get("auth_error")
        if failure is not None:
            connection_events.refused(self, failure.code, failure.close_code)
            retry_after = failure.retry_after
            if retry_after is None and failure.close_code == protocol.CLOSE_TRY_AGAIN_LATER:
                retry_after = db.retry_after()
            await self.send_frame(protocol.error_frame(failure.code, failure.message, retry_after=retry_after))
            await self.close(code=failure.close_code, reason=failure.message[:120])
            return
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        try:
            since = _resume_request(query)
            self.hub = await get_hub()
        except ProtocolError as error:
            connection_events.refused(self, error.code, protocol.CLOSE_BAD_REQUEST)
            await self.send_frame(error.frame())
            await self.close(code=protocol.CLOSE_BAD_REQUEST)
            return
        except Exception as exc:
            await self._refuse_unavailable("channel layer", exc)
            return
        user = self.scope["user"]
        try:
            topics = self.scope.get("auth_followed")
            if topics is None:  # (a Bearer token's handshake read them with the token)
                topics = await self._followed_topics(user)
        except (OperationalError, InterfaceError) as exc:
            await self._refuse_unavailable("database", exc)
            return
        self.user = user
        # Holding from the start: live frames wait for hello (and the replay).
        self.outbox = Outbox(self, user_id=user.pk, topics=topics, max_frames=self.max_queued_frames)
        self.outbox.holding = True
        try:
            self.positions = await self.hub.register(self.outbox)
        except (OperationalError, InterfaceError) as exc:
            await self._refuse_unavailable("database", exc)
            return
        except Exception as exc:  # joining a stream's group: the channel layer
            await self._refuse_unavailable("channel layer", exc)
            return
        connection_events.connected(self)
        for oldest in self.hub.oldest_over_limit(user.pk, self.max_connections):
            oldest.consumer.close_replaced()
        # Counted up to the cursor: every later notification arrives live and adds one.
        if since is None:
            unread, replay = await self._unread_count(self.positions), None
        else:  # one trip to the database for the count and the replay
            self.resumed = True
            replay = await self._replay(since, query.get("epoch", [""])[0] or None)
            unread = replay["unread_count"]  # up to hello's cursor: the same count hello and `resumed` give
        slugs = sorted(topics.values())
        await get_presence().add(self._presence_record(slugs))  # listed before the client hears hello
        await self.send_frame(
            {
                "type": "hello",
                "protocol": protocol.SUBPROTOCOL,
                "version": protocol.PROTOCOL_VERSION,
                "user": {"id": user.pk, "username": user.get_username()},
                "unread_count": unread,
                "topics": slugs,
                "cursor": dict(self.positions),
                "epoch": self.hub.epoch,  # read by the hub at start and at each store check: no query here
                "max_frame_bytes": self.max_frame_bytes,
            }
        )
        if replay is None:
            self.outbox.release()
        else:
            self._finish_resume(replay, request_id=None)

    async def _refuse_old_protocol(self, offered: list[str]):
        """A client of a version this server no longer serves: say which one it does (4426)."""
        await self.accept(next(old for old in offered if old in protocol.OLD_SUBPROTOCOLS))
        connection_events.refused(self, protocol.UNSUPPORTED_PROTOCOL, protocol.CLOSE_UNSUPPORTED_PROTOCOL)
        message = (f"This server speaks {protocol.SUBPROTOCOL} (cursors per stream); update the client "
                   "(docs/protocol.md).")
        await self.send_frame(protocol.error_frame(protocol.UNSUPPORTED_PROTOCOL, message))
        await self.close(code=protocol.CLOSE_UNSUPPORTED_PROTOCOL, reason=f"use {protocol.SUBPROTOCOL}")

    async def _refuse_unavailable(self, dependency: str, exc: Exception):
        """A dependency is down: tell the client to come back later (4013); one log line per outage."""
        store_failures.failure(f"cannot serve connections: {dependency} unavailable", exc)
        connection_events.refused(self, protocol.UNAVAILABLE, protocol.CLOSE_TRY_AGAIN_LATER)
        frame = protocol.error_frame(protocol.UNAVAILABLE, "Try again later.", retry_after=db.retry_after())
        await self.send_frame(frame)
        await self.close(code=protocol.CLOSE_TRY_AGAIN_LATER)

    async def disconnect(self, code):
        connection_events.disconnected(self, code)
        if self.outbox is not None:
            self.hub.unregister(self.outbox)
            await get_presence().remove(self.connection_id)

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
        if not self.bucket.take():
            await self._violation(protocol.RATE_LIMITED, f"Slow down: at most {self.bucket.rate:g} frames per second.")
            return
        request = None
        try:
            request = protocol.parse_client_frame(text_data)
            metrics.frame_in(request.type)
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

    async def handle_resume(self, request):
        await self._resume(request.since, epoch=request.epoch, request_id=request.id)

    async def handle_subscribe(self, request):
        # The user's other connections learn it from the hub; this one needs no second frame for
        # its own request (the hub's event may arrive before or after this route).
        self.own_topic_requests.add(request.topic)
        try:
            topic = await self._follow(request.topic, request.id)
            await self._route_topic(self.outbox, topic.pk, topic.slug)
        except services.TooManyTopics as exc:
            await self._violation(protocol.TOO_MANY_TOPICS, str(exc), request.id)
            return
        finally:
            self.own_topic_requests.discard(request.topic)
        await self._update_presence()
        fields = self._topic_fields(topic.pk, topic.slug, offset=True)
        await self.send_frame(self._reply("subscribed", request, **fields))

    async def handle_unsubscribe(self, request):
        self.own_topic_requests.add(request.topic)
        try:
            topic = await self._unfollow(request.topic, request.id)
            self.hub.unfollow(self.outbox, topic.pk)
        finally:
            self.own_topic_requests.discard(request.topic)
        await self._update_presence()
        await self.send_frame(self._reply("unsubscribed", request, **self._topic_fields(topic.pk, topic.slug)))

    async def _route_topic(self, outbox: Outbox, topic_id: int, slug: str) -> bool:
        """Route the topic to this socket (once: the own request and the event from the hub may
        race); True if this call routed it. ``positions`` then has where it started reading."""
        async with self.routing:
            offset = await self.hub.follow(outbox, topic_id, slug)
            if offset is None:
                return False
            self.positions[streams.topic_stream(topic_id)] = offset
            return True

    def _topic_fields(self, topic_id: int, slug: str, *, offset: bool = False) -> dict:
        """``topic`` and ``stream`` of (un)subscribed frames, and for ``subscribed`` the ``offset``
        this connection started reading the topic's stream after."""
        stream = streams.topic_stream(topic_id)
        fields: dict = {"topic": slug, "stream": stream}
        if offset and stream in self.positions:
            fields["offset"] = self.positions[stream]
        return fields

    async def handle_mark_read(self, request):
        count = await self._mark_read(request.ids, request.id)
        await self.send_frame(self._reply("ack", request, op="mark_read", unread_count=count))

    async def handle_mark_all_read(self, request):
        count = await self._mark_all_read()
        await self.send_frame(self._reply("ack", request, op="mark_all_read", unread_count=count))

    async def _violation(self, code: str, message: str, request_id=None):
        """A limit was exceeded: an error frame; the connection is closed (4029) if it goes on."""
        self.violations += 1
        if self.violations > protocol.MAX_VIOLATIONS:
            await self.send_frame(protocol.error_frame(code, "Too many limit violations; closing.", request_id))
            await self.close(code=protocol.CLOSE_RATE_LIMITED, reason="limits exceeded")
            return
        await self.send_frame(protocol.error_frame(code, message, request_id))

    # Events for this user from the hub (sent by notifications.push)

    def stream_user_event(self, outbox: Outbox, event: dict) -> None:
        """Apply a per-user event; frames go through the outbox, in order with notifications."""
        op = event.get("op")
        if op == "frame":
            outbox.put_live(event["frame"])  # (before hello, it waits: hello is always the first frame)
        elif op == "follow":
            asyncio.get_running_loop().create_task(self._followed_elsewhere(outbox, event["topic_id"], event["topic"]))
        elif op == "unfollow":
            topic_id, slug = event["topic_id"], event["topic"]
            if self.hub.unfollow(outbox, topic_id) and slug not in self.own_topic_requests:
                outbox.put_live(protocol.encode({"type": "unsubscribed", **self._topic_fields(topic_id, slug)}))
                outbox.put_live(self._update_presence)
        elif op == "close":
            if event.get("token_id") is not None and event["token_id"] != self.scope.get("auth_token_id"):
                return
            session = event.get("session")
            mine = (ALL_SESSIONS, self.scope.get("auth_session"))
            if session is not None and (self.scope.get("auth_method") != "session" or session not in mine):
                return
            error = event.get("error") or protocol.DISCONNECTED
            self.queue_close(event["code"], event["reason"], error=(error, event["reason"]))

    async def _followed_elsewhere(self, outbox: Outbox, topic_id: int, slug: str) -> None:
        """The user followed a topic from another connection or the REST API: read it here too."""
        try:
            routed = await self._route_topic(outbox, topic_id, slug)
        except Exception as exc:  # the group cannot be joined now: the next connect reads the topic
            store_failures.failure("cannot route a followed topic to a connection", exc)
            return
        if routed and slug not in self.own_topic_requests:
            outbox.put_live(protocol.encode({"type": "subscribed", **self._topic_fields(topic_id, slug, offset=True)}))
            outbox.put_live(self._update_presence)

    def stream_topic_event(self, outbox: Outbox, event: dict) -> None:
        """A topic routed to this socket was renamed (the socket follows it under its new slug: its
        stream is the same) or deleted (the socket no longer follows it); the client hears an
        ``unsubscribed`` frame for the old slug, then, for a rename, a ``subscribed`` frame for the new."""
        topic_id, op = event["topic_id"], event["op"]
        old_slug = outbox.topics.get(topic_id)
        if old_slug is None:
            return
        outbox.put_live(protocol.encode({"type": "unsubscribed", **self._topic_fields(topic_id, old_slug)}))
        if op == "renamed":
            outbox.topics[topic_id] = event["topic"]
            outbox.put_live(protocol.encode({"type": "subscribed", **self._topic_fields(topic_id, event["topic"],
                                                                                   offset=True)}))
        else:
            self.hub.unfollow(outbox, topic_id)
        outbox.put_live(self._update_presence)

    def close_replaced(self) -> None:
        """This is the user's oldest connection and a new one went over the limit: close this one (4005)."""
        message = f"More than {self.max_connections} connections for this user: the oldest is closed."
        error = (protocol.TOO_MANY_CONNECTIONS, message)
        self.queue_close(protocol.CLOSE_REPLACED, "too many connections", error=error)

    def queue_close(self, code: int, reason: str, *, error: tuple[str, str] | None = None) -> None:
        """Close after the frames already queued (optionally after an error frame saying why)."""
        if error is not None:
            self.outbox.put(protocol.encode(protocol.error_frame(*error)))

        async def close():
            await self.close(code=code, reason=reason)

        self.outbox.put(close)

    # Resume

    async def _resume(self, since: dict[str, int], *, epoch: str | None, request_id):
        """A ``resume`` frame: replay what this connection has not seen after ``since`` (up to where
        it started reading each stream; later notifications it has had live)."""
        if self.resumed:
            raise ProtocolError(protocol.INVALID, "This connection has already resumed.", request_id)
        self.resumed = True
        self.outbox.holding = True
        # Delivered up to here (and counted by the client); later live frames are held and add one each.
        delivered = {stream: self.hub.position(stream, default) for stream, default in self.positions.items()}
        outcome = await self._replay(since, epoch, count_through=delivered)
        self._finish_resume(outcome, request_id=request_id, cursor=delivered)

    def _finish_resume(self, outcome: dict, *, request_id, cursor: dict[str, int] | None = None) -> None:
        """Queue the replayed notifications, then ``resumed`` (with the connection's cursor) and the
        unread count, then the live notifications held meanwhile."""
        outbox = self.outbox
        metrics.resumed(outcome)
        # Where the client is once this is sent: where the connection started reading, or (a
        # resume frame) what it has had live since.
        cursor = dict(cursor or self.positions)
        if outcome["recovered"]:
            rows = outcome.pop("rows")
            for notification in rows:
                outbox.put(protocol.encode(protocol.notification_frame(notification, is_read=notification.is_read)))
                if self.hub is not None:
                    self.hub.note_replayed(outbox.user_id, streams.stream_of(notification), notification.offset)
            skip = outcome.pop("skip")
            outbox.skip = skip or None
            cursor = resume.cursor_after(cursor, rows) | skip
        unread = outcome.pop("unread_count")
        resumed = {"type": "resumed", **outcome, "cursor": cursor}
        if request_id is not None:
            resumed["id"] = request_id
        outbox.put(protocol.encode(resumed))
        outbox.put(protocol.encode({"type": "unread_count", "count": unread}))
        outbox.release()  # the live frames held meanwhile: all after the cursor in `resumed`

    @database_sync_to_async
    def _replay(self, since: dict[str, int], epoch: str | None, *, count_through: dict[str, int] | None = None) -> dict:
        result = resume.outcome(self.user, since, epoch, self.positions, self.hub.epoch)
        # Up to what the client has had (the live frames held meanwhile follow `resumed` and add one each).
        result["unread_count"] = selectors.unread_count_for(self.user, through=count_through or self.positions)
        return result

    # Helpers

    async def send_frame(self, frame: dict):
        connection_events.frame_out(self, frame)
        await self.send(text_data=protocol.encode(frame))

    @staticmethod
    def _reply(kind: str, request, **fields) -> dict:
        frame = {"type": kind, **fields}
        if request.id is not None:
            frame["id"] = request.id
        return frame

    def _presence_record(self, topics) -> Connection:
        return Connection(
            id=self.connection_id,
            user_id=self.user.pk,
            username=self.user.get_username(),
            since=time.time(),
            ip=scope_client_ip(self.scope),
            user_agent=scope_headers(self.scope).get("user-agent", "")[:300],
            server=server_id(),
            topics=sorted(topics),
        )

    async def _update_presence(self):
        await get_presence().update_topics(self.connection_id, sorted(self.outbox.topics.values()))

    @database_sync_to_async
    def _followed_topics(self, user) -> dict[int, str]:
        return selectors.followed_topics(user)

    @database_sync_to_async
    def _unread_count(self, through: dict[str, int]) -> int:
        return selectors.unread_count_for(self.user, through=through)

    def _topic(self, slug: str, request_id) -> Topic:
        topic = Topic.objects.filter(slug=slug).first()
        if topic is None:
            raise ProtocolError(protocol.NOT_FOUND, f"No topic {slug!r}.", request_id)
        return topic

    @database_sync_to_async
    def _follow(self, slug: str, request_id) -> Topic:
        topic = self._topic(slug, request_id)
        try:
            services.topic_follow(user=self.user, topic=topic)
        except PermissionDenied as exc:
            raise ProtocolError(protocol.FORBIDDEN, str(exc), request_id) from None
        return topic

    @database_sync_to_async
    def _unfollow(self, slug: str, request_id) -> Topic:
        topic = self._topic(slug, request_id)
        services.topic_unfollow(user=self.user, topic=topic)
        return topic

    @database_sync_to_async
    def _mark_read(self, ids, request_id) -> int:
        try:
            return services.notification_mark_read(user=self.user, ids=ids)
        except Notification.DoesNotExist as exc:
            raise ProtocolError(protocol.NOT_FOUND, str(exc), request_id) from None

    @database_sync_to_async
    def _mark_all_read(self) -> int:
        return services.notification_mark_all_read(user=self.user)


def _resume_request(query: dict) -> dict[str, int] | None:
    """``?since=<cursor>`` in the URL asks for a resume before any live frame."""
    if "since" not in query:
        return None
    return protocol.parse_cursor(query["since"][0])
