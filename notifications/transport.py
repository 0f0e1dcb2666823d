"""Publishing to the channel layer from any thread: one event loop per process, bounded waits.

``async_to_sync(layer.group_send)`` from synchronous code (a WSGI view, a script, a Celery
task, a management command) builds a new event loop per call, and channels-redis keeps its
connections per loop: every send opened a new Redis connection (100 sends, 100 connections:
tests/test_transport.py).
Here every publish of a process runs on one event loop in a daemon thread, started on first
use (and again in a child after a fork), so the process keeps one set of connections.

``publish`` never raises and never blocks its caller for more than ``PUSH_TIMEOUT`` seconds
(``NOTIFICATIONS["PUSH_TIMEOUT"]``, default 1.0): then it cancels that batch, logs once per outage,
counts ``notifications_push_failures_total`` and returns. The notification is already
stored; every hub reads lost pushes from the store. Called from async code (a running event
loop in this thread), it schedules the batch and returns at once. Batches leave one at a
time, in the order they were handed over. At interpreter exit, pushes still in flight get up
to ``PUSH_TIMEOUT`` to finish.

Batches handed over while one is in flight leave together, as one batch (``BackgroundLoop._drain``), and on
channels-redis' core layer a batch costs two pipelined round trips per Redis host, whatever
its size (``group_send_many``), where ``group_send`` takes four per message: under load the
work per push falls as the pushes queue (docs/performance.md, "Sends from Django code").

The in-memory layer (tests, a single process) keeps ``async_to_sync``: its queues are plain
``asyncio.Queue`` objects that wake the receiving loop with non-thread-safe calls, so a
message put from another loop's thread never wakes a hub waiting on its own loop.
``async_to_sync`` runs the send on the caller's outer loop (the hub's) when there is one.
"""

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Sequence
from functools import partial

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer

from . import conf, metrics
from .layers import channel_layer
from .outage_log import OutageLog

logger = logging.getLogger(__name__)
failures = OutageLog(logger)
FAILED = "push failed (stored; hubs will read it from the store)"

Messages = Sequence[tuple[str, dict]]


def push_timeout() -> float:
    return float(conf.settings.PUSH_TIMEOUT)


def publish(messages: Messages) -> None:
    """``group_send`` each ``(group, message)``, in order, on the default channel layer."""
    messages = list(messages)
    if not messages:
        return
    try:
        _publish(messages)
    except Exception as exc:  # never raise to a sender: the notification is stored
        _account(exc, None)


def _publish(messages: Messages) -> None:
    layer = channel_layer()
    if layer is None:
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if isinstance(layer, InMemoryChannelLayer):
        _publish_in_memory(layer, messages, running)
        return
    timeout = push_timeout()
    future = _background().submit(layer, messages, timeout)
    if running is not None:
        return  # async code: never block its loop; the batch times out by itself
    try:
        future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
    except (Exception, concurrent.futures.CancelledError):  # noqa: S110 - counted and logged by _account_done
        pass


