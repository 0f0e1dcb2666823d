"""A socket's bounded outbox: the per-socket part of the fan-out, thin and bounded.

The hub hands each frame to the outboxes of the local sockets in its audience and moves on;
each outbox is written by its socket's own task, so one slow socket never stalls the others.
An outbox over ``WS_MAX_QUEUED_FRAMES`` closes its socket with 4008 (the client resumes).
"""

import asyncio
import logging
import time
from collections import deque

from . import metrics, protocol
from .streams import BROADCAST, topic_stream, user_stream

logger = logging.getLogger(__name__)


class Outbox:
    """One socket's bounded queue of outgoing frames, written by its own task in order.

    ``topics`` maps the id of each topic routed to this socket to its slug (routing is by id: a
    topic deleted and created again under the same slug is another topic). While ``holding`` (the
    connection has not said hello yet, or a resume is reading the store), live notifications wait
    in ``held`` and are sent after the replay. ``skip`` (set only by a resume whose cursor is
    ahead of this process) drops live notifications the client already has.
    """

    def __init__(self, consumer, *, user_id: int, topics, max_frames: int):
        self.consumer = consumer
        self.user_id = user_id
        self.topics: dict[int, str] = dict(topics)
        self.max_frames = max_frames
        self.holding = False
        self.held: list = []  # frames, and coroutine functions to run in order with them
        self.skip: dict[str, int] | None = None
        self.queue: deque = deque()
        self.closed = False
        self.opened_at = time.monotonic()
        self._wakeup: asyncio.Future | None = None
        self.task = asyncio.get_running_loop().create_task(self._write())

    def streams(self) -> list[str]:
        """The streams this socket reads: the user's own, the broadcast stream, each followed topic's."""
        return [user_stream(self.user_id), BROADCAST, *(topic_stream(topic_id) for topic_id in self.topics)]

    def offer(self, stream: str, offset: int, frame: str) -> None:
        """Queue a live notification frame (the hub hands each offset of a stream once, in order)."""
        if self.closed or (self.skip is not None and offset <= self.skip.get(stream, 0)):
            return
        self.put_live(frame)

    def put_live(self, item) -> None:
        """Queue a live frame (a notification, ``unread_count``, ``unsubscribed``...) or a coroutine
        function: while ``holding``, it waits in ``held`` until hello (or the replay) went out."""
        if self.holding:
            self.held.append(item)
            if len(self.held) > self.max_frames:
                self.overflow()
            return
        self.put(item)

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

    def release(self) -> None:
        """Send the live notifications held back (after hello, or after a replay)."""
        self.holding = False
        held, self.held = self.held, []
        for frame in held:
            self.put(frame)

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
