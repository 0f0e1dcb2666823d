"""The channel-layer configuration, shared by settings and the tests.

Redis is reached either at one URL (``REDIS_URL``) or through Redis Sentinel
(``REDIS_SENTINELS`` + ``REDIS_SENTINEL_MASTER``): channels-redis 4.3 builds a
``SentinelConnectionPool`` for a host entry with ``sentinels`` and ``master_name``
(``channels_redis.utils.create_pool``), so after a failover it asks the sentinels for
the new master. Redis Cluster is not supported by channels-redis (it uses multi-key Lua
scripts and BZPOPMIN across keys that a cluster would spread over slots).
"""

from django.core.exceptions import ImproperlyConfigured

LAYER_BACKENDS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}


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


def redis_hosts(url: str = "", *, sentinels=(), master_name: str = "", db: int = 0, password: str = "") -> list[dict]:
    """The ``hosts`` entry of channels-redis: one URL, or a Sentinel-managed master."""
    # redis-py 8 reads with a 5 s socket timeout by default: the same length as
    # channels-redis' blocking pop, so every idle read would time out. Block freely.
    if sentinels:
        if not master_name:
            raise ImproperlyConfigured("Set REDIS_SENTINEL_MASTER (the master's name) with REDIS_SENTINELS.")
        host = {"sentinels": list(sentinels), "master_name": master_name, "db": db, "socket_timeout": None}
        if password:
            host["password"] = password
        return [host]
    if not url:
        raise ImproperlyConfigured("Set REDIS_URL or REDIS_SENTINELS for the Redis channel layer.")
    return [{"address": url, "socket_timeout": None}]


def redis_channel_layer(url: str = "", prefix: str = "notifications", capacity: int = 10_000, *,
                        sentinels=(), master_name: str = "", db: int = 0, password: str = "",
                        backend: str = "core") -> dict:
    """channels-redis settings; docs/guarantees.md explains each value, docs/deployment.md the choice
    of ``RedisChannelLayer`` (``core``) over ``RedisPubSubChannelLayer`` (``pubsub``)."""
    if backend not in LAYER_BACKENDS:
        raise ImproperlyConfigured(f"CHANNELS_LAYER must be one of {', '.join(LAYER_BACKENDS)}, not {backend!r}.")
    hosts = redis_hosts(url, sentinels=sentinels, master_name=master_name, db=db, password=password)
    if backend == "pubsub":
        # No capacity, expiry or group expiry in the pub/sub layer: at-most-once delivery to
        # whoever is subscribed; the hub reads what it missed from the store.
        return {"BACKEND": LAYER_BACKENDS[backend], "CONFIG": {"hosts": hosts, "prefix": prefix}}
    return {
        "BACKEND": LAYER_BACKENDS[backend],
        "CONFIG": {
            "hosts": hosts,
            "prefix": prefix,
            # Messages waiting for one process (only hubs receive: one channel per process)
            # before group_send drops (and logs); the hub reads dropped ones from the store.
            "capacity": capacity,
            # Seconds an undelivered message lives; the hub recovers expired ones from the store.
            "expiry": 60,
            # Seconds a group membership lives; the hub renews its one membership long before.
            "group_expiry": 86400,
        },
    }