async def _send(layer, messages: Messages, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        await group_send_many(layer, messages)


async def group_send_many(layer, messages: Messages) -> None:
    """``group_send`` of each ``(group, message)``, in order."""
    if isinstance(layer, RedisChannelLayer):
        await _redis_group_send_many(layer, messages)
        return
    for group, message in messages:
        await layer.group_send(group, message)


async def group_add_many(layer, groups: Sequence[str], channel: str | None) -> None:
    """``group_add(group, channel)`` for each group: on channels-redis' core layer the same
    ``ZADD`` and ``EXPIRE``, in one pipeline per Redis host (a burst of handshakes joins many
    users' streams at once; one call per group held a pooled connection each, and ran out)."""
    await _membership_many(layer, groups, channel, join=True)


async def group_discard_many(layer, groups: Sequence[str], channel: str | None) -> None:
    """``group_discard(group, channel)`` for each group (the same ``ZREM``), likewise."""
    await _membership_many(layer, groups, channel, join=False)


def _groups_by_host(layer: RedisChannelLayer, groups: Sequence[str]) -> dict[int, list[str]]:
    """Each group once, under the index of the Redis host that holds it (channels-redis'
    ``consistent_hash``); a bad name raises ``TypeError``, as ``group_add``/``group_send`` do."""
    by_host: dict[int, list[str]] = collections.defaultdict(list)
    for group in dict.fromkeys(groups):
        layer.require_valid_group_name(group)
        by_host[layer.consistent_hash(group)].append(group)
    return by_host


async def _membership_many(layer, groups: Sequence[str], channel: str | None, *, join: bool) -> None:
    if not isinstance(layer, RedisChannelLayer):
        for group in groups:
            await (layer.group_add if join else layer.group_discard)(group, channel)
        return
    layer.require_valid_channel_name(channel)
    by_host = _groups_by_host(layer, groups)

    async def change(index: int, mine: list[str]) -> None:
        pipe = layer.connection(index).pipeline(transaction=False)
        for group in mine:
            key = layer._group_key(group)
            if join:
                pipe.zadd(key, {channel: time.time()})
                pipe.expire(key, layer.group_expiry)
            else:
                pipe.zrem(key, channel)
        await pipe.execute()

    await asyncio.gather(*(change(index, mine) for index, mine in by_host.items()))


# channels-redis 4.3's group_send script: each channel's copy, unless the channel is at capacity.
GROUP_SEND_LUA = """
    local over_capacity = 0
    local current_time = ARGV[#ARGV - 1]
    local expiry = ARGV[#ARGV]
    for i=1,#KEYS do
        if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[i + #KEYS]) then
            redis.call('ZADD', KEYS[i], current_time, ARGV[i])
            redis.call('EXPIRE', KEYS[i], expiry)
        else
            over_capacity = over_capacity + 1
        end
    end
    return over_capacity
"""


async def _redis_group_send_many(layer: RedisChannelLayer, messages: Messages) -> None:
    """channels-redis' ``group_send`` for a batch: the same keys, script and expiry, with the
    members of every group read in one pipeline per group host, and every copy written in one
    pipeline per channel host (in order, so a group's messages keep their order)."""
    now = time.time()
    groups_by_host = _groups_by_host(layer, [group for group, _ in messages])
    members: dict[str, list[str]] = {}

    async def read_members(index: int, groups: list[str]) -> None:
        pipe = layer.connection(index).pipeline(transaction=False)
        for group in groups:
            key = layer._group_key(group)
            pipe.zremrangebyscore(key, min=0, max=int(now) - layer.group_expiry)
            pipe.zrange(key, 0, -1)
        replies = await pipe.execute()
        for group, names in zip(groups, replies[1::2], strict=True):
            members[group] = [name.decode("utf8") for name in names]

    await asyncio.gather(*(read_members(index, groups) for index, groups in groups_by_host.items()))
    writes: dict[int, list[tuple[list, list]]] = collections.defaultdict(list)
    for position, (group, message) in enumerate(messages):
        by_host, copies, capacities = layer._map_channel_keys_to_connection(members[group], message)
        # A channel's queue is a sorted set read lowest score first, and equal scores come out in
        # the order of their bytes: each message of the batch a later score than the one before.
        score = now + position * 1e-6
        for index, keys in by_host.items():
            args = [copies[key] for key in keys] + [capacities[key] for key in keys] + [score, layer.expiry]
            writes[index].append((keys, args))

    async def write(index: int, scripts: list[tuple[list, list]]) -> None:
        pipe = layer.connection(index).pipeline(transaction=False)
        for keys, args in scripts:
            for key in keys:  # expired copies first, as group_send does
                pipe.zremrangebyscore(key, min=0, max=int(now) - int(layer.expiry))
            pipe.eval(GROUP_SEND_LUA, len(keys), *keys, *args)
        replies = await pipe.execute()
        over = sum(reply for reply in replies if isinstance(reply, int) and reply > 0)
        if over:
            logger.info("channel layer: %s channel copies over capacity on host %d", over, index)

    await asyncio.gather(*(write(index, scripts) for index, scripts in writes.items()))


_account_lock = threading.Lock()


def _account(error: BaseException | None, timeout: float | None) -> None:
    """Count and log a failed batch (one log line per outage), or note that pushes work again."""
    if isinstance(error, TimeoutError | asyncio.CancelledError) and timeout is not None:
        error = TimeoutError(f"no answer within PUSH_TIMEOUT ({timeout:g} s)")
    with _account_lock:  # the callers' threads and the background loop's
        if error is None:
            failures.recovered(FAILED)
        else:
            metrics.push_failed()
            failures.failure(FAILED, error)


def _account_done(timeout: float, future) -> None:
    """A batch is over: done, failed, timed out, or cancelled by a caller that stopped waiting."""
    _account(TimeoutError() if future.cancelled() else future.exception(), timeout)


def redis_retry_once(*, asyncio_client: bool) -> dict:
    """redis-py connection options: a command that fails with a connection error (the server
    closed a pooled connection: it restarted) is sent once more, on a new connection.

    redis-py 8 does not retry by default (a pipeline never did)."""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    if asyncio_client:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry  # type: ignore[assignment]
    return {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}


# The in-memory layer: on the caller's loop, or through async_to_sync

_scheduled: set[asyncio.Task] = set()


def _publish_in_memory(layer, messages: Messages, running: asyncio.AbstractEventLoop | None) -> None:
    timeout = push_timeout()
    if running is not None:
        task = running.create_task(_send(layer, messages, timeout))
        _scheduled.add(task)
        task.add_done_callback(_scheduled.discard)
        task.add_done_callback(partial(_account_done, timeout))
        return
    try:
        async_to_sync(_send)(layer, messages, timeout)
    except Exception as exc:
        _account(exc, timeout)
    else:
        _account(None, timeout)


# The background loop


class BackgroundLoop:
    """An event loop running forever in a daemon thread of this process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = _new_loop()
        self.drain_task: asyncio.Task | None = None
        self.waiting: list[tuple[object, Messages, float, concurrent.futures.Future]] = []  # only on self.loop
        self.pending: set[concurrent.futures.Future] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, name="notifications-push", daemon=True)
        self.thread.start()

    def submit(self, layer, messages: Messages, timeout: float) -> concurrent.futures.Future:
        """Queue a batch; it leaves with the batches queued while the one before was in flight."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)
        future.add_done_callback(partial(_account_done, timeout))
        self.loop.call_soon_threadsafe(self._queue, layer, messages, time.monotonic() + timeout, future)
        return future

    def _queue(self, layer, messages: Messages, deadline: float, future: concurrent.futures.Future) -> None:
        self.waiting.append((layer, messages, deadline, future))
        if self.drain_task is None:
            self.drain_task = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        """Send what is waiting, one merged batch at a time, until nothing waits."""
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, []
                # A caller that stopped waiting (cancelled) drops its batch; the others run.
                batch = [entry for entry in batch if entry[3].set_running_or_notify_cancel()]
                for layer in dict.fromkeys(entry[0] for entry in batch):
                    mine = [entry for entry in batch if entry[0] is layer]
                    await self._send_merged(layer, mine)
        finally:
            self.drain_task = None

    @staticmethod
    async def _send_merged(layer, batch: list) -> None:
        messages = [message for entry in batch for message in entry[1]]
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + max(
                    0.0, min(entry[2] for entry in batch) - time.monotonic())):
                await group_send_many(layer, messages)
        except BaseException as exc:  # noqa: BLE001 - handed to each caller's future
            error = TimeoutError() if isinstance(exc, asyncio.CancelledError | TimeoutError) else exc
            for entry in batch:
                entry[3].set_exception(error)
            if isinstance(exc, asyncio.CancelledError) and not isinstance(exc, TimeoutError):
                raise
        else:
            for entry in batch:
                entry[3].set_result(None)

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the batches still in flight."""
        if self.pending:
            concurrent.futures.wait(list(self.pending), timeout=timeout)


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (about a third less CPU per push than asyncio's loop), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


_current: BackgroundLoop | None = None
_starting = threading.Lock()


def _background() -> BackgroundLoop:
    """This process's loop: started on first use, and again in a child after a fork (whose copy
    of the parent's loop has no thread running it)."""
    global _current
    current = _current
    if current is None or current.pid != os.getpid() or not current.thread.is_alive():
        with _starting:
            if _current is None or _current.pid != os.getpid() or not _current.thread.is_alive():
                _current = BackgroundLoop()
            current = _current
    return current


def _after_fork_in_child() -> None:
    global _starting
    _starting = threading.Lock()  # another thread of the parent may have held it at the fork


def _drain_at_exit() -> None:
    current = _current
    if current is not None and current.pid == os.getpid():
        try:
            timeout = push_timeout()
        except Exception:  # settings gone at exit
            timeout = 1.0
        current.drain(timeout)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_drain_at_exit)
