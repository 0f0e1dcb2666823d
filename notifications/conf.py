"""The app's settings: every default is here, and a host changes any of them in one optional
dict in its settings, ``NOTIFICATIONS = {"WS_RATE": 5.0, ...}``.

Code reads ``conf.settings.WS_RATE``, never ``django.conf.settings.NOTIFICATIONS``. The host's
dict is read at first use, not at import (as ``django.contrib.messages`` reads ``MESSAGE_TAGS``),
so importing the app needs nothing of the host's settings; the merged values are kept until
``NOTIFICATIONS`` or ``CHANNEL_LAYERS`` is another object, or Django's ``setting_changed`` names
one of them (``override_settings``, pytest-django's ``settings``). Every key is optional; a key
the app does not know is a system-check warning (``notifications.W002``).

Redis, for presence, is the host's channel layer's: the ``hosts`` of ``CHANNEL_LAYERS["default"]``
when that is a channels-redis layer (``redis_hosts()``), unless ``NOTIFICATIONS["REDIS_URL"]``
names other servers.
"""

import copy
from collections.abc import Mapping
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

DEFAULTS: dict[str, Any] = {
    # Origins allowed for cookie-authenticated WebSocket handshakes, besides the site's own (its
    # host in ALLOWED_HOSTS). "*" allows any origin (notifications.W005 when DEBUG is off).
    "WS_ALLOWED_ORIGINS": [],
    # Largest client WebSocket frame accepted; larger frames close the socket with 4009 (RFC 6455's 1009).
    "WS_MAX_FRAME_BYTES": 64 * 1024,
    # Client frames per second per connection (average, and burst); more get 'rate_limited'.
    "WS_RATE": 10.0,
    "WS_BURST": 30,
    # Open connections per user in one server process; a new one closes the oldest (4005).
    "WS_MAX_CONNECTIONS_PER_USER": 20,
    # Failed credentials (tokens, tickets, passwords) per client address per minute before 429/4029.
    "AUTH_FAILURES_PER_MINUTE": 20,
    # WebSocket tickets one user may request per minute.
    "TICKETS_PER_MINUTE": 30,
    # Topics one connection may follow.
    "WS_MAX_TOPICS": 100,
    # Frames queued for one connection before it counts as a slow consumer (closed with 4008).
    "WS_MAX_QUEUED_FRAMES": 1000,
    # Resume: how far back a reconnecting client can catch up (seconds, and notifications).
    "REPLAY_MAX_AGE": 7 * 24 * 3600,
    "REPLAY_MAX_COUNT": 500,
    # The hub: how long an early notification waits for a missing earlier one before the
    # store is read (seconds), and how often the stream head is checked for lost pushes.
    "HUB_GAP_WAIT": 0.2,
    "HUB_SYNC_INTERVAL": 2.0,
    # Threads per process for the database work of handshakes, resumes and the hub (each with its
    # own connection): notifications/db.py.
    "DB_THREADS": 2,
    # Database calls waiting for those threads beyond which a handshake is refused at once (error
    # "overloaded" with retry_after, close 4013): a handshake has at most one call waiting, so this
    # is about as many handshakes at once (on a 2-core machine a few seconds of work).
    "DB_MAX_BACKLOG": 1000,
    # Seconds a send waits for its push to reach the channel layer; then the push is dropped (stored: hubs read it).
    "PUSH_TIMEOUT": 1.0,
    # Seconds an idempotency key (notification_send(idempotency_key=...), Idempotency-Key header) is kept.
    "IDEMPOTENCY_TTL": 24 * 3600,
    # Largest REST API request body; larger bodies get 413.
    "API_MAX_BODY_BYTES": 256 * 1024,
    # Seconds a WebSocket ticket from POST /api/ws-ticket/ stays valid. (Its old name,
    # TICKET_TTL_SECONDS, is still read: notifications.W003.)
    "WS_TICKET_TTL": 30,
    # Proxies whose X-Forwarded-For / X-Real-IP headers are believed (addresses or networks).
    "TRUSTED_PROXIES": [],
    # The Redis of presence, when it is not the channel layer's: one URL, or several (a list, or
    # comma-separated: shards). None: the hosts of CHANNEL_LAYERS["default"] when that is a
    # channels-redis layer (URLs, {"address": ...} or Sentinel entries), else no Redis.
    "REDIS_URL": None,
    # Where "who is online" lives (a dotted path). None: notifications.presence.RedisPresence,
    # shared by every process, when the app has Redis (above); else
    # notifications.presence.LocalPresence, this process only.
    "PRESENCE_BACKEND": None,
    # The namespace of the presence keys in Redis. None: the channel layer's prefix (its
    # CONFIG["prefix"], channels-redis), else "notifications".
    "REDIS_PREFIX": None,
    # Seconds after which a connection of a crashed process disappears from "who is online".
    "PRESENCE_TTL": 45,
    # This server process's name in presence listings ("": host name and process id).
    "SERVER_ID": "",
    # GET /metrics (Prometheus): allowed from these client addresses or networks ("unix" allows a
    # Unix-socket peer; the client address is the one behind TRUSTED_PROXIES), or with
    # "Authorization: Bearer <METRICS_TOKEN>" when that is set. Several processes sum their metrics
    # in PROMETHEUS_MULTIPROC_DIR (an environment variable of prometheus-client; bin/serve sets it).
    "METRICS_ALLOWED_IPS": ["127.0.0.1", "::1"],
    "METRICS_TOKEN": "",
    # Add "send a notification" and "disconnect" to the host's User admin (left alone by default).
    "USER_ADMIN_ACTIONS": False,
    # The external channels of a notification no rule decides (no user rule, no staff default of
    # its topic): {"email": bool, "digest": bool, "push": bool}, missing keys false. The socket and
    # the inbox always deliver (docs/delivery.md, "Preferences").
    "DELIVERY_DEFAULTS": {"email": False, "digest": False, "push": False},
    # Seconds between a server process's writes of its socket receipts (notifications/
    # socket_receipts.py: how far each user's sockets got in each stream, the live channel's
    # delivery record; one statement per 300 users and streams). 0: no socket receipts.
    "SOCKET_RECEIPTS_INTERVAL": 30.0,
    # The external channels this site delivers on (docs/delivery.md): any of "email", "digest",
    # "push" ("push" also needs VAPID_PRIVATE_KEY). [] turns them all off: a send then writes
    # nothing beyond the notification.
    "DELIVERY_CHANNELS": ["email", "digest", "push"],
    # Run the delivery worker (email and Web Push) as a thread in each server process. False: run
    # `manage.py deliver` (as many as you like; they share the work) instead.
    "DELIVERY_WORKER": True,
    # Seconds between the worker's looks at the store for work it was not woken for (retries, the
    # end of quiet hours, sends from other processes); deliveries claimed at once; seconds a claim
    # holds them (a crashed worker's claim is taken again after it).
    "DELIVERY_POLL_INTERVAL": 5.0,
    "DELIVERY_BATCH": 100,
    "DELIVERY_LEASE": 120,
    # Failed sends wait DELIVERY_RETRY_BASE * 2**(attempt - 1) seconds (at most 6 hours), and
    # give up after DELIVERY_MAX_ATTEMPTS attempts.
    "DELIVERY_RETRY_BASE": 30.0,
    "DELIVERY_MAX_ATTEMPTS": 8,
    # The site's address for links in emails and push messages (notification links, the inbox,
    # unsubscribe): scheme and host, e.g. "https://example.com" ("" with DEBUG: http://localhost:8000).
    "SITE_URL": "",
    # The From address of emails (None: DEFAULT_FROM_EMAIL) and the most items one digest lists.
    "EMAIL_FROM": None,
    "DIGEST_MAX_ITEMS": 50,
    # Web Push (VAPID, RFC 8292): the private key (PEM, or the raw key base64url-encoded;
    # `manage.py generate_vapid_keys` makes a pair), the public key browsers subscribe with (derived
    # from the private key when empty), and a contact for push services ("mailto:..." or https URL).
    "VAPID_PRIVATE_KEY": "",
    "VAPID_PUBLIC_KEY": "",
    "VAPID_SUBJECT": "",
    # Seconds a push service keeps an undelivered message; seconds a request to it may take;
    # subscriptions kept per user (a new one beyond it replaces the oldest).
    "WEBPUSH_TTL": 24 * 3600,
    "WEBPUSH_TIMEOUT": 10.0,
    "WEBPUSH_MAX_SUBSCRIPTIONS": 20,
}

