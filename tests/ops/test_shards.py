"""Several Redis servers as shards (``REDIS_URL=<first>,<second>``): the test Redis and a private
``redis-server`` (``second_redis``).

- The channel layer over two real servers: a group on one shard reaches channels on both, and a
  direct send to a process's channel arrives wherever that channel lives (channels-redis 4.3.0
  alone loses about half of those: ``notifications.layers.ShardedRedisChannelLayer``).
- Two ``bin/serve`` processes on the shards, as two machines: personal, topic and broadcast sends
  through either reach a user connected to both; "who is online" lists the connections of both.
- The second shard restarted (empty) while notifications flow: every client still ends with
  everything, once, in order. The group memberships it held are gone; a hub whose own channel
  lives on the other shard finds its marker gone from the restarted one and joins again.

The server tests find each process's channel-layer channel, and the groups it is in, by reading
the group keys (``<prefix>:group:<name>``) on both servers, whatever the groups are called.
"""

import asyncio
import json
import logging
import time
import uuid

import pytest
import redis
from channels_redis.core import RedisChannelLayer
from channels_redis.utils import _consistent_hash

from notifications.hub import MARKER_PREFIX
from notifications.layers import ShardedRedisChannelLayer
from notifications.presence import RedisPresence, shard_index
from project.layers import redis_channel_layer
from tests.faults.client import ResumingClient, compare, start_clients, stop_clients
from tests.faults.conftest import world as fault_world  # noqa: F401  (a fixture: the fault tests' World)
from tests.faults.scenarios import Ledger, Member, World, _deliver, _expected, log_trouble, send_notifications, ws_base
from tests.ops.test_scaleout import hello, sends_through_either_reach_a_user_on_both, wait_for_rows
from tests.server import LiveServer, http_request
from tests.support import wait_until

SHARDS = 2
SHARDED_BACKEND = "notifications.layers.ShardedRedisChannelLayer"  # the layer with several hosts
SYNC_INTERVAL = 2.0  # HUB_SYNC_INTERVAL's default, which the fault world's servers run with
GROUP = "test-group"


def shard_of(name: str) -> int:
    """The shard channels-redis keeps a group, or a process-local channel (by its part up to
    ``!``), on."""
    return _consistent_hash(name[: name.index("!") + 1] if "!" in name else name, SHARDS)


def memberships(urls: list[str], prefix: str) -> dict[str, set[tuple[str, int]]]:
    """Every channel in a group under ``prefix``, on any shard: {channel: {(group, group's shard)}}."""
    found: dict[str, set[tuple[str, int]]] = {}
    start = len(f"{prefix}:group:")
    for shard, url in enumerate(urls):
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            for key in client.scan_iter(match=f"{prefix}:group:*"):
                if key.decode()[start:].startswith(MARKER_PREFIX):
                    continue  # a hub's marker (notifications/hub.py), not a stream's group
                for member in client.zrange(key, 0, -1):
                    found.setdefault(member.decode(), set()).add((key.decode()[start:], shard))
        finally:
            client.close()
    return found


def groups_of_hub_on(urls: list[str], prefix: str, shard: int) -> list[tuple[str, int]]:
    """The (group, group's shard) memberships of the channels on ``shard``: one process's, here."""
    found = memberships(urls, prefix)
    return sorted({g for channel, groups in found.items() if shard_of(channel) == shard for g in groups})


def has_key(url: str, key: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return bool(client.exists(key))
    finally:
        client.close()


@pytest.fixture
def shard_urls(redis_url, second_redis) -> list[str]:
    return [redis_url, second_redis.url]


# The channel layer over two real servers


async def layers_on_both_shards(cls, config: dict) -> dict[int, tuple]:
    """One layer ("process") with its channel on each shard: {shard: (layer, channel)}."""
    found: dict[int, tuple] = {}
    while len(found) < SHARDS:
        layer = cls(**config)
        channel = await layer.new_channel()
        found.setdefault(shard_of(channel), (layer, channel))
    return found


@pytest.mark.redis
async def test_a_group_on_one_shard_reaches_channels_on_both_and_direct_sends_arrive(shard_urls):
    config = redis_channel_layer(shard_urls, f"test-shards-{uuid.uuid4().hex[:8]}")
    assert config["BACKEND"] == SHARDED_BACKEND
    prefix = config["CONFIG"]["prefix"]
    processes = await layers_on_both_shards(ShardedRedisChannelLayer, config["CONFIG"])
    sender = ShardedRedisChannelLayer(**config["CONFIG"])
    try:
        for layer, channel in processes.values():
            await layer.group_add(GROUP, channel)
        # The membership lives on the group's shard only.
        groups = memberships(shard_urls, prefix)
        assert {channel: groups[channel] for _layer, channel in processes.values()} == {
            channel: {(GROUP, shard_of(GROUP))} for _layer, channel in processes.values()}
        for i in range(3):
            await sender.group_send(GROUP, {"type": "stream.notification", "id": i})
            for layer, channel in processes.values():
                assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "stream.notification", "id": i}
        for _ in range(10):  # as /readyz does: a new channel, a direct send, a receive
            for layer, _channel in processes.values():
                channel = await layer.new_channel()
                await layer.send(channel, {"type": "readyz.ping"})
                assert await asyncio.wait_for(layer.receive(channel), 2) == {"type": "readyz.ping"}
    finally:
        await sender.flush()
        for layer, _channel in processes.values():
            await layer.close_pools()
        await sender.close_pools()


