"""The app's settings (notifications/conf.py): defaults inside the app, the host's optional
NOTIFICATIONS dict over them, read at use and again after every change; the system checks on that
dict and on the origin rules; Redis taken from the channel layer or NOTIFICATIONS["REDIS_URL"]; and
an app importable with no NOTIFICATIONS at all."""

import os
import subprocess
import sys
import textwrap

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from notifications import conf
from notifications.auth import origin_allowed
from notifications.checks import origin_check, settings_check
from notifications.presence import LocalPresence, RedisPresence, get_presence

from .server import APP_ENV, BASE_DIR

MEMORY_LAYER = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# The defaults before the app had conf.py (project/settings.py's, with nothing in the environment).
DEFAULTS_BEFORE = {
    "DELIVERY_DEFAULTS": {"email": False, "digest": False, "push": False},
    "WS_ALLOWED_ORIGINS": [], "WS_MAX_FRAME_BYTES": 65536, "WS_RATE": 10.0, "WS_BURST": 30,
    "WS_MAX_CONNECTIONS_PER_USER": 20, "AUTH_FAILURES_PER_MINUTE": 20, "TICKETS_PER_MINUTE": 30,
    "WS_MAX_TOPICS": 100, "WS_MAX_QUEUED_FRAMES": 1000, "REPLAY_MAX_AGE": 604800, "REPLAY_MAX_COUNT": 500,
    "HUB_GAP_WAIT": 0.2, "HUB_SYNC_INTERVAL": 2.0, "DB_THREADS": 2, "DB_MAX_BACKLOG": 1000, "PUSH_TIMEOUT": 1.0,
    "IDEMPOTENCY_TTL": 86400, "API_MAX_BODY_BYTES": 262144, "WS_TICKET_TTL": 30, "TRUSTED_PROXIES": [],
    "PRESENCE_TTL": 45, "SERVER_ID": "", "METRICS_ALLOWED_IPS": ["127.0.0.1", "::1"], "METRICS_TOKEN": "",
    "USER_ADMIN_ACTIONS": False,
    "SOCKET_RECEIPTS_INTERVAL": 30.0, "DELIVERY_CHANNELS": ["email", "digest", "push"], "DELIVERY_WORKER": True,
    "DELIVERY_POLL_INTERVAL": 5.0,
    "DELIVERY_BATCH": 100, "DELIVERY_LEASE": 120, "DELIVERY_RETRY_BASE": 30.0, "DELIVERY_MAX_ATTEMPTS": 8,
    "SITE_URL": "", "EMAIL_FROM": None, "DIGEST_MAX_ITEMS": 50, "VAPID_PRIVATE_KEY": "", "VAPID_PUBLIC_KEY": "",
    "VAPID_SUBJECT": "", "WEBPUSH_TTL": 86400, "WEBPUSH_TIMEOUT": 10.0, "WEBPUSH_MAX_SUBSCRIPTIONS": 20,
}


def redis_layer(hosts, backend="channels_redis.core.RedisChannelLayer", **config) -> dict:
    return {"default": {"BACKEND": backend, "CONFIG": {"hosts": hosts, **config}}}


# Defaults, and the host's dict over them


@override_settings()
def test_without_any_notifications_setting_every_key_has_its_default(settings):
    del settings.NOTIFICATIONS
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    assert conf.host_settings() == {}
    assert conf.settings.values() == {**DEFAULTS_BEFORE, "REDIS_URL": None, "REDIS_PREFIX": "notifications",
                                      "PRESENCE_BACKEND": "notifications.presence.LocalPresence"}
    assert settings_check() == []


def test_a_host_value_overrides_its_key_and_leaves_the_others_at_their_defaults(settings):
    settings.NOTIFICATIONS = {"WS_RATE": 2.5}
    assert conf.settings.WS_RATE == 2.5
    assert conf.settings.WS_BURST == 30
    assert {key: value for key, value in conf.settings.values().items() if key in DEFAULTS_BEFORE} == {
        **DEFAULTS_BEFORE, "WS_RATE": 2.5}


