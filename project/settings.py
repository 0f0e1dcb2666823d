"""Settings for the notification service, read from the environment only.

Every variable is listed, with its default, in the README's configuration table.
"""

import os
import warnings
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from notifications.conf import DEFAULTS as app_defaults
from project.layers import parse_master_names, parse_redis_urls, parse_sentinels, redis_channel_layer

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

DEBUG = env.bool("DEBUG", default=True)

SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("Set SECRET_KEY in the environment (it may be omitted only when DEBUG=1).")
    SECRET_KEY = "dev-only-insecure-secret-key-do-not-use-in-production"  # noqa: S105 - DEBUG=1 only (above)

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])

INSTALLED_APPS = [
    "daphne",  # first, so `runserver` serves HTTP and WebSocket through ASGI
    # Before django.contrib.admin: its admin/index.html (extending the admin's) links the
    # "Send notification" and "Who is online" pages from /admin/ (notifications/admin.py).
    "notifications",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "ninja",  # Swagger UI for /api/docs from its own static files, not a CDN
    "examples",
    "project.demo",  # this project's demo_setup command (make run)
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # static files, also with DEBUG=0 (below)
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "notifications.http.ContentSecurityPolicyMiddleware",
]

ROOT_URLCONF = "project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],  # every template is an app's (notifications/templates/)
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "project.asgi.application"

# Connections per process in PostgreSQL's pool: the database threads (DB_THREADS) and the
# request threads share it; two workers use 40 of PostgreSQL's default 100.
DEFAULT_POOL_SIZE = 20
DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several threads (database_sync_to_async) and processes share the file: wait for locks.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("timeout", 20)
    # Take the write lock at BEGIN: a sending transaction reads and bumps the stream head.
    DATABASES["default"]["OPTIONS"].setdefault("transaction_mode", "IMMEDIATE")
    # A file, not :memory:, so a test server in another process sees the test database;
    # one per test run, so parallel runs do not share it.
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / f".test-db-{os.getpid()}.sqlite3")}
elif env.int("DB_POOL_MAX_SIZE", default=DEFAULT_POOL_SIZE) > 0:
    # Django's PostgreSQL connection pool (psycopg_pool), per process, on by default. Django runs
    # each request's synchronous part in a thread of its own, and connections are per thread:
    # without a pool every API request opened a new PostgreSQL connection, and at 100 requests/s
    # the queued ones used up max_connections (503 for about half of them). With it: none
    # refused, half the CPU per request (docs/performance.md). The database threads of
    # notifications/db.py borrow from the same pool. A request that finds no free connection
    # within DB_POOL_TIMEOUT seconds (and every request while the database is down) gets 503
    # with Retry-After. DB_POOL_MAX_SIZE=0 turns it off (CONN_MAX_AGE then applies).
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2, "max_size": env.int("DB_POOL_MAX_SIZE", default=DEFAULT_POOL_SIZE),
        "timeout": env.float("DB_POOL_TIMEOUT", default=3.0)}
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=60))
    # One test database per test run, so parallel runs on one server do not collide.
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}

