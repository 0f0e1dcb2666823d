"""The channel-layer configuration, shared by settings and the tests.

Redis is reached either at URLs (``REDIS_URL``) or through Redis Sentinel
(``REDIS_SENTINELS`` + ``REDIS_SENTINEL_MASTER``): channels-redis 4.3 builds a
``SentinelConnectionPool`` for a host entry with ``sentinels`` and ``master_name``
(``channels_redis.utils.create_pool``), so after a failover it asks the sentinels for
the new master. Redis Cluster is not supported by channels-redis (it uses multi-key Lua
scripts and BZPOPMIN across keys that a cluster would spread over slots).

Several servers (``REDIS_URL=redis://a/0,redis://b/0``, or several master names in
``REDIS_SENTINEL_MASTER``) are channels-redis shards: one ``hosts`` entry each. Its
``consistent_hash`` (CRC32 of the name) puts a group's membership on one host, chosen by the
group's name, and a process-local channel's messages (``specific.<process>!<id>``) on
one host, chosen by the part up to ``!``; ``group_send`` reads the members on the group's host,
then writes each member's copy on that member's host. So each group lives on one shard, and
the processes' channels (one per hub) are spread over all of them (docs/deployment.md,
"Several Redis servers"). With several hosts the core layer is the app's
``notifications.layers.ShardedRedisChannelLayer``.

The app's presence reads the same ``hosts`` (``notifications.conf.redis_hosts``).
"""

from collections.abc import Sequence
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

from notifications.layers import ShardedRedisChannelLayer
from notifications.transport import redis_retry_once

LAYER_BACKENDS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}
# The core layer with several hosts: see notifications.layers.
SHARDED_CORE_BACKEND = f"{ShardedRedisChannelLayer.__module__}.{ShardedRedisChannelLayer.__qualname__}"
URL_SCHEMES = ("redis", "rediss", "unix")


def _items(value: str | Sequence[str]) -> list[str]:
    """The non-empty, stripped entries of a comma-separated value (or of a list)."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    return [part.strip() for part in parts if part.strip()]


def parse_redis_urls(value: str | Sequence[str], name: str = "REDIS_URL") -> list[str]:
    """``"redis://a:6379/0, redis://b:6379/0"`` as a list of URLs; blank entries are skipped.

    A comma inside a password must be written ``%2C``."""
    if isinstance(value, str) and not value.strip():
        return []
    urls = _items(value)
    if not urls:
        raise ImproperlyConfigured(f"{name} lists no Redis server: {value!r}.")
    for url in urls:
        parts = urlsplit(url)
        try:
            valid = parts.scheme in URL_SCHEMES and bool(parts.hostname or (parts.scheme == "unix" and parts.path))
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
            if parts.scheme != "unix" and parts.path.strip("/"):
                int(parts.path.strip("/"))
        except ValueError:
            valid = False
        if not valid:
            raise ImproperlyConfigured(
                f"{name}: {url!r} is not a Redis URL (redis://host:port/db, rediss://... or unix://...); "
                "separate several servers with commas.")
    if len(set(urls)) != len(urls):
        raise ImproperlyConfigured(f"{name} lists a server twice: {value!r}.")
    return urls


def parse_master_names(value: str | Sequence[str]) -> list[str]:
    """``REDIS_SENTINEL_MASTER``: one master name, or several comma-separated (one shard each)."""
    names = _items(value)
    for name in names:
        if any(character.isspace() for character in name):
            raise ImproperlyConfigured(f"REDIS_SENTINEL_MASTER: {name!r} is not a master name; "
                                       "separate several names with commas.")
    if len(set(names)) != len(names):
        raise ImproperlyConfigured(f"REDIS_SENTINEL_MASTER names a master twice: {value!r}.")
    return names


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` (IPv6 as ``[::1]:26379``; the port defaults to 26379) as (host, port) pairs."""
    sentinels = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.lstrip(":")
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
        else:
            host, port = item, ""
        try:
            sentinels.append((host, int(port or 26379)))
        except ValueError:
            raise ImproperlyConfigured(f"REDIS_SENTINELS: {item!r} is not host:port") from None
    return sentinels


def redis_hosts(url: str | Sequence[str] = "", *, sentinels=(), master_name: str | Sequence[str] = "", db: int = 0,
                password: str = "") -> list[dict]:
    """The ``hosts`` of channels-redis: one entry per URL, or per Sentinel-managed master (shards)."""
    # redis-py 8 reads with a 5 s socket timeout by default: the same length as
    # channels-redis' blocking pop, so every idle read would time out. Block freely. And after
    # a Redis restart, each pooled connection fails its next command ("Connection closed by
    # server"): it is retried once, on a new connection (redis_retry_once), so the first push
    # after a restart is not lost.
    if sentinels:
        masters = parse_master_names(master_name)
        if not masters:
            raise ImproperlyConfigured("Set REDIS_SENTINEL_MASTER (the master's name) with REDIS_SENTINELS.")
        hosts = []
        for master in masters:
            host = {"sentinels": list(sentinels), "master_name": master, "db": db, "socket_timeout": None,
                    **redis_retry_once(asyncio_client=True)}
            if password:
                host["password"] = password
            hosts.append(host)
        return hosts
    urls = parse_redis_urls(url)
    if not urls:
        raise ImproperlyConfigured("Set REDIS_URL or REDIS_SENTINELS for the Redis channel layer.")
    return [{"address": address, "socket_timeout": None, **redis_retry_once(asyncio_client=True)} for address in urls]


def redis_channel_layer(url: str | Sequence[str] = "", prefix: str = "notifications", capacity: int = 10_000, *,
                        sentinels=(), master_name: str | Sequence[str] = "", db: int = 0, password: str = "",
                        backend: str = "core") -> dict:
    """channels-redis settings; docs/guarantees.md explains each value, docs/deployment.md the choice
    of ``RedisChannelLayer`` (``core``) over ``RedisPubSubChannelLayer`` (``pubsub``), and shards."""
    if backend not in LAYER_BACKENDS:
        raise ImproperlyConfigured(f"CHANNELS_LAYER must be one of {', '.join(LAYER_BACKENDS)}, not {backend!r}.")
    hosts = redis_hosts(url, sentinels=sentinels, master_name=master_name, db=db, password=password)
    if backend == "pubsub":
        # No capacity, expiry or group expiry in the pub/sub layer: at-most-once delivery to
        # whoever is subscribed; the hub reads what it missed from the store. It hashes the
        # same full name when it publishes and subscribes, so shards need no fix there.
        return {"BACKEND": LAYER_BACKENDS[backend], "CONFIG": {"hosts": hosts, "prefix": prefix}}
    return {
        "BACKEND": SHARDED_CORE_BACKEND if len(hosts) > 1 else LAYER_BACKENDS[backend],
        "CONFIG": {
            "hosts": hosts,
            "prefix": prefix,
            # Messages waiting for one process (only hubs receive: one channel per process)
            # before group_send drops (and logs); the hub reads dropped ones from the store.
            "capacity": capacity,
            # Seconds an undelivered message lives; the hub recovers expired ones from the store.
            "expiry": 60,
            # Seconds a group membership lives: the hub renews each of its memberships every quarter
            # of this; a process that died stops renewing, and its memberships are gone after this.
            "group_expiry": 300,
        },
    }
