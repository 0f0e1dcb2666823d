"""Presence over several Redis servers (shards): each connection's record lives on the shard its id
hashes to, heartbeats and removals go there, and "who is online" reads every shard. Two real
servers: the test Redis and a private ``redis-server`` (``second_redis``)."""

import asyncio
import logging
import time
import uuid

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured

from notifications.presence import Connection, RedisPresence, shard_index

pytestmark = pytest.mark.redis


def connection(cid: str, since: float, server: str = "host-a") -> Connection:
    return Connection(id=cid, user_id=1, username="alice", since=since, server=server)


@pytest.fixture
def shards(redis_url, second_redis) -> list[str]:
    return [redis_url, second_redis.url]


@pytest.fixture
def prefix(shards):
    """A key prefix of this test's own; its keys are deleted from both shards at teardown."""
    name = f"test-presence-{uuid.uuid4().hex[:8]}"
    yield name
    for url in shards:
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            keys = list(client.scan_iter(match=f"{name}:*"))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass  # the private server was stopped by the test
        finally:
            client.close()


def keys_on(url: str, prefix: str) -> set[str]:
    """The connection ids whose record is on this server (key and alive-set member)."""
    client = redis.Redis.from_url(url)
    try:
        records = {k.decode().rsplit(":", 1)[1] for k in client.scan_iter(match=f"{prefix}:presence:conn:*")}
        alive = {m.decode() for m in client.zrange(f"{prefix}:presence:alive", 0, -1)}
    finally:
        client.close()
    assert records == alive, (url, records, alive)
    return records


async def online(presence: RedisPresence) -> list[str]:
    return [c.id for c in await asyncio.to_thread(presence.online)]


def test_shard_index_is_stable_and_spreads():
    assert [shard_index("anything", 1), shard_index("", 1)] == [0, 0]
    # CRC32: the same in every process and Python version (not hash(), which is salted per process);
    # pinned, since processes of two versions during a rolling deploy must agree.
    assert [shard_index(cid, 2) for cid in ("a", "b", "c", "d")] == [1, 1, 1, 0]
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[shard_index(uuid.uuid4().hex, 3)] += 1
    assert all(800 < count < 1200 for count in counts), counts


def test_several_urls_or_sentinel_masters_are_shards(settings):
    assert RedisPresence(url="redis://a:6379/0, redis://b:6379/0,").hosts == [{"address": "redis://a:6379/0"},
                                                                             {"address": "redis://b:6379/0"}]
    assert RedisPresence(url=["redis://a:6379/0"]).shards == 1
    # By default, the channel layer's hosts: each a shard, as for the layer.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "notifications.layers.ShardedRedisChannelLayer", "CONFIG": {
        "hosts": ["redis://a:6379/0", {"address": "redis://b:6379/1", "socket_timeout": None}]}}}
    assert [host["address"] for host in RedisPresence().hosts] == ["redis://a:6379/0", "redis://b:6379/1"]
    sentinels = [{"sentinels": [("10.0.0.1", 26379)], "master_name": name, "db": 2} for name in ("shard-a", "shard-b")]
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": sentinels}}}
    presence = RedisPresence()
    assert (presence.hosts, presence.shards) == (sentinels, 2)
    # NOTIFICATIONS["REDIS_URL"] wins over the layer.
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "REDIS_URL": "redis://c:6379/0,redis://d:6379/0"}
    assert RedisPresence().shards == 2 and RedisPresence().hosts[0] == {"address": "redis://c:6379/0"}
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "REDIS_URL": None}
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL"):
        RedisPresence()


def test_a_layer_host_entry_connects_with_its_options_but_not_the_layers_timeout_or_retry():
    """A host entry's options reach presence's clients, except the layer's blocking reads (no socket
    timeout) and its asyncio retry objects: presence's clients get retry objects of their own kind."""
    import redis.asyncio
    from redis.retry import Retry

    presence = RedisPresence(url="redis://unused:6379/0")
    presence.hosts = [{"address": "redis://a:6379/3", "socket_timeout": None, "health_check_interval": 7,
                       "retry": object(), "retry_on_error": []}]
    client = presence._connect(redis)
    options = client.connection_pool.connection_kwargs
    assert (options["host"], options["db"], options["health_check_interval"]) == ("a", 3, 7)
    assert "socket_timeout" not in options and isinstance(options["retry"], Retry)
    client.close()
    pool = presence._connect(redis.asyncio).connection_pool
    assert (pool.max_connections, pool.connection_kwargs["host"]) == (16, "a")

    presence.hosts = [{"sentinels": [("10.0.0.1", 26379)], "master_name": "m", "db": 2, "password": "pw",
                       "socket_timeout": None}]
    master = presence._connect(redis).connection_pool
    assert (master.service_name, master.connection_kwargs["db"], master.connection_kwargs["password"]) == ("m", 2, "pw")
    assert presence.hosts[0]["socket_timeout"] is None  # the entry itself is left as it was