@pytest.mark.redis
async def test_stock_channels_redis_loses_direct_sends_over_shards(shard_urls):
    """Why ShardedRedisChannelLayer exists (django/channels_redis#221): channels-redis 4.3.0 puts a
    direct send to ``specific.<process>!<id>`` on the shard of the whole name, and reads it on
    the shard of ``specific.<process>!``. If this test fails, channels-redis is fixed: drop
    ShardedRedisChannelLayer (notifications/layers.py) and this test."""
    config = redis_channel_layer(shard_urls, f"test-shards-{uuid.uuid4().hex[:8]}")["CONFIG"]
    layer = RedisChannelLayer(**config)
    try:
        channel = await layer.new_channel()
        while layer.consistent_hash(channel) == shard_of(channel):
            channel = await layer.new_channel()
        await layer.send(channel, {"type": "readyz.ping"})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(layer.receive(channel), 1)
    finally:
        await layer.flush()
        await layer.close_pools()


@pytest.mark.redis
async def test_a_backup_cleanup_on_a_host_that_went_away_is_a_warning_not_a_traceback(shard_urls, second_redis,
                                                                                      caplog):
    """channels-redis removes a received message's backup copy in a task nobody awaits: with its
    host just gone, asyncio would log "Task exception was never retrieved" and a traceback."""
    layer = ShardedRedisChannelLayer(**redis_channel_layer(shard_urls, f"test-shards-{uuid.uuid4().hex[:8]}")["CONFIG"])
    await layer.connection(1).ping()  # a pooled connection to the second server, which then goes away
    await asyncio.to_thread(second_redis.stop)
    try:
        with caplog.at_level(logging.WARNING, logger="notifications.layers"):
            await layer._clean_receive_backup(1, "specific.x!")
        assert "could not remove a received message's backup copy on host 1: ConnectionError" in caplog.text
    finally:
        await layer.close_pools()


# Two bin/serve processes on two shards


@pytest.fixture
def deploys():
    from notifications.models import Topic

    return Topic.objects.create(slug="deploys", title="Deploys")


@pytest.fixture
def two_sharded_servers(second_redis, redis_url, serve):
    """Factory: ``await two_sharded_servers()`` starts two bin/serve processes (SERVER_ID host-a
    and host-b) on ``REDIS_URL=<test Redis>,<second_redis>``. ``second_redis`` is set up before
    ``serve``, so it stops after the servers."""
    urls = f"{redis_url},{second_redis.url}"

    async def start():
        return await asyncio.gather(
            asyncio.to_thread(serve, "host-a", SERVER_ID="host-a", REDIS_URL=urls),
            asyncio.to_thread(serve, "host-b", SERVER_ID="host-b", REDIS_URL=urls),
        )

    return start


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_sends_through_either_process_reach_a_user_on_both_over_two_shards(
    two_sharded_servers, deploys, alice, alice_token, staff_token
):
    a, b = await two_sharded_servers()
    await sends_through_either_reach_a_user_on_both(a, b, deploys, alice, alice_token, staff_token, rounds=2)
    # /readyz's round trip through the layer (a direct send) works on every shard.
    for server in (a, b):
        statuses = [(await server.request_async("GET", "/readyz")).status for _ in range(10)]
        assert statuses == [200] * 10


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_who_is_online_lists_connections_of_both_processes_over_two_shards(
    two_sharded_servers, shard_urls, alice, bob, alice_token, bob_token, superuser_session
):
    a, b = await two_sharded_servers()
    prefix = a.env["CHANNELS_PREFIX"]
    sockets = [await hello(s, t) for s, t in ((a, alice_token), (a, bob_token), (b, alice_token),
                                               (b, bob_token), (b, bob_token))]
    everyone = sorted([("host-a", "127.0.0.1")] * 2 + [("host-b", "127.0.0.1")] * 3)
    for server in (a, b):
        assert await wait_for_rows(server, superuser_session, everyone) == everyone
    # Each record is on the shard its connection id hashes to, and only there.
    listed = await asyncio.to_thread(RedisPresence(url=shard_urls, prefix=prefix).online)
    assert len(listed) == 5
    for connection in listed:
        key = f"{prefix}:presence:conn:{connection.id}"
        assert [has_key(url, key) for url in shard_urls] == [
            shard == shard_index(connection.id, SHARDS) for shard in range(SHARDS)]
    for ws, _hello in sockets:
        await ws.close()
    assert await wait_for_rows(a, superuser_session, []) == []


