"""The per-process hub: one channel-layer channel per server process, fanned out locally.

Every push goes to the channel-layer group ``stream``, which has one member per server
process: the hub's channel. The hub receives each message once, and hands the same
pre-encoded frame to the outbox of every local socket in its audience. The channel
layer (Redis across processes and machines) carries one copy per process, not one per
socket, and no socket's channel can fill up or expire.

Ordering and gaps: notification ids are gap-free and committed in id order (see
``models.Stream``), so the hub knows which id comes next. It delivers in id order;
a message that arrives early waits briefly for the missing ones, which are then read
from the database. A message lost on the way (Redis restarted, a send that failed) is
found the same way, by a periodic look at the stream head. So every connected socket
receives every notification of its audience exactly once, in order, unless its own
outbox overflows (then it is closed with 4008 and resumes).
"""

import asyncio
import logging
import time
import weakref
from collections import deque

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from . import metrics, protocol, selectors
from .throttled_log import ThrottledLog

logger = logging.getLogger(__name__)
failures = ThrottledLog(logger)

STREAM_GROUP = "stream"


class Outbox:
    """One socket's bounded queue of outgoing frames, written by its own task in order.

    ``topics`` maps the id of each topic routed to this socket to its slug (routing is by id: a
    topic deleted and created again under the same slug is another topic).
    ``last_id`` is the newest notification id accepted for this socket: the socket's cursor.
    While ``replaying`` (a resume is reading the store), live notifications wait in
    ``held`` and are released, minus the ones the replay already sent, afterwards.
    """

    def __init__(self, consumer, *, user_id: int, topics, max_frames: int):
        self.consumer = consumer
        self.user_id = user_id
        self.topics: dict[int, str] = dict(topics)
        self.max_frames = max_frames
        self.last_id = 0
        self.replaying = False
        self.held: list[tuple[int, str]] = []
        self.queue: deque = deque()
        self.closed = False
        self.opened_at = time.monotonic()
        self._wakeup: asyncio.Future | None = None
        self.task = asyncio.get_running_loop().create_task(self._write())

    def offer(self, notification_id: int, frame: str) -> None:
        """Queue a notification frame unless this socket already has it."""
        if self.closed or notification_id <= self.last_id:
            return
        if self.replaying:
            self.held.append((notification_id, frame))
            if len(self.held) > self.max_frames:
                self.overflow()
            return
        self.last_id = notification_id
        self.put(frame)

    def put(self, item) -> None:
        """Queue a frame (str) or a coroutine function to run in order with the frames.

        A frame for an idle socket (writer parked, nothing queued) is written at once, in the
        caller's step: waking a task per socket per notification cost about a third of a
        broadcast's CPU (docs/performance.md). If that write has to wait (the transport is
        full), the writer task finishes it before anything queued after it."""
        if self.closed:
            return
        wakeup = self._wakeup
        if type(item) is str and not self.queue and wakeup is not None and not wakeup.done():
            send = self.consumer.send(text_data=item)
            try:
                pending = send.send(None)
            except StopIteration:
                return
            except Exception:  # the connection is gone; its disconnect unregisters it
                self.closed = True
                return
            item = _Resumed(send, pending)
        self.queue.append(item)
        if len(self.queue) > self.max_frames:
            self.overflow()
            return
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def release(self, replayed_through: int) -> None:
        """End a replay: the store was read through ``replayed_through``; send what was held."""
        self.last_id = max(self.last_id, replayed_through)
        self.replaying = False
        held, self.held = self.held, []
        for notification_id, frame in held:
            self.offer(notification_id, frame)

    def overflow(self) -> None:
        """The client does not read fast enough: close it (4008) so it reconnects and resumes."""
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.held.clear()
        metrics.slow_consumer()
        logger.warning("closing slow connection of user %s: more than %d frames queued", self.user_id,
                       self.max_frames)
        self.task.cancel()
        asyncio.get_running_loop().create_task(
            self.consumer.close(code=protocol.CLOSE_SLOW_CONSUMER, reason="slow consumer")
        )

    def stop(self) -> None:
        self.closed = True
        self.task.cancel()

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.queue:
                item = self.queue.popleft()
                if type(item) is str:
                    await self.consumer.send(text_data=item)
                elif type(item) is _Resumed:
                    await item
                else:
                    await item()
            self._wakeup = loop.create_future()
            await self._wakeup


