"""Publishing to the channel layer from any thread: one event loop per process, bounded waits.

``async_to_sync(layer.group_send)`` from synchronous code (a WSGI view, a script, a Celery
task, a management command) builds a new event loop per call, and channels-redis keeps its
connections per loop: every send opened a new Redis connection (100 sends, 100 connections:
tests/test_transport.py).
Here every publish of a process runs on one event loop in a daemon thread, started on first
use (and again in a child after a fork), so the process keeps one set of connections.

``publish`` never raises and never blocks its caller for more than ``PUSH_TIMEOUT`` seconds
(``settings.NOTIFICATIONS``, default 1.0): then it cancels that batch, logs once per outage,
counts ``notifications_push_failures_total`` and returns. The notification is already
stored; every hub reads lost pushes from the store. Called from async code (a running event
loop in this thread), it schedules the batch and returns at once. Batches leave one at a
time, in the order they were handed over. At interpreter exit, pushes still in flight get up
to ``PUSH_TIMEOUT`` to finish.

The in-memory layer (tests, a single process) keeps ``async_to_sync``: its queues are plain
``asyncio.Queue`` objects that wake the receiving loop with non-thread-safe calls, so a
message put from another loop's thread never wakes a hub waiting on its own loop.
``async_to_sync`` runs the send on the caller's outer loop (the hub's) when there is one.
"""

import asyncio
import atexit
import concurrent.futures
import logging
import os
import threading
from collections.abc import Sequence
from functools import partial

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings

from . import metrics
from .throttled_log import ThrottledLog

logger = logging.getLogger(__name__)
failures = ThrottledLog(logger)
FAILED = "push failed (stored; hubs will read it from the store)"

Messages = Sequence[tuple[str, dict]]


def push_timeout() -> float:
    return float(settings.NOTIFICATIONS.get("PUSH_TIMEOUT", 1.0))


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
    layer = get_channel_layer()
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
    loop = _background()
    future = loop.submit(_send(layer, messages, timeout, loop.lock), timeout)
    if running is not None:
        return  # async code: never block its loop; the batch times out by itself
    try:
        future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
    except (Exception, concurrent.futures.CancelledError):  # noqa: S110 - counted and logged by _account_done
        pass


async def _send(layer, messages: Messages, timeout: float, lock: asyncio.Lock | None = None) -> None:
    async with asyncio.timeout(timeout):
        if lock is None:
            await _group_send_all(layer, messages)
            return
        async with lock:  # one batch at a time, in the order submitted (the lock is fair)
            await _group_send_all(layer, messages)


async def _group_send_all(layer, messages: Messages) -> None:
    for group, message in messages:
        await layer.group_send(group, message)


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
        self.loop = asyncio.new_event_loop()
        self.lock = asyncio.Lock()  # bound to self.loop on first use
        self.pending: set[concurrent.futures.Future] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, name="notifications-push", daemon=True)
        self.thread.start()

    def submit(self, coroutine, timeout: float) -> concurrent.futures.Future:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)
        future.add_done_callback(partial(_account_done, timeout))
        return future

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the batches still in flight."""
        if self.pending:
            concurrent.futures.wait(list(self.pending), timeout=timeout)


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
