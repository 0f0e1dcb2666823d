"""The tutorial-style Channels app the product is measured against (docs/performance.md).

Settings as the Channels tutorial has them: ``channels`` installed, the Redis channel layer
(``BASELINE_LAYER``: ``core``, the default, is ``RedisChannelLayer`` with its default
capacity and expiry; ``pubsub`` is ``RedisPubSubChannelLayer``), no database work per message.
"""

import os

SECRET_KEY = "bench-baseline-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions", "channels"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
ASGI_APPLICATION = "bench.baseline.asgi.application"
USE_TZ = True
_backend = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}[os.environ.get("BASELINE_LAYER", "core")]
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": _backend,
        "CONFIG": {"hosts": [os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")],
                   "prefix": os.environ.get("CHANNELS_PREFIX", "bench-baseline")},
    }
}
LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"}}
