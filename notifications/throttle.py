"""Counting attempts per key in Django's cache (shared through Redis when REDIS_URL is set).

Used for failed credentials (API tokens, WebSocket handshakes, the login form) per client
address, and for WebSocket tickets per user. A fixed window: at most ``limit`` events per
``window`` seconds per key.
"""

from django.core.cache import cache


def hit(scope: str, key: str, *, limit: int, window: int = 60) -> bool:
    """Count one event; False when the key is over its limit for this window."""
    name = f"throttle:{scope}:{key}"
    if cache.add(name, 1, timeout=window):
        return True
    try:
        count = cache.incr(name)
    except ValueError:  # expired between add() and incr()
        cache.add(name, 1, timeout=window)
        return True
    return count <= limit


def blocked(scope: str, key: str, *, limit: int) -> bool:
    """Whether the key is already over its limit (without counting)."""
    return (cache.get(f"throttle:{scope}:{key}") or 0) > limit
