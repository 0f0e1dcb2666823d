"""System checks (``manage.py check``; also logged by each server process at startup:
``startup_warnings``). Ids: W001-W008, E001-E003."""

import difflib
from urllib.parse import urlsplit

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from . import conf


@checks.register(checks.Tags.compatibility)
def channel_layer_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """W001: the in-memory channel layer with DEBUG=0 (production) serves one process only."""
    if settings.DEBUG:
        return []
    default = (getattr(settings, "CHANNEL_LAYERS", None) or {}).get("default")
    backend = default.get("BACKEND", "") if default else "channels.layers.InMemoryChannelLayer"  # (the app's own)
    if backend != "channels.layers.InMemoryChannelLayer":
        return []
    return [
        checks.Warning(
            "The in-memory channel layer is in use with DEBUG=0: a notification sent in one server process "
            "never reaches the connections of another (a second worker, machine, or a management command).",
            hint="Configure a channels-redis layer in CHANNEL_LAYERS so every process shares Redis (this "
            "repository's project: set REDIS_URL, or REDIS_SENTINELS and REDIS_SENTINEL_MASTER; bin/serve refuses "
            "several workers without it).",
            id="notifications.W001",
        )
    ]


@checks.register(checks.Tags.compatibility)
def settings_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """W002: a key of NOTIFICATIONS the app does not know (a typo is ignored otherwise); W003: a
    key under its old name; E001: NOTIFICATIONS is not a dict."""
    try:
        host = conf.host_settings()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), hint="NOTIFICATIONS = {...} (notifications/conf.py lists the keys).",
                             id="notifications.E001")]
    messages: list[checks.CheckMessage] = []
    known = ", ".join(conf.DEFAULTS)
    for key in host:
        if key in conf.DEFAULTS:
            continue
        if key in conf.RENAMED:
            new = conf.RENAMED[key]
            messages.append(checks.Warning(
                f"NOTIFICATIONS[{key!r}] is the old name of NOTIFICATIONS[{new!r}].",
                hint=f"Rename it {new!r}; the old name is still read when {new!r} is not set.",
                id="notifications.W003",
            ))
            continue
        close = difflib.get_close_matches(str(key), conf.DEFAULTS, n=1)
        suggestion = f"Did you mean {close[0]!r}? " if close else ""
        messages.append(checks.Warning(
            f"NOTIFICATIONS[{key!r}] is not a setting of the notifications app: it is ignored.",
            hint=f"{suggestion}The app's settings are: {known} (notifications/conf.py).",
            id="notifications.W002",
        ))
    return messages


@checks.register(checks.Tags.security)
def origin_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """W004: with DEBUG off and ALLOWED_HOSTS empty the origin rules refuse the site's own page; W005:
    WS_ALLOWED_ORIGINS allows every origin with DEBUG off."""
    if settings.DEBUG:
        return []  # (an empty ALLOWED_HOSTS then allows localhost, as for Django's HTTP requests)
    messages: list[checks.CheckMessage] = []
    if not settings.ALLOWED_HOSTS:
        messages.append(checks.Warning(
            "ALLOWED_HOSTS is empty with DEBUG=False: the site's own page can open no cookie-authenticated "
            "WebSocket (refused with close code 4003, origin_not_allowed), since its origin must be the "
            "handshake's host and that host must be in ALLOWED_HOSTS.",
            hint="List the site's host names in ALLOWED_HOSTS; other origins allowed to use the session "
            "cookie go in NOTIFICATIONS['WS_ALLOWED_ORIGINS'].",
            id="notifications.W004",
        ))
    if "*" in conf.settings.WS_ALLOWED_ORIGINS:
        messages.append(checks.Warning(
            "NOTIFICATIONS['WS_ALLOWED_ORIGINS'] contains '*' with DEBUG=False: a page of any site can open a "
            "WebSocket with the user's session cookie and read their notifications.",
            hint="List the origins (scheme://host[:port]) of the front ends that may connect instead.",
            id="notifications.W005",
        ))
    return messages


@checks.register(checks.Tags.compatibility)
def webpush_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """E002: VAPID_PRIVATE_KEY does not parse; E003: VAPID_PUBLIC_KEY is not its public key; W006:
    VAPID_PRIVATE_KEY without VAPID_SUBJECT; W007: VAPID_PRIVATE_KEY set but pywebpush not importable."""
    private_key = conf.settings.VAPID_PRIVATE_KEY
    if not private_key:
        return []
    from . import webpush

    messages: list[checks.CheckMessage] = []
    try:
        import py_vapid  # noqa: F401
        import pywebpush  # noqa: F401
    except ImportError as exc:
        return [checks.Warning(
            f"NOTIFICATIONS['VAPID_PRIVATE_KEY'] is set but Web Push cannot send: {exc}.",
            hint=f"Install the app's webpush extra: {webpush.INSTALL_HINT}.",
            id="notifications.W007",
        )]
    try:
        derived = webpush.public_key_of(private_key)
    except ValueError as exc:
        messages.append(checks.Error(
            f"NOTIFICATIONS['VAPID_PRIVATE_KEY'] does not parse: {exc}.",
            hint="Give a P-256 key as PEM or as the base64url raw key; `manage.py generate_vapid_keys` makes a pair.",
            id="notifications.E002",
        ))
    else:
        given = conf.settings.VAPID_PUBLIC_KEY
        if given and given.rstrip("=") != derived:
            messages.append(checks.Error(
                "NOTIFICATIONS['VAPID_PUBLIC_KEY'] is not the public key of VAPID_PRIVATE_KEY: browsers would "
                "subscribe with a key the push services then refuse.",
                hint=f"Set it to {derived!r}, or leave it empty (it is derived from the private key).",
                id="notifications.E003",
            ))
    if not conf.settings.VAPID_SUBJECT:
        messages.append(checks.Warning(
            "NOTIFICATIONS['VAPID_PRIVATE_KEY'] is set without VAPID_SUBJECT: push services want a contact "
            "(the site's SITE_URL is sent instead, and refused unless it is an https URL).",
            hint="Set NOTIFICATIONS['VAPID_SUBJECT'] to 'mailto:you@example.com' or an https URL of the site.",
            id="notifications.W006",
        ))
    return messages


@checks.register(checks.Tags.compatibility)
def site_url_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """W008: emails or pushes are on, DEBUG is off and SITE_URL is not an absolute http(s) URL."""
    from . import delivery

    if settings.DEBUG or not delivery.enabled_channels():
        return []
    url = urlsplit(conf.settings.SITE_URL or "")
    if url.scheme in ("http", "https") and url.hostname:
        return []
    return [checks.Warning(
        f"NOTIFICATIONS['SITE_URL'] is {conf.settings.SITE_URL!r} with DEBUG=False: the links of emails and push "
        "messages (the notification, the inbox, unsubscribe) need the site's absolute address.",
        hint="Set SITE_URL to the site's scheme and host, e.g. 'https://example.com', or turn the channels off "
        "(NOTIFICATIONS['DELIVERY_CHANNELS'] = []).",
        id="notifications.W008",
    )]


def startup_warnings() -> list[checks.CheckMessage]:
    """The app's checks, for a server process to log when it starts (``manage.py check`` is not
    run by uvicorn or Daphne)."""
    return [*channel_layer_check(), *settings_check(), *origin_check(), *webpush_check(), *site_url_check()]