# Redis: variables of this project, turned into CHANNEL_LAYERS (the app's presence uses the layer's
# hosts) and CACHES below. One Redis URL, or several comma-separated: shards of the channel layer
# and of presence (docs/deployment.md, "Several Redis servers"). REDIS_URLS is the checked list.
REDIS_URL = env.str("REDIS_URL", default="")
REDIS_URLS = parse_redis_urls(REDIS_URL)
# Redis Sentinel instead of URLs (docs/deployment.md): "host:port,host:port" and the master's name,
# or several master names, comma-separated (one Sentinel-managed shard each).
REDIS_SENTINELS = parse_sentinels(env.str("REDIS_SENTINELS", default=""))
REDIS_SENTINEL_MASTER = env.str("REDIS_SENTINEL_MASTER", default="")
REDIS_SENTINEL_MASTERS = parse_master_names(REDIS_SENTINEL_MASTER)
REDIS_SENTINEL_DB = env.int("REDIS_SENTINEL_DB", default=0)
REDIS_SENTINEL_PASSWORD = env.str("REDIS_SENTINEL_PASSWORD", default="")
# The namespace of every Redis key the service writes: channel layer, cache (throttles), presence
# (the app takes the channel layer's).
# Deployments sharing one Redis (staging and production, two sites) need different prefixes.
# CHANNELS_PREFIX is its older name, still read when REDIS_PREFIX is not set.
REDIS_PREFIX = env.str("REDIS_PREFIX", default=env.str("CHANNELS_PREFIX", default="notifications"))
if REDIS_URLS or REDIS_SENTINELS:
    CHANNEL_LAYERS = {
        "default": redis_channel_layer(
            REDIS_URLS,
            REDIS_PREFIX,
            env.int("CHANNELS_CAPACITY", default=10_000),
            sentinels=REDIS_SENTINELS,
            master_name=REDIS_SENTINEL_MASTERS,
            db=REDIS_SENTINEL_DB,
            password=REDIS_SENTINEL_PASSWORD,
            backend=env.str("CHANNELS_LAYER", default="core"),
        )
    }
else:
    # One process only: `manage.py check` warns (notifications.W001) when DEBUG=0.
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Throttle counters (notifications/rate_limits.py) must be shared by every server process.
# Only the first of several REDIS_URLs: Django's RedisCache takes a list as one primary (writes)
# and read replicas (reads at random), not as shards, so counters would be read where they were
# never written. The counters are few and short-lived; with that server down, throttles fail open.
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URLS[0],
                "KEY_PREFIX": REDIS_PREFIX}
    if REDIS_URLS
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# WhiteNoise serves /static/ from the apps' static folders (read at start), so a fresh clone's
# bin/serve needs no collectstatic; STATIC_ROOT (collectstatic) is for a proxy that serves it.
WHITENOISE_USE_FINDERS = True
# Not raw stderr lines among the log's: WhiteNoise's "No directory at" STATIC_ROOT before any
# collectstatic, and Django's note, under ASGI, that it reads a static file in one piece.
warnings.filterwarnings("ignore", "No directory at: ", UserWarning)
warnings.filterwarnings("ignore", "StreamingHttpResponse must consume synchronous iterators", Warning)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Email (notifications' email channel and digests; docs/delivery.md): Django's backend from one
# URL, e.g. smtp+tls://user:password@smtp.example.com:587 (django-environ's email_url); with
# DEBUG, printed to the console unless EMAIL_URL says otherwise.
vars().update(env.email_url("EMAIL_URL", default="consolemail://" if DEBUG else "smtp://localhost:25"))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="notifications@localhost")
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

