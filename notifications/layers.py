"""A channel layer for several Redis servers (shards): ``notifications.layers.ShardedRedisChannelLayer``.

A host whose ``CHANNEL_LAYERS["default"]`` lists several channels-redis ``hosts`` sets it as the
layer's ``BACKEND`` (this project does: ``project/layers.py``). channels-redis' ``consistent_hash``
(CRC32 of the name) puts a group's membership on one host, chosen by the group's name, and a
process-local channel's messages (``specific.<process>!<id>``) on one host, chosen by the part up
to ``!``; ``group_send`` reads the members on the group's host, then writes each member's copy on
that member's host. So each group lives on one shard, and the processes' channels (one per hub)
are spread over all of them (docs/deployment.md, "Several Redis servers").
"""

import logging

from channels_redis.core import RedisChannelLayer
from django.conf import settings
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)


class ShardedRedisChannelLayer(RedisChannelLayer):
    """channels-redis' core layer, with ``send()`` to a process-local channel on the host its
    ``receive()`` reads, and no traceback when a host goes away just after a receive.

    channels-redis 4.3.0 hashes the whole name (``specific.<process>!<id>``) in ``send()`` but
    only the part up to ``!`` in ``receive()`` and ``group_send()``: with several hosts about
    half of the direct sends land where nobody reads (django/channels_redis#221). The hubs only
    use ``group_send``; ``/readyz`` sends to a channel of its own. Group names cannot contain
    ``!``, so groups hash as before.

    After each receive channels-redis removes the message's backup copy in a task nobody awaits;
    if that host has just gone (a shard restarted), asyncio logs "Task exception was never
    retrieved" with a traceback (seen in about 1 of 25 shard restarts in tests/ops/test_shards.py).
    Here that is one warning line; the copy stays, and is received again later only if the host
    kept it (the hub drops a notification it already delivered)."""

    def consistent_hash(self, value):
        if isinstance(value, str) and "!" in value:
            value = value[: value.index("!") + 1]
        return super().consistent_hash(value)

    async def _clean_receive_backup(self, index, channel):
        try:
            await super()._clean_receive_backup(index, channel)
        except RedisError as exc:
            logger.warning("channel layer: could not remove a received message's backup copy on host %d: %s: %s",
                           index, type(exc).__name__, exc)


_own_layer = None


def channel_layer():
    """The channel layer the app sends and receives on: the host's ``CHANNEL_LAYERS["default"]``,
    or, when the host configured none, an in-memory layer of the app's own for this process (one
    process only: a site's quick start works without a line about Channels; ``manage.py check``
    warns with DEBUG=0, notifications.W001)."""
    global _own_layer
    from channels.layers import DEFAULT_CHANNEL_LAYER, InMemoryChannelLayer, get_channel_layer

    layer = get_channel_layer()
    if layer is not None:
        return layer
    if DEFAULT_CHANNEL_LAYER in (getattr(settings, "CHANNEL_LAYERS", None) or {}):
        return None  # configured, but it could not be built: the caller reports it
    if _own_layer is None:
        _own_layer = InMemoryChannelLayer()
    return _own_layer
