"""Configuration for several processes and machines: the channel layer from the environment
(one URL, several URLs as shards, Redis Sentinel with one or several masters, the pub/sub layer),
the app's presence on the same Redis, the one-process warning, and bin/serve's refusal."""

import asyncio
import contextlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from notifications import conf
from notifications.checks import channel_layer_check
from project.layers import parse_sentinels
from tests.conftest import missing_service
from tests.server import APP_ENV, BASE_DIR, free_port

SETTINGS = str(BASE_DIR / "project" / "settings.py")
MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
SHARDED_BACKEND = "notifications.layers.ShardedRedisChannelLayer"  # the core layer with several hosts
REDIS_PRESENCE, LOCAL_PRESENCE = "notifications.presence.RedisPresence", "notifications.presence.LocalPresence"


def load_settings(monkeypatch, **env) -> dict:
    """project/settings.py evaluated with exactly ``env`` (besides DEBUG=1) as the app's environment."""
    for name in APP_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = runpy.run_path(SETTINGS)
    for layer in settings["CHANNEL_LAYERS"].values():
        for host in layer.get("CONFIG", {}).get("hosts", []):
            assert_retries_once(host.pop("retry"), host.pop("retry_on_error"))  # objects: compared here
    return settings


def app_settings(loaded: dict) -> dict:
    """What the app makes of ``loaded``'s NOTIFICATIONS and CHANNEL_LAYERS (notifications.conf),
    with ``"redis_hosts"``: its presence's Redis."""
    with override_settings(NOTIFICATIONS=loaded["NOTIFICATIONS"], CHANNEL_LAYERS=loaded["CHANNEL_LAYERS"]):
        return {**conf.settings.values(), "redis_hosts": conf.redis_hosts()}


def assert_retries_once(retry, retry_on_error) -> None:
    """A command that fails on a connection the server closed (Redis restarted) is sent once more."""
    from redis.asyncio.retry import Retry
    from redis.exceptions import ConnectionError as RedisConnectionError

    assert isinstance(retry, Retry) and retry._retries == 1
    assert retry_on_error == [RedisConnectionError]


def test_redis_url_gives_the_core_layer(monkeypatch):
    settings = load_settings(monkeypatch, REDIS_URL="redis://cache:6379/2", CHANNELS_PREFIX="prod",
                             CHANNELS_CAPACITY="500")
    assert settings["CHANNEL_LAYERS"] == {"default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": "redis://cache:6379/2", "socket_timeout": None}], "prefix": "prod",
                   "capacity": 500, "expiry": 60, "group_expiry": 300},
    }}
    app = app_settings(settings)
    assert (app["PRESENCE_BACKEND"], app["REDIS_PREFIX"]) == (REDIS_PRESENCE, "prod")
    assert app["redis_hosts"] == [{"address": "redis://cache:6379/2", "socket_timeout": None}]


@pytest.mark.parametrize("variable", ["REDIS_PREFIX", "CHANNELS_PREFIX"])
def test_one_prefix_namespaces_every_redis_key(monkeypatch, variable):
    """Channel layer, cache (throttles) and presence: deployments sharing a Redis never meet.
    CHANNELS_PREFIX is the older name of REDIS_PREFIX."""
    settings = load_settings(monkeypatch, REDIS_URL="redis://cache:6379/2", **{variable: "staging"})
    assert settings["CHANNEL_LAYERS"]["default"]["CONFIG"]["prefix"] == "staging"
    assert settings["CACHES"]["default"]["KEY_PREFIX"] == "staging"
    assert app_settings(settings)["REDIS_PREFIX"] == "staging"


