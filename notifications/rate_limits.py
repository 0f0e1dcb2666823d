"""Rate limits, all of them: attempts counted per key in Django's cache (shared through Redis),
and the token bucket of each WebSocket connection's frames (in memory: one connection).

Used for failed credentials (API tokens, WebSocket handshakes, the login form) per client
address, and for WebSocket tickets per user. A fixed window: at most ``limit`` events per
``window`` seconds per key.

The throttle fails open: if the cache cannot be reached (Redis restarting), requests are
not throttled for that moment, instead of every request failing. One log line says so.
"""

import logging
import time

from django.core.cache import caches
from django.core.signals import setting_changed

from .outage_log import OutageLog

failures = OutageLog(logging.getLogger(__name__))
UNAVAILABLE = "throttle cache unavailable; not throttling"
_process_cache = None


def _cache():
    """One cache client for the whole process. Django's ``cache`` is one per async context:
    every WebSocket handshake opened its own Redis connection and kept it as long as the
    socket stayed open (1,000 sockets, 1,000 Redis connections), and every API request opened
    one (docs/performance.md). The Redis client's connection pool is thread-safe."""
    global _process_cache
    if _process_cache is None:
        _process_cache = caches.create_connection("default")
    return _process_cache


def _settings_changed(setting, **kwargs):
    global _process_cache
    if setting == "CACHES":
        _process_cache = None


setting_changed.connect(_settings_changed)


def _count(name: str, window: int) -> int:
    cache = _cache()
    if cache.add(name, 1, timeout=window):
        return 1
    try:
        return cache.incr(name)
    except ValueError:  # expired between add() and incr()
        cache.add(name, 1, timeout=window)
        return 1


def hit(scope: str, key: str, *, limit: int, window: int = 60) -> bool:
    """Count one event; False when the key is over its limit for this window."""
    try:
        count = _count(f"throttle:{scope}:{key}", window)
    except Exception as exc:  # fail open, see the module docstring
        failures.failure(UNAVAILABLE, exc)
        return True
    failures.recovered(UNAVAILABLE)
    return count <= limit


def blocked(scope: str, key: str, *, limit: int) -> bool:
    """Whether the key is already over its limit (without counting)."""
    try:
        count = _cache().get(f"throttle:{scope}:{key}") or 0
    except Exception as exc:
        failures.failure(UNAVAILABLE, exc)
        return False
    return count > limit


class TokenBucket:
    """``rate`` requests per second on average, ``burst`` at once."""

    def __init__(self, *, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
