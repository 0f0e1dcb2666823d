"""The product's ASGI application with one or more experimental changes, for measuring levers.

    BENCH_VARIANT=nosession,basesend uvicorn bench.variants:application ...

``bench/run.py --targets product-v:nosession+basesend`` starts it. Nothing here is used in
production; the variants that the numbers justified were made in the application code
(docs/performance.md, "Levers").

- ``nosession``: Channels' ``SessionMiddleware`` without its wrapper around every ``send``
  (the wrapper checks whether the session changed on every frame).
- ``basesend``: the outbox writes with the consumer's ASGI ``base_send`` directly instead of
  ``consumer.send(text_data=...)`` (two coroutine layers fewer per frame).
- ``direct``: no writer task per socket: the hub awaits every socket's ``send`` in turn (one
  task per notification). Only to measure what the per-socket task costs: one socket whose
  transport is full stalls every other socket behind it.
- ``threadpool``: ``database_sync_to_async`` runs in a pool of threads instead of the one
  shared thread (``thread_sensitive=False``), for the connect path.
"""

import asyncio
import os

VARIANTS = set(filter(None, os.environ.get("BENCH_VARIANT", "").replace("+", ",").split(",")))

if "nosession" in VARIANTS:
    from channels import sessions

    async def _call(self, scope, receive, send):
        wrapper = sessions.InstanceSessionWrapper(scope, send)
        await wrapper.resolve_session()
        return await self.inner(wrapper.scope, receive, send)

    sessions.SessionMiddleware.__call__ = _call

if "threadpool" in VARIANTS:
    from channels import db

    _init = db.DatabaseSyncToAsync.__init__

    def _unsensitive(self, func, thread_sensitive=True, executor=None):
        _init(self, func, thread_sensitive=False, executor=executor)

    db.DatabaseSyncToAsync.__init__ = _unsensitive

from project.asgi import application  # noqa: E402

from notifications import hub  # noqa: E402

if "basesend" in VARIANTS:

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        send = self.consumer.base_send
        while True:
            while self.queue:
                item = self.queue.popleft()
                if isinstance(item, str):
                    await send({"type": "websocket.send", "text": item})
                else:
                    await item()
            self._wakeup = loop.create_future()
            await self._wakeup

    hub.Outbox._write = _write

if "direct" in VARIANTS:

    async def _send_all(targets, notification_id, frame):
        message = {"type": "websocket.send", "text": frame}
        for outbox in targets:
            if not outbox.closed and notification_id > outbox.last_id and not outbox.replaying:
                outbox.last_id = notification_id
                await outbox.consumer.base_send(message)

    def _deliver(self, message):
        audience, _, key = message["group"].partition(".")
        if audience == "user":
            targets = self.by_user.get(int(key), ())
        elif audience == "topic":
            targets = self.by_topic.get(key, ())
        else:
            targets = self.everyone
        asyncio.get_running_loop().create_task(_send_all(list(targets), message["id"], message["frame"]))

    hub.Hub._deliver = _deliver

__all__ = ["application"]


class _Resumed:
    """Awaitable that finishes a coroutine started by hand (``coro.send(None)``) that suspended on
    ``pending``: the awaiting task waits for each future the coroutine yields, exactly as if it had
    awaited the coroutine from the start."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro, pending):
        self.coro, self.pending = coro, pending

    def __await__(self):
        pending = self.pending
        while True:
            try:
                yield pending
            except BaseException as exc:  # cancelled while waiting: let the coroutine clean up
                try:
                    pending = self.coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                pending = self.coro.send(None)
            except StopIteration as stop:
                return stop.value


if "eager" in VARIANTS:

    def put(self, item) -> None:
        if self.closed:
            return
        wakeup = self._wakeup
        if type(item) is str and not self.queue and wakeup is not None and not wakeup.done():
            # The writer is parked with nothing queued: write now, in the caller's step.
            coro = self.consumer.base_send({"type": "websocket.send", "text": item})
            try:
                pending = coro.send(None)
            except StopIteration:
                return
            except Exception:
                self.closed = True  # the connection is gone; its disconnect unregisters it
                return
            item = _Resumed(coro, pending)  # not writable now: the writer finishes this send first
        self.queue.append(item)
        if len(self.queue) > self.max_frames:
            self.overflow()
            return
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _write_eager(self) -> None:
        loop = asyncio.get_running_loop()
        send = self.consumer.base_send
        while True:
            while self.queue:
                item = self.queue.popleft()
                if type(item) is str:
                    await send({"type": "websocket.send", "text": item})
                elif type(item) is _Resumed:
                    await item
                else:
                    await item()
            self._wakeup = loop.create_future()
            await self._wakeup

    hub.Outbox.put = put
    hub.Outbox._write = _write_eager