def test_changed_settings_are_seen_at_once(settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_MAX_TOPICS": 7}
    assert conf.settings.WS_MAX_TOPICS == 7
    with override_settings(NOTIFICATIONS={"WS_MAX_TOPICS": 3}):
        assert conf.settings.WS_MAX_TOPICS == 3
    assert conf.settings.WS_MAX_TOPICS == 7
    del settings.NOTIFICATIONS  # pytest-django sends no setting_changed for a deletion
    assert conf.settings.WS_MAX_TOPICS == 100


def test_this_project_passes_every_key_it_sets_under_the_apps_name(settings):
    """project/settings.py: each variable feeds the key of the same name; nothing unknown, no old names."""
    assert set(settings.NOTIFICATIONS) <= set(conf.DEFAULTS)
    assert settings_check() == []


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no setting 'WS_RAT'"):
        conf.settings.WS_RAT  # noqa: B018


def test_notifications_must_be_a_dict(settings):
    settings.NOTIFICATIONS = [("WS_RATE", 1.0)]
    with pytest.raises(ImproperlyConfigured, match="NOTIFICATIONS must be a dict, not list"):
        conf.settings.WS_RATE  # noqa: B018
    [error] = settings_check()
    assert (error.id, error.msg) == ("notifications.E001", "NOTIFICATIONS must be a dict, not list.")


# System checks: the dict


def test_an_unknown_key_is_a_warning_naming_it_the_closest_key_and_every_known_one(settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_RAT": 5.0}
    [warning] = settings_check()
    assert warning.id == "notifications.W002"
    assert "NOTIFICATIONS['WS_RAT']" in warning.msg and "ignored" in warning.msg
    assert warning.hint.startswith("Did you mean 'WS_RATE'? The app's settings are: ")
    assert all(key in warning.hint for key in conf.DEFAULTS)
    assert conf.settings.WS_RATE == settings.NOTIFICATIONS["WS_RATE"]  # the typo changed nothing
    settings.NOTIFICATIONS = {"COMPLETELY_DIFFERENT": 1}
    [warning] = settings_check()
    assert warning.hint.startswith("The app's settings are: WS_ALLOWED_ORIGINS, ")


def test_the_old_ticket_ttl_key_is_still_read_with_a_warning(settings):
    settings.NOTIFICATIONS = {"TICKET_TTL_SECONDS": 5}
    assert conf.settings.WS_TICKET_TTL == 5
    [warning] = settings_check()
    assert warning.id == "notifications.W003"
    assert "'TICKET_TTL_SECONDS'" in warning.msg and "'WS_TICKET_TTL'" in warning.hint
    settings.NOTIFICATIONS = {"TICKET_TTL_SECONDS": 5, "WS_TICKET_TTL": 9}
    assert conf.settings.WS_TICKET_TTL == 9  # the new name wins


# System checks and the rule: origins


@override_settings(DEBUG=False, ALLOWED_HOSTS=[])
def test_empty_allowed_hosts_without_debug_is_a_warning():
    [warning] = origin_check()
    assert warning.id == "notifications.W004"
    assert "4003" in warning.msg and "ALLOWED_HOSTS" in warning.hint
    assert origin_allowed("https://notify.example.com", "notify.example.com", "wss") is False


@override_settings(DEBUG=False, ALLOWED_HOSTS=["notify.example.com"])
def test_allowed_hosts_naming_the_site_pass_the_check():
    assert origin_check() == []
    assert origin_allowed("https://notify.example.com", "notify.example.com", "wss") is True


@override_settings(DEBUG=True, ALLOWED_HOSTS=[])
def test_with_debug_an_empty_allowed_hosts_allows_localhost_as_django_does():
    """A fresh startproject (DEBUG=True, ALLOWED_HOSTS=[]) serves its page on localhost: its
    socket is accepted too, and nothing warns."""
    assert origin_check() == []
    for origin, host in [("http://localhost:8000", "localhost:8000"), ("http://127.0.0.1:8000", "127.0.0.1:8000"),
                         ("http://[::1]:8000", "[::1]:8000"), ("http://app.localhost", "app.localhost")]:
        assert origin_allowed(origin, host) is True, origin
    assert origin_allowed("http://example.com", "example.com") is False
    assert origin_allowed("http://localhost:3000", "localhost:8000") is False  # another origin still


@override_settings(DEBUG=False, ALLOWED_HOSTS=["notify.example.com"])
def test_any_origin_without_debug_is_a_warning(settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_ALLOWED_ORIGINS": ["*"]}
    [warning] = origin_check()
    assert warning.id == "notifications.W005"
    assert "'*'" in warning.msg
    settings.DEBUG = True
    assert origin_check() == []


# Redis: the channel layer's hosts, or NOTIFICATIONS["REDIS_URL"]


def test_an_in_memory_layer_means_no_redis_and_local_presence(settings):
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    assert conf.redis_hosts() == []
    assert conf.settings.PRESENCE_BACKEND == "notifications.presence.LocalPresence"
    assert conf.settings.REDIS_PREFIX == "notifications"
    assert type(get_presence()) is LocalPresence


def test_redis_comes_from_the_channel_layers_url_hosts(settings):
    settings.CHANNEL_LAYERS = redis_layer(["redis://a:6379/0", {"address": "rediss://b:6380/1", "ssl_cert_reqs": None},
                                           ("c", 6381)], prefix="staging")
    assert conf.redis_hosts() == [{"address": "redis://a:6379/0"},
                                  {"address": "rediss://b:6380/1", "ssl_cert_reqs": None},
                                  {"host": "c", "port": 6381}]
    assert conf.settings.PRESENCE_BACKEND == "notifications.presence.RedisPresence"
    assert conf.settings.REDIS_PREFIX == "staging"  # the layer's prefix
    presence = get_presence()
    assert type(presence) is RedisPresence and (presence.shards, presence.prefix) == (3, "staging:presence")


def test_redis_comes_from_the_channel_layers_sentinel_hosts(settings):
    entry = {"sentinels": [("10.0.0.1", 26379), ("10.0.0.2", 26379)], "master_name": "notifications",
             "sentinel_kwargs": {"password": "sentinel-pw"}, "db": 3, "password": "pw"}
    settings.CHANNEL_LAYERS = redis_layer([entry], backend="channels_redis.pubsub.RedisPubSubChannelLayer")
    assert conf.redis_hosts() == [entry]
    assert conf.settings.REDIS_PREFIX == "notifications"  # the layer sets none
    presence = RedisPresence()
    assert presence.hosts == [entry]
    import redis

    master = presence._connect(redis).connection_pool
    assert (master.service_name, master.connection_kwargs["db"], master.connection_kwargs["password"]) == (
        "notifications", 3, "pw")
    assert master.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["password"] == "sentinel-pw"


def test_a_sharded_layer_or_one_without_hosts_is_redis_too(settings):
    settings.CHANNEL_LAYERS = redis_layer(["redis://a/0", "redis://b/0"],
                                          backend="notifications.layers.ShardedRedisChannelLayer")
    assert [host["address"] for host in conf.redis_hosts()] == ["redis://a/0", "redis://b/0"]
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer"}}
    assert conf.redis_hosts() == [{"address": "redis://localhost:6379"}]  # channels-redis' own default
    settings.CHANNEL_LAYERS = redis_layer("redis://a/0")
    with pytest.raises(ImproperlyConfigured, match="must be a list"):
        conf.redis_hosts()


def test_notifications_redis_url_overrides_the_layer(settings):
    settings.CHANNEL_LAYERS = redis_layer(["redis://layer:6379/0"])
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "REDIS_URL": "redis://presence-a:6379/0, redis://presence-b/2"}
    assert conf.redis_hosts() == [{"address": "redis://presence-a:6379/0"}, {"address": "redis://presence-b/2"}]
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "REDIS_URL": ["redis://presence:6379/0"]}
    assert conf.redis_hosts() == [{"address": "redis://presence:6379/0"}]
    # With an in-memory layer, the key alone gives Redis presence.
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    assert conf.settings.PRESENCE_BACKEND == "notifications.presence.RedisPresence"
    assert RedisPresence().hosts == [{"address": "redis://presence:6379/0"}]
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "PRESENCE_BACKEND": "notifications.presence.LocalPresence",
                              "REDIS_PREFIX": "mine"}
    assert (conf.settings.PRESENCE_BACKEND, conf.settings.REDIS_PREFIX) == (
        "notifications.presence.LocalPresence", "mine")  # a host's own choice wins