# The notifications app's settings: every key of notifications/conf.py that a variable of the
# README's table sets (each feeds the key of the same name), the app's default where it is unset.
# notifications/conf.py says what each does. Not here: Redis, which the app reads from
# CHANNEL_LAYERS (presence shares the channel layer's hosts and prefix).
# Each variable feeds the app's setting of the same name (README, "Configuration"), of this type;
# unset, the app's default. PRESENCE_BACKEND unset: RedisPresence with a Redis channel layer, else
# LocalPresence.
ENVIRONMENT_SETTINGS = {
    "WS_ALLOWED_ORIGINS": env.list, "WS_MAX_FRAME_BYTES": env.int, "WS_RATE": env.float, "WS_BURST": env.int,
    "WS_MAX_CONNECTIONS_PER_USER": env.int, "AUTH_FAILURES_PER_MINUTE": env.int, "TICKETS_PER_MINUTE": env.int,
    "WS_MAX_TOPICS": env.int, "WS_MAX_QUEUED_FRAMES": env.int, "REPLAY_MAX_AGE": env.int,
    "REPLAY_MAX_COUNT": env.int, "HUB_GAP_WAIT": env.float, "HUB_SYNC_INTERVAL": env.float,
    "DB_THREADS": env.int, "DB_MAX_BACKLOG": env.int, "PUSH_TIMEOUT": env.float, "IDEMPOTENCY_TTL": env.int,
    "API_MAX_BODY_BYTES": env.int, "WS_TICKET_TTL": env.int, "TRUSTED_PROXIES": env.list,
    "PRESENCE_BACKEND": env.str, "PRESENCE_TTL": env.int, "SERVER_ID": env.str,
    "METRICS_ALLOWED_IPS": env.list, "METRICS_TOKEN": env.str,
    "SOCKET_RECEIPTS_INTERVAL": env.float, "DELIVERY_CHANNELS": env.list, "DELIVERY_WORKER": env.bool,
    "DELIVERY_POLL_INTERVAL": env.float,
    "DELIVERY_BATCH": env.int, "DELIVERY_LEASE": env.int, "DELIVERY_RETRY_BASE": env.float,
    "DELIVERY_MAX_ATTEMPTS": env.int, "SITE_URL": env.str, "EMAIL_FROM": env.str, "DIGEST_MAX_ITEMS": env.int,
    "VAPID_PRIVATE_KEY": env.str, "VAPID_PUBLIC_KEY": env.str, "VAPID_SUBJECT": env.str,
    "WEBPUSH_TTL": env.int, "WEBPUSH_TIMEOUT": env.float, "WEBPUSH_MAX_SUBSCRIPTIONS": env.int,
}
NOTIFICATIONS = {key: read(key, default=app_defaults[key]) for key, read in ENVIRONMENT_SETTINGS.items()}
# This project's admin adds "send a notification" and "disconnect" to its User admin.
NOTIFICATIONS["USER_ADMIN_ACTIONS"] = True

# ---- Production security: HTTPS, cookies, HSTS, proxies (docs/security.md) -------------------
# With DEBUG=0 and HTTPS=1, `manage.py check --deploy` reports nothing
# (tests/test_deploy.py). Every variable is in the README's configuration table.
# HTTPS=1: the site is served only over TLS (by this server or by a TLS-terminating proxy).
HTTPS = env.bool("HTTPS", default=False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=HTTPS)
# Machine endpoints keep answering plain HTTP (load balancer health checks, Prometheus).
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=365 * 24 * 3600 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=HTTPS)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=HTTPS)
# Origins (scheme://host[:port]) allowed to make session-authenticated unsafe requests besides
# the site's own, e.g. a front end on another subdomain.
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
if NOTIFICATIONS["TRUSTED_PROXIES"]:
    # Behind a TLS-terminating proxy: its X-Forwarded-Proto says whether the client used https.
    # Believed only from TRUSTED_PROXIES: the middleware drops the header from any other peer.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    MIDDLEWARE = ["notifications.proxies.ForwardedProtoMiddleware", *MIDDLEWARE]
# ---- End of production security ---------------------------------------------------------------

# Logs: one line per record on stderr, "plain" text or "json" (one object per line). Both
# formats redact tokens, tickets, cookies and passwords (notifications.log_formats).
LOG_FORMAT = env.str("LOG_FORMAT", default="plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be 'plain' or 'json', not {LOG_FORMAT!r}.")
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "()": "notifications.log_formats.PlainFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
        },
        "json": {"()": "notifications.log_formats.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT},
        # Counts channels-redis' "N of M channels over capacity" lines (a metric; the line still logs).
        "over_capacity": {"class": "notifications.metrics.OverCapacityHandler"},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "channels_redis.core": {"level": "INFO", "handlers": ["over_capacity"]},
        # uvicorn's own lines go through the same handler (one format, secrets redacted): it logs
        # each WebSocket handshake and request with its query string.
        "uvicorn": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "uvicorn.access": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
    },
}
