"""The product's ASGI application with one or more experimental changes, for measuring levers.

    BENCH_VARIANT=nosession,basesend uvicorn bench.variants:application ...

``bench/run.py --targets product-v:nosession+basesend`` starts it. Nothing here is used in
production; the variants that the numbers justified were made in the application code
(docs/performance.md, "Levers").

- ``nosession``: Channels' ``SessionMiddleware`` without its wrapper around every ``send``
  (the wrapper checks whether the session changed on every frame).
- ``basesend``: the outbox writes with the consumer's ASGI ``base_send`` directly instead of
  ``consumer.send(text_data=...)`` (two coroutine layers fewer per frame).
- (``eager``, writing a frame at once when the socket's writer is idle, is now the product's own
  ``Outbox.put``.)
- ``direct``: no writer task per socket: the hub awaits every socket's ``send`` in turn (one
  task per notification; a socket still holding its live frames, before hello or during a
  replay, gets them through its outbox as in the product). Only to measure what the per-socket
  task costs: one socket whose transport is full stalls every other socket behind it.
- ``tracemalloc``: SIGUSR1 marks, SIGUSR2 writes the Python allocations since the mark by line
  (what an idle connection holds).
- ``threadpool``: ``database_sync_to_async`` runs in a pool of threads instead of the one
  shared thread (``thread_sensitive=False``), for the connect path.
- ``before``: the product as it was before issue 9's changes (Channels' session wrapper on
  every ``send``; the outbox wakes its writer task for every frame; the throttle's cache is
  Django's per-context one), to measure them.
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

if "before" in VARIANTS:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    django.setup()
    from channels.sessions import SessionMiddleware

    from notifications import auth

    auth.ReadOnlySessionMiddleware.__call__ = SessionMiddleware.__call__

    from django.core.cache import cache

    from notifications import rate_limits

    rate_limits._cache = lambda: cache  # Django's per-context cache: a Redis connection per socket

from project.asgi import application  # noqa: E402, I001 (sets Django up: before any app module)
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
    import time

    from notifications import metrics

    async def _send_all(targets, stream, offset, frame):
        message = {"type": "websocket.send", "text": frame}
        for outbox in targets:
            if outbox.closed or (outbox.skip is not None and offset <= outbox.skip.get(stream, 0)):
                continue  # gone, or a resumed client that already has it
            if outbox.holding:  # before hello, or during a replay: held as in the product
                outbox.offer(stream, offset, frame)
            else:
                await outbox.consumer.base_send(message)

    def _deliver(self, message):
        stream, offset, frame = message["stream"], message["offset"], message["frame"]
        targets = list(self.registry.readers(stream))
        asyncio.get_running_loop().create_task(_send_all(targets, stream, offset, frame))
        metrics.delivered(len(targets), message.get("t"), time.time())

    hub.Hub._deliver = _deliver

__all__ = ["application"]


if "tracemalloc" in VARIANTS:
    # SIGUSR1: remember the allocations now; SIGUSR2: write what was allocated since, by line,
    # to $BENCH_TRACEMALLOC_OUT (memory per idle connection, docs/performance.md).
    import signal
    import tracemalloc

    tracemalloc.start(1)
    _snapshots = {}

    def _mark(*_):
        _snapshots["base"] = tracemalloc.take_snapshot()

    def _report(*_):
        stats = tracemalloc.take_snapshot().compare_to(_snapshots["base"], "lineno")
        with open(os.environ.get("BENCH_TRACEMALLOC_OUT", "bench/results/tmp/tracemalloc.txt"), "w") as out:
            out.write(f"total {sum(s.size_diff for s in stats)} bytes\n")
            for stat in stats[:60]:
                out.write(f"{stat}\n")

    signal.signal(signal.SIGUSR1, _mark)
    signal.signal(signal.SIGUSR2, _report)
