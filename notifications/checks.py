"""System checks (``manage.py check``; also logged by each server process at startup)."""

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.compatibility)
def channel_layer_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """W001: the in-memory channel layer with DEBUG=0 (production) serves one process only."""
    if settings.DEBUG:
        return []
    backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
    if backend != "channels.layers.InMemoryChannelLayer":
        return []
    return [
        checks.Warning(
            "The in-memory channel layer is in use with DEBUG=0: a notification sent in one server process "
            "never reaches the connections of another (a second worker, machine, or a management command).",
            hint="Set REDIS_URL (or REDIS_SENTINELS and REDIS_SENTINEL_MASTER) so every process shares Redis; "
            "bin/serve refuses several workers without it.",
            id="notifications.W001",
        )
    ]