def test_sentinels_give_a_sentinel_managed_master(monkeypatch):
    settings = load_settings(monkeypatch, REDIS_SENTINELS="10.0.0.1:26379, 10.0.0.2:26380,[fd00::3]:26379,s4",
                             REDIS_SENTINEL_MASTER="notifications", REDIS_SENTINEL_DB="3",
                             REDIS_SENTINEL_PASSWORD="pw")
    assert settings["CHANNEL_LAYERS"]["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"
    assert settings["CHANNEL_LAYERS"]["default"]["CONFIG"]["hosts"] == [{
        "sentinels": [("10.0.0.1", 26379), ("10.0.0.2", 26380), ("fd00::3", 26379), ("s4", 26379)],
        "master_name": "notifications", "db": 3, "socket_timeout": None, "password": "pw",
    }]
    app = app_settings(settings)
    assert app["PRESENCE_BACKEND"] == REDIS_PRESENCE
    assert app["redis_hosts"] == settings["CHANNEL_LAYERS"]["default"]["CONFIG"]["hosts"]
    # channels-redis turns that entry into a SentinelConnectionPool for the master.
    from channels_redis.utils import create_pool
    from redis.asyncio.sentinel import SentinelConnectionPool

    pool = create_pool(settings["CHANNEL_LAYERS"]["default"]["CONFIG"]["hosts"][0])
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "notifications"


def test_sentinels_need_a_master_name(monkeypatch):
    with pytest.raises(ImproperlyConfigured, match="REDIS_SENTINEL_MASTER"):
        load_settings(monkeypatch, REDIS_SENTINELS="10.0.0.1:26379")
    with pytest.raises(ImproperlyConfigured, match="host:port"):
        parse_sentinels("10.0.0.1:port")


def test_comma_separated_redis_urls_are_shards_and_the_cache_uses_the_first(monkeypatch):
    settings = load_settings(monkeypatch, REDIS_URL=" redis://shard-a:6379/0, ,redis://shard-b:6380/1,",
                             REDIS_PREFIX="prod")
    assert settings["REDIS_URLS"] == ["redis://shard-a:6379/0", "redis://shard-b:6380/1"]
    assert settings["CHANNEL_LAYERS"] == {"default": {
        "BACKEND": SHARDED_BACKEND,
        "CONFIG": {"hosts": [{"address": "redis://shard-a:6379/0", "socket_timeout": None},
                             {"address": "redis://shard-b:6380/1", "socket_timeout": None}],
                   "prefix": "prod", "capacity": 10_000, "expiry": 60, "group_expiry": 300},
    }}
    # Django's RedisCache would take a list as primary + read replicas: the first server only.
    assert settings["CACHES"]["default"] == {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                             "LOCATION": "redis://shard-a:6379/0", "KEY_PREFIX": "prod"}
    app = app_settings(settings)
    assert app["PRESENCE_BACKEND"] == REDIS_PRESENCE
    assert [host["address"] for host in app["redis_hosts"]] == ["redis://shard-a:6379/0", "redis://shard-b:6380/1"]
    pubsub = load_settings(monkeypatch, REDIS_URL="redis://a:6379/0,redis://b:6379/0", CHANNELS_LAYER="pubsub")
    assert pubsub["CHANNEL_LAYERS"]["default"]["BACKEND"] == "channels_redis.pubsub.RedisPubSubChannelLayer"
    assert len(pubsub["CHANNEL_LAYERS"]["default"]["CONFIG"]["hosts"]) == 2


def test_redis_url_entries_may_use_tls_passwords_and_unix_sockets(monkeypatch):
    value = "rediss://:p%2Cw@a:6380/2,unix:///run/redis.sock?db=1,redis://b"
    settings = load_settings(monkeypatch, REDIS_URL=value)
    assert [h["address"] for h in settings["CHANNEL_LAYERS"]["default"]["CONFIG"]["hosts"]] == value.split(",")


def test_blank_redis_url_is_unset(monkeypatch):
    settings = load_settings(monkeypatch, REDIS_URL="  ")
    assert (settings["REDIS_URLS"], settings["CHANNEL_LAYERS"]) == ([], MEMORY)
    assert settings["CACHES"]["default"]["BACKEND"] == "django.core.cache.backends.locmem.LocMemCache"


@pytest.mark.parametrize("value, message", [
    ("redis://a:6379/0,b:6379", "'b:6379' is not a Redis URL"),
    ("redis://a:6379/0;redis://b:6379/0", "is not a Redis URL"),  # not comma-separated: db "0;redis:..."
    ("http://a:6379/0", "'http://a:6379/0' is not a Redis URL"),
    ("redis://a:port/0", "'redis://a:port/0' is not a Redis URL"),
    ("redis://a:6379/zero", "is not a Redis URL"),
    ("redis:///0", "is not a Redis URL"),
    (" , ,", "REDIS_URL lists no Redis server"),
    ("redis://a:6379/0, redis://a:6379/0", "REDIS_URL lists a server twice"),
])
def test_a_malformed_redis_url_list_is_improperly_configured(monkeypatch, value, message):
    with pytest.raises(ImproperlyConfigured, match=re.escape(message)) as raised:
        load_settings(monkeypatch, REDIS_URL=value)
    assert "REDIS_URL" in str(raised.value)


def test_several_sentinel_masters_give_one_sentinel_managed_shard_each(monkeypatch):
    settings = load_settings(monkeypatch, REDIS_SENTINELS="10.0.0.1:26379,10.0.0.2:26379",
                             REDIS_SENTINEL_MASTER=" shard-a,shard-b , shard-c,", REDIS_SENTINEL_DB="2",
                             REDIS_SENTINEL_PASSWORD="pw", REDIS_URL="redis://ignored:6379/0")
    layer = settings["CHANNEL_LAYERS"]["default"]
    assert layer["BACKEND"] == SHARDED_BACKEND
    assert layer["CONFIG"]["hosts"] == [
        {"sentinels": [("10.0.0.1", 26379), ("10.0.0.2", 26379)], "master_name": name, "db": 2,
         "socket_timeout": None, "password": "pw"}
        for name in ("shard-a", "shard-b", "shard-c")
    ]
    assert settings["REDIS_SENTINEL_MASTERS"] == ["shard-a", "shard-b", "shard-c"]
    from channels_redis.utils import create_pool

    assert [create_pool(host).service_name for host in layer["CONFIG"]["hosts"]] == ["shard-a", "shard-b", "shard-c"]
    # One master name: one host, the stock layer, exactly as before.
    one = load_settings(monkeypatch, REDIS_SENTINELS="10.0.0.1:26379", REDIS_SENTINEL_MASTER="notifications")
    assert one["CHANNEL_LAYERS"]["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"
    assert [h["master_name"] for h in one["CHANNEL_LAYERS"]["default"]["CONFIG"]["hosts"]] == ["notifications"]


@pytest.mark.parametrize("value, message", [
    ("shard-a,shard-a", "names a master twice"),
    ("shard a", "'shard a' is not a master name"),
    (" , ", "Set REDIS_SENTINEL_MASTER"),
])
def test_a_malformed_sentinel_master_list_is_improperly_configured(monkeypatch, value, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        load_settings(monkeypatch, REDIS_SENTINELS="10.0.0.1:26379", REDIS_SENTINEL_MASTER=value)


def test_pubsub_layer_has_no_capacity_or_expiry(monkeypatch):
    settings = load_settings(monkeypatch, REDIS_URL="redis://r:6379/0", CHANNELS_LAYER="pubsub")
    assert settings["CHANNEL_LAYERS"]["default"] == {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [{"address": "redis://r:6379/0", "socket_timeout": None}], "prefix": "notifications"},
    }
    with pytest.raises(ImproperlyConfigured, match="CHANNELS_LAYER"):
        load_settings(monkeypatch, REDIS_URL="redis://r:6379/0", CHANNELS_LAYER="cluster")


def test_no_redis_means_the_in_memory_layer_and_local_presence(monkeypatch):
    settings = load_settings(monkeypatch)
    assert settings["CHANNEL_LAYERS"] == MEMORY
    app = app_settings(settings)
    assert (app["PRESENCE_BACKEND"], app["redis_hosts"]) == (LOCAL_PRESENCE, [])


def test_metrics_and_log_settings(monkeypatch):
    settings = load_settings(monkeypatch, METRICS_ALLOWED_IPS="10.0.0.0/8,unix", METRICS_TOKEN="t",
                             LOG_FORMAT="json")
    app = settings["NOTIFICATIONS"]
    assert (app["METRICS_ALLOWED_IPS"], app["METRICS_TOKEN"]) == (["10.0.0.0/8", "unix"], "t")
    assert settings["LOGGING"]["handlers"]["console"]["formatter"] == "json"
    defaults = load_settings(monkeypatch)
    app = defaults["NOTIFICATIONS"]
    assert (app["METRICS_ALLOWED_IPS"], app["METRICS_TOKEN"]) == (["127.0.0.1", "::1"], "")
    assert defaults["LOGGING"]["handlers"]["console"]["formatter"] == "plain"
    with pytest.raises(ImproperlyConfigured, match="LOG_FORMAT"):
        load_settings(monkeypatch, LOG_FORMAT="xml")


def test_in_memory_layer_in_production_is_warning_w001(settings):
    settings.CHANNEL_LAYERS = MEMORY
    settings.DEBUG = True
    assert channel_layer_check() == []
    settings.DEBUG = False
    [warning] = channel_layer_check()
    assert warning.id == "notifications.W001"
    assert "REDIS_URL" in warning.hint
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer"}}
    assert channel_layer_check() == []


def test_manage_py_check_reports_w001():
    env = {k: v for k, v in os.environ.items() if k not in APP_ENV}
    env.update(DEBUG="0", SECRET_KEY="x", DJANGO_SETTINGS_MODULE="project.settings")
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=BASE_DIR, env=env,
                            capture_output=True, text=True, timeout=60)
    assert "notifications.W001" in result.stdout + result.stderr


def test_bin_serve_refuses_several_workers_without_redis():
    env = {k: v for k, v in os.environ.items() if k not in APP_ENV}
    result = subprocess.run([str(BASE_DIR / "bin" / "serve"), "--workers", "2"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert "2 workers need a shared channel layer: set REDIS_URL (or REDIS_SENTINELS)" in result.stderr


# A real Sentinel in front of the real Redis


@contextlib.contextmanager
def running_sentinel(tmp_path, masters: dict[str, str]):
    """A Redis Sentinel (``redis-server --sentinel``) on a free port, watching each ``masters``
    URL under its name; yields its (host, port)."""
    binary = shutil.which("redis-sentinel") or shutil.which("redis-server")
    if binary is None:
        missing_service("redis-server is not installed (Sentinel runs as redis-server --sentinel)")
    port = free_port()
    config = tmp_path / f"sentinel-{port}.conf"
    lines = [f"port {port}", "bind 127.0.0.1", "daemonize no", f"dir {tmp_path}"]
    for name, url in masters.items():
        master = redis.Redis.from_url(url).connection_pool.connection_kwargs
        lines.append(f"sentinel monitor {name} {master['host']} {master['port']} 1")
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen([binary, str(config), "--sentinel"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if all(redis.Redis(port=port, socket_timeout=1).sentinel_master(name) for name in masters):
                    break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "Sentinel did not start"
            time.sleep(0.1)
        yield ("127.0.0.1", port)
    finally:
        process.terminate()
        process.wait(5)


@pytest.fixture
def sentinel(redis_url, tmp_path):
    """A Sentinel watching the test Redis as master ``test-master``: its address and the db number."""
    with running_sentinel(tmp_path, {"test-master": redis_url}) as address:
        yield address, int(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get("db") or 0)


@pytest.mark.redis
async def test_channel_layer_and_presence_through_a_real_sentinel(sentinel, settings, monkeypatch):
    from channels_redis.core import RedisChannelLayer

    from notifications.presence import Connection, RedisPresence
    from project.layers import redis_channel_layer

    address, db = sentinel
    layer_settings = redis_channel_layer(prefix="test-sentinel", sentinels=[address], master_name="test-master",
                                         db=db)
    layer = RedisChannelLayer(**layer_settings["CONFIG"])
    channel = await layer.new_channel()
    await layer.group_add("stream", channel)
    await layer.group_send("stream", {"type": "stream.notification", "id": 1})
    assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "stream.notification", "id": 1}
    await layer.flush()

    settings.CHANNEL_LAYERS = {"default": layer_settings}  # presence: the layer's Sentinel host entry
    presence = RedisPresence(prefix="test-sentinel")
    assert [(host["sentinels"], host["master_name"], host["db"]) for host in presence.hosts] == [
        ([address], "test-master", db)]
    await presence.add(Connection(id="c1", user_id=1, username="alice", since=time.time(), server="s"))
    try:
        assert [c.id for c in await asyncio.to_thread(presence.online)] == ["c1"]
    finally:
        await presence.remove("c1")
    assert await asyncio.to_thread(presence.online) == []


@pytest.mark.redis
async def test_channel_layer_and_presence_over_two_sentinel_managed_shards(redis_url, second_redis, tmp_path,
                                                                           settings):
    """REDIS_SENTINEL_MASTER=test-master,test-second: one Sentinel-managed shard per master. A group
    on one shard reaches channels on both; direct sends arrive; presence records land on both
    shards and are all listed."""
    from notifications.layers import ShardedRedisChannelLayer
    from notifications.presence import Connection, RedisPresence, shard_index
    from project.layers import redis_channel_layer

    db = int(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs.get("db") or 0)
    masters = {"test-master": redis_url, "test-second": second_redis.url.rsplit("/", 1)[0] + f"/{db}"}
    with running_sentinel(tmp_path, masters) as address:
        config = redis_channel_layer(prefix=f"test-sentinels-{uuid.uuid4().hex[:8]}", sentinels=[address],
                                     master_name="test-master,test-second", db=db)
        assert config["BACKEND"] == SHARDED_BACKEND
        # Processes (layers) until one has its channel on each shard.
        layers, channels = [], {}
        while len(channels) < 2:
            layer = ShardedRedisChannelLayer(**config["CONFIG"])
            channel = await layer.new_channel()
            layers.append(layer)
            channels.setdefault(layer.consistent_hash(channel), (layer, channel))
        try:
            for layer, channel in channels.values():
                await layer.group_add("stream", channel)
            await layers[0].group_send("stream", {"type": "stream.notification", "id": 1})
            for layer, channel in channels.values():
                assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "stream.notification", "id": 1}
                await layer.send(channel, {"type": "readyz.ping"})  # /readyz: a direct send, on either shard
                assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "readyz.ping"}
        finally:
            await layers[0].flush()
            for layer in layers:
                await layer.close_pools()

        settings.CHANNEL_LAYERS = {"default": config}  # presence: one shard per Sentinel host entry
        prefix = f"test-sentinels-{uuid.uuid4().hex[:8]}"
        presence = RedisPresence(prefix=prefix)
        ids = [f"c{i}" for i in range(6)]
        assert {shard_index(cid, 2) for cid in ids} == {0, 1}
        for i, cid in enumerate(ids):
            await presence.add(Connection(id=cid, user_id=1, username="alice", since=time.time() + i, server="s"))
        try:
            assert [c.id for c in await asyncio.to_thread(presence.online)] == ids
            for shard, url in enumerate(masters.values()):
                on_server = redis.Redis.from_url(url).zrange(f"{prefix}:presence:alive", 0, -1)
                assert sorted(m.decode() for m in on_server) == [c for c in ids if shard_index(c, 2) == shard]
        finally:
            for cid in ids:
                await presence.remove(cid)
        assert await asyncio.to_thread(presence.online) == []