# Old key names still read (each with a system-check warning, notifications.W003): old: new.
RENAMED = {"TICKET_TTL_SECONDS": "WS_TICKET_TTL"}

LOCAL_PRESENCE = "notifications.presence.LocalPresence"
REDIS_PRESENCE = "notifications.presence.RedisPresence"
DEFAULT_PREFIX = "notifications"
# What channels-redis connects to when a layer lists no hosts.
CHANNELS_REDIS_DEFAULT_HOST = "redis://localhost:6379"

_MISSING = object()


def host_settings() -> Mapping[str, Any]:
    """The host's ``NOTIFICATIONS`` dict (``{}`` when it has none)."""
    return _checked(getattr(django_settings, "NOTIFICATIONS", None))


def _checked(value: object) -> Mapping[str, Any]:
    if value is None or value is _MISSING:
        return {}
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(f"NOTIFICATIONS must be a dict, not {type(value).__name__}.")
    return value


class AppSettings:
    """The app's settings as attributes: the host's ``NOTIFICATIONS`` over ``DEFAULTS``, computed
    at first use and kept while the host's settings stay the same."""

    def __init__(self, defaults: dict[str, Any]):
        self._defaults = defaults
        self._cache: tuple[object, object, dict[str, Any]] | None = None

    def __getattr__(self, name: str) -> Any:
        if name not in self._defaults:
            raise AttributeError(f"The notifications app has no setting {name!r} (notifications/conf.py).")
        return self.values()[name]

    def values(self) -> dict[str, Any]:
        """Every setting, defaults resolved."""
        host = getattr(django_settings, "NOTIFICATIONS", _MISSING)
        layers = getattr(django_settings, "CHANNEL_LAYERS", _MISSING)
        cache = self._cache
        if cache is None or cache[0] is not host or cache[1] is not layers:
            cache = self._cache = (host, layers, self._load(_checked(host)))
        return cache[2]

    def reload(self) -> None:
        """Forget the values: the next read takes the host's settings again."""
        self._cache = None

    def _load(self, host: Mapping[str, Any]) -> dict[str, Any]:
        values = copy.deepcopy(self._defaults)
        for old, new in RENAMED.items():
            if old in host and new not in host:
                values[new] = host[old]
        values.update((key, value) for key, value in host.items() if key in self._defaults)
        if values["PRESENCE_BACKEND"] is None:
            has_redis = bool(_urls(values["REDIS_URL"])) or _redis_layer() is not None
            values["PRESENCE_BACKEND"] = REDIS_PRESENCE if has_redis else LOCAL_PRESENCE
        if values["REDIS_PREFIX"] is None:
            layer = _redis_layer()
            values["REDIS_PREFIX"] = (layer or {}).get("CONFIG", {}).get("prefix") or DEFAULT_PREFIX
        return values


