"""Database work from async code (handshakes, resumes, the hub): a bounded pool of threads.

Channels' ``database_sync_to_async`` runs every call of a process in one thread (it is thread
sensitive), so under a burst of handshakes each waited for every query before it. Here the
calls run in ``DB_THREADS`` threads (``NOTIFICATIONS["DB_THREADS"]``, default 2), each with its own
database connection, kept like any thread's (``CONN_MAX_AGE``, or Django's pool when
configured): at most ``DB_THREADS`` connections per process. Each call is closed off as
Channels' is (``close_old_connections`` before and after), and a call is one unit of work: a
transaction never spans two calls.

``backlog()`` says how many calls wait for a thread, so a handshake can be refused at once
(4013, with a retry hint) when the process is too far behind, instead of queueing for seconds.
"""

import concurrent.futures
import functools
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

from channels.db import DatabaseSyncToAsync
from django.db import connections

from . import conf

_executor: ThreadPoolExecutor | None = None
_pid = 0
_lock = threading.Lock()


def threads() -> int:
    return int(conf.settings.DB_THREADS)


def executor() -> ThreadPoolExecutor:
    """This process's database threads (started on first use, and again after a fork)."""
    global _executor, _pid
    if _executor is None or _pid != os.getpid():
        with _lock:
            if _executor is None or _pid != os.getpid():
                _executor = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="notifications-db")
                _pid = os.getpid()
    return _executor


def backlog() -> int:
    """Calls waiting for a database thread of this process."""
    current = _executor
    return current._work_queue.qsize() if current is not None and _pid == os.getpid() else 0


def shutdown(timeout: float = 5.0) -> None:
    """Close each database thread's connections and stop the threads (ASGI lifespan shutdown;
    the test session, before its test database is dropped)."""
    global _executor
    with _lock:
        current, _executor = _executor, None
    if current is None or _pid != os.getpid():
        return
    started = len(current._threads)
    if started:
        barrier = threading.Barrier(started)  # one close per thread: each waits for the others

        def close() -> None:
            try:
                barrier.wait(timeout)
            finally:
                connections.close_all()

        concurrent.futures.wait([current.submit(close) for _ in range(started)], timeout=timeout * 2)
    current.shutdown(wait=False)


def max_backlog() -> int:
    return int(conf.settings.DB_MAX_BACKLOG)


def overloaded() -> bool:
    """More calls wait for a database thread than ``DB_MAX_BACKLOG``: a new handshake would wait
    behind all of them, so it is refused at once (4013 with ``retry_after``) instead."""
    return backlog() >= max_backlog()


def retry_after() -> float:
    """The seconds a refused client is told to wait: 1 to 5, jittered so that the clients
    refused together do not come back together."""
    return round(random.uniform(1.0, 5.0), 1)  # noqa: S311 - jitter, not a secret


def database_sync_to_async(func):
    """Like Channels' ``database_sync_to_async``, on this process's database threads."""

    @functools.wraps(func)
    async def call(*args, **kwargs):
        return await DatabaseSyncToAsync(func, thread_sensitive=False, executor=executor())(*args, **kwargs)

    return call