async def test_records_spread_over_both_shards_and_online_lists_all(shards, prefix):
    server_a = RedisPresence(url=shards, prefix=prefix, ttl=30)
    server_b = RedisPresence(url=",".join(shards), prefix=prefix, ttl=30)  # another process, same shards
    ids = [f"conn-{i}" for i in range(12)]
    start = time.time()
    for i, cid in enumerate(ids):
        await (server_a if i % 2 else server_b).add(connection(cid, start + i, server="a" if i % 2 else "b"))
    placed = [keys_on(url, prefix) for url in shards]
    assert placed == [{c for c in ids if shard_index(c, 2) == n} for n in (0, 1)]
    assert placed[0] and placed[1]  # both shards hold some
    assert await online(server_a) == await online(server_b) == ids  # oldest first, across shards

    # Removal goes to the record's own shard, from either process.
    for cid in ids[:6]:
        await server_a.remove(cid)
    assert [keys_on(url, prefix) for url in shards] == [{c for c in ids[6:] if shard_index(c, 2) == n}
                                                        for n in (0, 1)]
    assert await online(server_b) == ids[6:]
    for cid in ids[6:]:
        await server_b.remove(cid)
    assert await online(server_a) == []


async def test_heartbeats_refresh_each_shard_and_a_dead_process_expires_from_both(shards, prefix):
    alive = RedisPresence(url=shards, prefix=prefix, ttl=1.5)
    crashed = RedisPresence(url=shards, prefix=prefix, ttl=1.5)
    live_ids, dead_ids = ["a1", "a2", "a3", "a4"], ["b1", "b2", "b3", "b4"]
    assert {shard_index(c, 2) for c in live_ids} == {shard_index(c, 2) for c in dead_ids} == {0, 1}
    for cid in live_ids:
        await alive.add(connection(cid, time.time()))
    for cid in dead_ids:
        await crashed.add(connection(cid, time.time()))
    assert sorted(await online(alive)) == sorted(live_ids + dead_ids)
    # The second process "crashes": no more heartbeats, no removal.
    crashed.local.clear()
    for task in crashed._heartbeats.values():
        task.cancel()
    await asyncio.sleep(2.2)  # past the TTL; the first keeps heartbeating (every ttl/3) on both shards
    assert sorted(await online(crashed)) == live_ids
    for cid in live_ids:
        await alive.remove(cid)


async def test_a_shard_down_hides_only_its_connections_until_it_is_back(shards, prefix, second_redis, caplog):
    presence = RedisPresence(url=shards, prefix=prefix, ttl=1.5)
    ids = [f"c{i}" for i in range(8)]
    for i, cid in enumerate(ids):
        await presence.add(connection(cid, time.time() + i))
    on_first = [c for c in ids if shard_index(c, 2) == 0]
    assert on_first and len(on_first) < len(ids)

    await asyncio.to_thread(second_redis.stop)
    with caplog.at_level(logging.WARNING, logger="notifications.presence"):
        assert await online(presence) == on_first  # no error: the shards that answer
        await asyncio.sleep(2.2)  # heartbeats to the first shard go on while the second is down
        assert await online(presence) == on_first
    assert "shard 2 of 2 did not answer" in caplog.text
    assert "presence heartbeat failed" in caplog.text

    # Back, and empty (no persistence): the next heartbeat writes its records again.
    await asyncio.to_thread(second_redis.start)
    deadline = time.monotonic() + 3
    while await online(presence) != ids and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await online(presence) == ids
    for cid in ids:
        await presence.remove(cid)
    assert await online(presence) == []


async def test_every_shard_down_is_an_error(shards, prefix, second_redis):
    presence = RedisPresence(url=[second_redis.url], prefix=prefix)
    await asyncio.to_thread(second_redis.stop)
    with pytest.raises(redis.ConnectionError):
        await asyncio.to_thread(presence.online)  # one shard: as before, the caller sees the error


async def test_a_burst_of_adds_and_removes_goes_out_in_one_pipeline_per_shard(shards, prefix, monkeypatch):
    """A deploy drops and reconnects every socket at once: the presence writes of one event-loop
    tick share a pipeline per shard (each used to take a pooled connection of its own, and under
    a storm waited past the pool's timeout: "No connection available")."""
    presence = RedisPresence(url=shards, prefix=prefix, ttl=30)
    clients = presence._loop_clients()
    pipelines = []
    for client in clients:
        real = client.pipeline

        def counting(*args, _real=real, **kwargs):
            pipelines.append(1)
            return _real(*args, **kwargs)

        monkeypatch.setattr(client, "pipeline", counting)
    ids = [f"burst-{i}" for i in range(400)]
    start = time.time()
    await asyncio.gather(*(presence.add(connection(cid, start + i)) for i, cid in enumerate(ids)))
    assert len(pipelines) == 2  # one per shard, not 400
    assert sorted(await online(presence)) == sorted(ids)
    await asyncio.gather(*(presence.remove(cid) for cid in ids))
    assert len(pipelines) == 4
    assert await online(presence) == [] and keys_on(shards[0], prefix) == keys_on(shards[1], prefix) == set()
