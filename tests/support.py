"""Small helpers of the tests that are not about servers (those are in ``tests/server.py``): the
test users' password, waiting for a condition, percentiles, a signed-in session.

No Django imports at module level: ``tests/faults/client.py`` (which the bench scripts use as is)
imports this module.
"""

import asyncio
import math
import time

PASSWORD = "pw-for-tests-1"  # every test user's password (tests/conftest.py's make_user)


async def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


def percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


def session_cookie(user) -> str:
    """The ``sessionid`` of a signed-in session for ``user`` (stored in the test database, so a
    server process on that database accepts it)."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


class StubEmailBackend:
    """An email backend that accepts every message and keeps none (subclasses change one step)."""

    def __init__(self, *args, **kwargs):
        pass

    def open(self):
        return True

    def close(self):
        pass

    def send_messages(self, messages):
        return len(messages)


class FailingEmailBackend(StubEmailBackend):
    """An email backend whose server refuses every message (as a full mailbox server would)."""

    def send_messages(self, messages):
        raise ConnectionRefusedError("the server said no")