settings = AppSettings(DEFAULTS)


@receiver(setting_changed, dispatch_uid="notifications.conf.reload")
def _reload(*, setting: str, **kwargs) -> None:
    if setting in ("NOTIFICATIONS", "CHANNEL_LAYERS"):
        settings.reload()


def redis_hosts() -> list[dict[str, Any]]:
    """The app's Redis servers (one per shard), as channels-redis host entries: ``{"address": url}``,
    ``{"sentinels": [...], "master_name": ..., "db"?, "password"?, "sentinel_kwargs"?}`` or connection
    keywords (``{"host": ..., "port": ...}``), each with any further connection options the layer's
    entry has. ``NOTIFICATIONS["REDIS_URL"]`` when set, else the channel layer's ``hosts``; ``[]``
    when the app has no Redis."""
    urls = _urls(settings.REDIS_URL)
    if urls:
        return [{"address": url} for url in urls]
    layer = _redis_layer()
    if layer is None:
        return []
    hosts = layer.get("CONFIG", {}).get("hosts") or [CHANNELS_REDIS_DEFAULT_HOST]
    if isinstance(hosts, str | bytes):
        raise ImproperlyConfigured('CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] must be a list of Redis hosts, '
                                   "even for one.")
    return [_host_entry(entry) for entry in hosts]


def _host_entry(entry: Any) -> dict[str, Any]:
    """One ``hosts`` entry as channels-redis reads it (``channels_redis.utils.decode_hosts``)."""
    if isinstance(entry, Mapping):
        return dict(entry)
    if isinstance(entry, tuple | list):
        return {"host": entry[0], "port": entry[1]}
    return {"address": entry.decode() if isinstance(entry, bytes) else entry}


def _urls(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``NOTIFICATIONS["REDIS_URL"]``'s URLs: one, a list, or comma-separated; blank entries skipped."""
    if not value:
        return []
    parts = value.split(",") if isinstance(value, str) else value
    return [part.strip() for part in parts if part.strip()]


def _redis_layer() -> dict[str, Any] | None:
    """``CHANNEL_LAYERS["default"]`` when it is a channels-redis layer (or a subclass of one)."""
    layer = (getattr(django_settings, "CHANNEL_LAYERS", None) or {}).get("default")
    if not layer or not layer.get("BACKEND"):
        return None
    from channels_redis.core import RedisChannelLayer
    from channels_redis.pubsub import RedisPubSubChannelLayer

    try:
        backend = import_string(layer["BACKEND"])
    except ImportError:
        return None  # Channels itself says so when the layer is used
    if isinstance(backend, type) and issubclass(backend, RedisChannelLayer | RedisPubSubChannelLayer):
        return layer
    return None