# The second shard restarted


async def start_with_hub_on(world: World, urls: str, name: str, tokens: list[str], wanted, **env):
    """A uvicorn process whose hub's channel, with ``tokens``' clients connected, is on the shard
    and in the groups that ``wanted(shard, groups)`` accepts: started again until it is
    (channels-redis picks a random prefix per process: a given shard half the time). Returns
    the server, the connected clients, the channel's shard and its {(group, group's shard)}."""
    shard_list = urls.split(",")
    for attempt in range(16):
        before = memberships(shard_list, world.prefix)
        server = await world.start("uvicorn", f"{name}-{attempt}", REDIS_URL=urls, **env)
        clients = await start_clients(tokens, [ws_base(server)])
        await asyncio.sleep(0.3)  # the hub joins its sockets' groups around their hello
        mine = {c: g for c, g in memberships(shard_list, world.prefix).items() if c not in before}
        shards = {shard_of(channel) for channel in mine}
        assert len(shards) == 1, mine  # one process: one channel-layer prefix, one shard
        [shard] = shards
        groups = set().union(*mine.values())
        if wanted(shard, groups):
            return server, clients, shard, groups
        await stop_clients(clients)
        await asyncio.to_thread(server.stop)  # uvicorn's lifespan shutdown leaves the groups
    raise AssertionError(f"{name}: no process started as wanted in 16 attempts")


async def probe(world: World, server: LiveServer, ledger: Ledger, clients: list[ResumingClient],
                members: list[Member], payload: dict, kind: str, username: str | None = None,
                timeout: float = 15.0) -> float | None:
    """Send one notification through ``server``'s API; seconds until every one of ``clients``
    (a connection of the member at the same position) in its audience has it (None: not in time)."""
    started = time.monotonic()
    response = await asyncio.to_thread(http_request, server, "POST", "/api/notifications/", token=world.staff_token,
                                       json_body={"title": f"probe {kind}", **payload})
    ledger.record(kind, username, response)
    assert response.status == 201, response.text
    [sent] = response.json()["notifications"]
    audience = [c for c, m in zip(clients, members, strict=True) if sent["id"] in ledger.expected(m)]
    assert audience
    if await wait_until(lambda: all(sent["id"] in c.received_set for c in audience), timeout, interval=0.02):
        return round(time.monotonic() - started, 3)
    return None


async def broadcast(world: World, server: LiveServer, ledger: Ledger, clients: list[ResumingClient],
                    members: list[Member]) -> float | None:
    return await probe(world, server, ledger, clients, members, {"broadcast": True}, "broadcast")