# Importing the app needs no NOTIFICATIONS


HOST_SETTINGS = """
SECRET_KEY = "test-conf-minimal-host"
DEBUG = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "channels", "notifications"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
"""

IMPORT_EVERYTHING = """
import importlib, pkgutil
from collections.abc import Mapping

import django
from django.conf import settings

django.setup()


class Tripwire(Mapping):
    def __getitem__(self, key):
        raise AssertionError(f"NOTIFICATIONS[{key!r}] read at import")

    def __iter__(self):
        raise AssertionError("NOTIFICATIONS read at import")

    def __len__(self):
        raise AssertionError("NOTIFICATIONS read at import")


import notifications

settings.NOTIFICATIONS = Tripwire()
# All but notifications.admin, which only django.contrib.admin's autodiscovery imports (not
# installed here); it reads USER_ADMIN_ACTIONS then, to register the User admin's actions if asked.
names = sorted(m.name for m in pkgutil.walk_packages(notifications.__path__, "notifications."))
for name in names:
    if name != "notifications.admin":
        importlib.import_module(name)
del settings.NOTIFICATIONS

from django.core.management import call_command

call_command("check", fail_level="ERROR")
from notifications import conf

print("imported", len(names), "WS_RATE", conf.settings.WS_RATE)
"""


def test_importing_every_module_reads_no_notifications_and_checks_pass_without_it(tmp_path):
    (tmp_path / "minimal_host.py").write_text(textwrap.dedent(HOST_SETTINGS))
    env = {name: value for name, value in os.environ.items() if name not in APP_ENV}
    env.update(DJANGO_SETTINGS_MODULE="minimal_host", PYTHONPATH=os.pathsep.join([str(tmp_path), str(BASE_DIR)]))
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout + result.stderr
    assert "WS_RATE 10.0" in result.stdout


class StartedUp(Exception):
    """Ends the lifespan loop after startup (its shutdown would stop this process's database threads)."""


@override_settings(DEBUG=False, ALLOWED_HOSTS=[], CHANNEL_LAYERS=MEMORY_LAYER, NOTIFICATIONS={"WS_RAT": 1})
def test_a_server_process_logs_the_apps_warnings_at_startup(caplog):
    """uvicorn and Daphne run no ``manage.py check``: the lifespan logs what it would say."""
    from asgiref.sync import async_to_sync

    from notifications.lifespan import lifespan

    sent = []

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        sent.append(message)
        raise StartedUp

    with caplog.at_level("WARNING", logger="notifications.lifespan"), pytest.raises(StartedUp):
        async_to_sync(lifespan)({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}]
    assert all(f"(notifications.W00{n})" in caplog.text for n in (1, 2, 4)), caplog.text