class _Resumed:
    """A send started by ``Outbox.put`` that had to wait: awaiting this finishes it, waiting
    for each future it waits for, as if it had been awaited from the start."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro, pending):
        self.coro, self.pending = coro, pending

    def __await__(self):
        pending = self.pending
        while True:
            try:
                yield pending
            except BaseException as exc:  # cancelled (the socket closes): let the send clean up
                try:
                    pending = self.coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                pending = self.coro.send(None)
            except StopIteration as stop:
                return stop.value


class Hub:
    """This process's single subscription to the stream, and its index of local sockets."""

    def __init__(self, layer):
        self.layer = layer
        self.channel: str | None = None
        self.next_id = 1
        self.epoch = ""
        self.pending: dict[int, dict] = {}
        self.by_user: dict[int, set[Outbox]] = {}
        self.by_topic: dict[int, set[Outbox]] = {}
        self.everyone: set[Outbox] = set()
        self.started: asyncio.Future | None = None
        self.tasks: list[asyncio.Task] = []
        self.healthy = True
        self.last_message_at = time.monotonic()
        options = settings.NOTIFICATIONS
        self.gap_wait = options["HUB_GAP_WAIT"]
        self.sync_interval = options["HUB_SYNC_INTERVAL"]
        self._fill_lock = asyncio.Lock()
        self._gap_timer: asyncio.TimerHandle | None = None

    # Lifecycle

    async def start(self) -> None:
        """Subscribe this process to the stream (once; concurrent callers wait for the first)."""
        if self.started is None:
            self.started = asyncio.get_running_loop().create_future()
            try:
                self.channel = await self.layer.new_channel()
                await self.layer.group_add(STREAM_GROUP, self.channel)
                head, self.epoch = await database_sync_to_async(selectors.stream_state)()
                self.next_id = head + 1
            except BaseException as exc:
                self.started.set_exception(exc)
                self.started.exception()  # retrieved: later callers re-raise it themselves
                self.started = None
                raise
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._receive()), loop.create_task(self._sync())]
            self.started.set_result(None)
        await self.started

    # Local sockets

    def register(self, outbox: Outbox) -> int:
        """Start delivering to ``outbox``; return the cursor it starts after."""
        self.everyone.add(outbox)
        self.by_user.setdefault(outbox.user_id, set()).add(outbox)
        for topic_id in outbox.topics:
            self.by_topic.setdefault(topic_id, set()).add(outbox)
        cursor = self.next_id - 1
        if not outbox.replaying:
            outbox.last_id = cursor
        return cursor

    def unregister(self, outbox: Outbox) -> None:
        outbox.stop()
        self.everyone.discard(outbox)
        _discard(self.by_user, outbox.user_id, outbox)
        for topic_id in outbox.topics:
            _discard(self.by_topic, topic_id, outbox)

    def follow(self, outbox: Outbox, topic_id: int, slug: str) -> bool:
        """Route the topic to this socket; False if it already was."""
        if topic_id in outbox.topics:
            return False
        outbox.topics[topic_id] = slug
        self.by_topic.setdefault(topic_id, set()).add(outbox)
        return True

    def unfollow(self, outbox: Outbox, topic_id: int, slug: str = "") -> bool:
        if topic_id not in outbox.topics:
            return False
        del outbox.topics[topic_id]
        _discard(self.by_topic, topic_id, outbox)
        return True

    def topic_sockets(self, topic_id: int) -> list[Outbox]:
        """The local sockets the topic is routed to."""
        return list(self.by_topic.get(topic_id, ()))

    def connection_count(self) -> int:
        return len(self.everyone)

    def oldest_over_limit(self, user_id: int, limit: int) -> list[Outbox]:
        """The user's oldest local connections beyond ``limit`` (to be closed for the newest)."""
        mine = sorted(self.by_user.get(user_id, ()), key=lambda outbox: outbox.opened_at)
        return mine[: max(0, len(mine) - limit)]

    # Receiving

    async def _receive(self) -> None:
        backoff = 0.1
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.failure("channel layer receive failed, retrying", exc)
                self.healthy = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                await self._resubscribe()
                continue
            backoff = 0.1
            self.last_message_at = time.monotonic()
            try:
                await self.dispatch(message)
            except Exception:
                logger.exception("hub failed to dispatch a %s message", message.get("type"))

    async def _resubscribe(self) -> None:
        """After a channel-layer failure: join the stream again, then read what was missed."""
        try:
            await self.layer.group_add(STREAM_GROUP, self.channel)
        except Exception:
            return
        if not self.healthy:
            failures.recovered("channel layer receive failed, retrying")
            self.healthy = True
        await self.fill_from_store()

    async def _sync(self) -> None:
        """Every ``sync_interval``: renew the group membership (channels-redis expires it) and
        look at the stream head, to find notifications whose push was lost."""
        seen_head = None
        renew_every = max(1, int(getattr(self.layer, "group_expiry", 86400) / 2 / self.sync_interval))
        ticks = 0
        while True:
            await asyncio.sleep(self.sync_interval)
            ticks += 1
            try:
                if ticks % renew_every == 0:
                    await self.layer.group_add(STREAM_GROUP, self.channel)
                # Delivered before the query: committed before it, so head >= this. (Messages
                # delivered while the query runs may be newer than the head it reads.)
                delivered_through = self.next_id - 1
                head, epoch = await database_sync_to_async(selectors.stream_state)()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures.failure("hub sync with the store failed", exc)
                continue
            failures.recovered("hub sync with the store failed")
            if not self.epoch:
                self.epoch = epoch  # the stream row did not exist yet when this hub started
            if epoch != self.epoch or head < delivered_through:
                self.reset(head, epoch)
                seen_head = None
                continue
            # A head seen one interval ago that is still not delivered was lost on the way.
            if seen_head is not None and seen_head >= self.next_id:
                await self.fill_from_store(through=seen_head)
            seen_head = head if head >= self.next_id else None

    async def dispatch(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "stream.notification":
            self._sequence(message)
        elif kind == "stream.user":
            self._to_user(message)
        elif kind == "stream.topic":
            self._to_topic(message)
        else:
            logger.warning("hub ignored a message of type %r", kind)

    def _sequence(self, message: dict) -> None:
        notification_id = message["id"]
        if notification_id < self.next_id:
            return  # already delivered (from the store, or a duplicate)
        self.pending[notification_id] = message
        self._drain()
        if self.pending and self._gap_timer is None:
            loop = asyncio.get_running_loop()
            self._gap_timer = loop.call_later(self.gap_wait, lambda: loop.create_task(self._fill_gap()))

    def _drain(self) -> None:
        while self.next_id in self.pending:
            self._deliver(self.pending.pop(self.next_id))
            self.next_id += 1

    async def _fill_gap(self) -> None:
        self._gap_timer = None
        if self.pending:
            await self.fill_from_store(through=max(self.pending) - 1)

    async def fill_from_store(self, through: int | None = None) -> None:
        """Deliver, in order, the notifications up to ``through`` (default: the head) that never arrived.

        If the store cannot be read, nothing is skipped: the next sync or gap tries again."""
        async with self._fill_lock:
            try:
                if through is None:
                    through = await database_sync_to_async(selectors.stream_head)()
                if through < self.next_id:
                    return
                rows = await database_sync_to_async(selectors.stream_messages)(self.next_id, through)
            except Exception as exc:
                failures.failure("hub could not read missed notifications from the store", exc)
                return
            failures.recovered("hub could not read missed notifications from the store")
            logger.info("hub read %d notification(s) %d..%d from the store", len(rows), self.next_id, through)
            metrics.store_read(len(rows))
            for message in rows:
                if message["id"] >= self.next_id:
                    self.pending.setdefault(message["id"], message)
            # Ids with no row were deleted (cascade): nothing to deliver, skip them.
            while self.next_id <= through:
                if self.next_id in self.pending:
                    self._deliver(self.pending.pop(self.next_id))
                self.next_id += 1
            self._drain()

    def _deliver(self, message: dict) -> None:
        audience, _, key = message["group"].partition(".")
        if audience == "user":
            targets = self.by_user.get(int(key), ())
        elif audience == "topic":
            # By the topic's id; a slug (a message from a process of an older version) routes nowhere.
            targets = self.by_topic.get(int(key), ()) if key.isdigit() else ()
        else:
            targets = self.everyone
        notification_id, frame = message["id"], message["frame"]
        for outbox in list(targets):
            outbox.offer(notification_id, frame)
        metrics.delivered(len(targets), message.get("t"), time.time())  # one call per notification

    def reset(self, head: int, epoch: str) -> None:
        """The store was replaced or went back (a restore, a failover that lost commits): cursors
        no longer match it. Start over from its head and close every local connection (4012) so
        each client reconnects and resumes (and learns that it must reload)."""
        logger.warning("the notification stream was reset (epoch %s -> %s, head %d, expected %d); "
                       "closing %d connection(s)", self.epoch, epoch, head, self.next_id - 1, len(self.everyone))
        self.epoch, self.next_id = epoch, head + 1
        self.pending.clear()
        for outbox in list(self.everyone):
            outbox.consumer.queue_close(protocol.CLOSE_STREAM_RESET, "stream reset: reconnect and resume")

    def _to_user(self, message: dict) -> None:
        metrics.user_event(len(self.by_user.get(message["user"], ())))
        for outbox in list(self.by_user.get(message["user"], ())):
            outbox.consumer.stream_user_event(outbox, message)

    def _to_topic(self, message: dict) -> None:
        """A topic was renamed or deleted: every local socket it is routed to applies the change."""
        for outbox in self.topic_sockets(message["topic_id"]):
            outbox.consumer.stream_topic_event(outbox, message)

    async def stop(self) -> None:
        """Leave the stream and stop receiving (the process is shutting down)."""
        for task in self.tasks:
            task.cancel()
        if self.channel is not None:
            await self.layer.group_discard(STREAM_GROUP, self.channel)


def _discard(index: dict, key, outbox: Outbox) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(outbox)
        if not members:
            del index[key]


_hubs: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub]" = weakref.WeakKeyDictionary()


async def get_hub() -> Hub:
    """This event loop's hub, started (subscribed to the stream)."""
    loop = asyncio.get_running_loop()
    layer = get_channel_layer()
    hub = _hubs.get(loop)
    if hub is None or hub.layer is not layer:
        if hub is not None:
            for task in hub.tasks:
                task.cancel()
        hub = _hubs[loop] = Hub(layer)
    await hub.start()
    return hub


async def shutdown_hubs() -> None:
    """Stop this process's hubs (on ASGI lifespan shutdown)."""
    for hub in list(_hubs.values()):
        await hub.stop()
    _hubs.clear()