@pytest.mark.faults
@pytest.mark.server
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(300)
async def test_a_shard_restarted_mid_stream_loses_and_duplicates_nothing(fault_world, second_redis):  # noqa: F811
    """Two uvicorn processes on ``REDIS_URL=<test Redis>,<second>``: A's hub channel on the
    first shard, B's on the second. The second is stopped while notifications flow through both
    APIs (stored, 201; pushes to groups on it fail), kept down 3 s, and started again empty:
    the memberships it held are gone. B's receive fails, so B joins its groups again and reads
    what it missed; A's receive never fails, so A stays out of the groups it had there and finds
    their notifications in the store (HUB_SYNC_INTERVAL). Every client must end with everything,
    once, in order; the facts (latencies, memberships, readiness, log lines) are printed."""
    world = fault_world
    urls = f"{world.redis_url},{second_redis.url}"
    shard_list = urls.split(",")
    env = {"PRESENCE_TTL": 3}
    probe_token = [world.members[0].token]
    server_a, probes, shard_a, _groups = await start_with_hub_on(
        world, urls, "shard-A", probe_token, lambda shard, groups: shard == 0, **env)
    await stop_clients(probes)
    server_b, probes, shard_b, _groups = await start_with_hub_on(
        world, urls, "shard-B", probe_token, lambda shard, groups: shard == 1, **env)
    await stop_clients(probes)
    members = world.assign(40)
    tokens = [m.token for m in members]
    on_a = await start_clients(tokens[:20], [ws_base(server_a), ws_base(server_b)])
    on_b = await start_clients(tokens[20:], [ws_base(server_b), ws_base(server_a)])
    for offset, client in enumerate(on_b):
        client.name = str(20 + offset)
    clients = on_a + on_b
    ledger = Ledger()
    facts: dict = {}
    try:
        await asyncio.sleep(0.3)
        facts["groups_before"] = {"A": groups_of_hub_on(shard_list, world.prefix, shard_a),
                                  "B": groups_of_hub_on(shard_list, world.prefix, shard_b)}
        facts["latency_before"] = [await broadcast(world, s, ledger, clients, members) for s in (server_a, server_b)]
        senders = [asyncio.create_task(send_notifications(world, s, ledger, count=80, rate=10))
                   for s in (server_a, server_b)]  # 8 s of sends through both APIs
        await asyncio.sleep(2)
        await asyncio.to_thread(second_redis.stop)
        facts["readyz_while_down"] = [(await asyncio.to_thread(http_request, s, "GET", "/readyz")).status
                                      for s in (server_a, server_b)]
        await asyncio.sleep(3)
        await asyncio.to_thread(second_redis.start)
        restarted_at = time.monotonic()
        await asyncio.gather(*senders)
        facts["all_delivered"] = await _deliver(clients, ledger, members, 60)
        facts["delivered_s_after_restart"] = round(time.monotonic() - restarted_at, 1)
        facts["groups_after"] = {"A": groups_of_hub_on(shard_list, world.prefix, shard_a),
                                 "B": groups_of_hub_on(shard_list, world.prefix, shard_b)}
        facts["latency_after_to_A_clients"] = [await broadcast(world, s, ledger, on_a, members[:20])
                                               for s in (server_a, server_b)]
        facts["latency_after_to_B_clients"] = [await broadcast(world, s, ledger, on_b, members[20:])
                                               for s in (server_a, server_b)]
        presence = RedisPresence(url=urls, prefix=world.prefix, ttl=3)
        facts["online_after"] = len(await asyncio.to_thread(presence.online))
        complete = await _deliver(clients, ledger, members, 30)
    finally:
        await stop_clients(clients)
    report = compare(clients, _expected(ledger, members), ledger.sent)
    facts["refused_sends"] = ledger.refused
    for name, server in (("A", server_a), ("B", server_b)):
        log = server.log()
        trouble = log_trouble(log)
        facts[f"{name}_alive"] = server.process.poll() is None
        facts[f"{name}_tracebacks"] = trouble["tracebacks"]
        facts[f"{name}_error_lines"] = trouble["errors"]
        if trouble["tracebacks"]:  # the first one, to see what failed
            facts[f"{name}_first_traceback"] = log[log.index("Traceback") - 300:][:3000]
    text = f"{report.summary()}\n{json.dumps(facts, indent=1, default=str)}"
    print(text)
    assert complete and facts["all_delivered"], text
    assert (report.lost, report.duplicated, report.unexpected, report.out_of_order, report.unrecovered) == (
        0, 0, 0, 0, 0), text
    assert report.sent > 100 and facts["refused_sends"] == [], text  # stored while the shard was down, too
    assert (facts["A_alive"], facts["B_alive"], facts["A_tracebacks"], facts["B_tracebacks"]) == (
        True, True, 0, 0), text
    assert facts["online_after"] == 40, text  # presence records on the restarted shard written again


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_a_hub_on_another_shard_is_live_again_after_a_shard_restarts(fault_world, second_redis):  # noqa: F811
    """A hub whose channel is on the first shard, in groups held by the second: the second
    restarts empty, forgetting those memberships. Within one HUB_SYNC_INTERVAL of its return the
    hub finds its marker gone there and joins those groups again: sends are live again."""
    world = fault_world
    urls = f"{world.redis_url},{second_redis.url}"
    members = world.members[:4]  # their own groups, the topic's (members 0 and 2 follow it), broadcasts'
    server, clients, _shard, groups = await start_with_hub_on(
        world, urls, "deaf", [m.token for m in members],
        lambda shard, groups: shard == 0 and any(group_shard == 1 for _group, group_shard in groups))
    ledger = Ledger()
    sends = [({"broadcast": True}, "broadcast", None), ({"topic": "faults"}, "topic", None)] + [
        ({"users": [m.username]}, "user", m.username) for m in members]
    try:
        before = [await probe(world, server, ledger, clients, members, *send) for send in sends]
        assert all(seconds is not None and seconds < 0.5 for seconds in before), before
        await asyncio.to_thread(second_redis.stop)
        await asyncio.sleep(1)
        await asyncio.to_thread(second_redis.start)
        await asyncio.sleep(SYNC_INTERVAL + 0.5)  # the hub's check finds the marker gone
        after = [await probe(world, server, ledger, clients, members, *send) for send in sends]
    finally:
        await stop_clients(clients)
    assert all(seconds is not None and seconds < 0.5 for seconds in after), (after, sorted(groups))
