"""The channel-layer configuration, shared by settings and the tests."""


def redis_channel_layer(url: str, prefix: str, capacity: int = 10_000) -> dict:
    """channels-redis settings for ``url``; docs/guarantees.md explains each value."""
    return {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 reads with a 5 s socket timeout by default: the same length as
            # channels-redis' blocking pop, so every idle read would time out. Block freely.
            "hosts": [{"address": url, "socket_timeout": None}],
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
