"""The push transport (``notifications/transport.py``): one event loop and one set of Redis
connections per process, bounded waits while Redis is unreachable, pushes from many threads,
after a fork and at exit.

Connection counts are exact only on a Redis of the test's own: a private ``redis-server``
on a free loopback port (``total_connections_received`` of ``INFO stats``)."""

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from channels.layers import get_channel_layer
from django.utils.module_loading import import_string
from prometheus_client import REGISTRY

from notifications import transport
from notifications.models import Notification
from notifications.services import notification_send
from project.layers import redis_channel_layer
from tests.server import APP_ENV, BASE_DIR, HOST, RedisServer, database_url, free_port

from .conftest import MEMORY_LAYER, missing_service, redis_layer_settings

SENDS = 100
PUSH_TIMEOUT = 0.5
SLACK = 0.5  # thread hand-offs, the ORM and a loaded CI machine; not a speed limit

SEND_SCRIPT = """
import sys
import django
django.setup()
from django.contrib.auth import get_user_model
from django.db import transaction
from notifications.services import notification_send
user = get_user_model().objects.get(username=sys.argv[1])
for i in range(int(sys.argv[2])):
    with transaction.atomic():
        notification_send(title=f"from a script {i}", users=[user])
"""

FORK_SCRIPT = """
import os
import django
django.setup()
from notifications import transport
transport.publish([("stream", {"type": "t", "who": "parent, before the fork"})])
pid = os.fork()
if pid == 0:
    transport.publish([("stream", {"type": "t", "who": "child"})])
    os._exit(0)
os.waitpid(pid, 0)
transport.publish([("stream", {"type": "t", "who": "parent, after the fork"})])
"""

EXIT_SCRIPT = """
import asyncio
import django
django.setup()
from notifications import transport

async def main():
    transport.publish([("stream", {"type": "t", "who": "scheduled just before exit"})])

asyncio.run(main())
"""


def script_env(**extra: str) -> dict[str, str]:
    """This environment without the app's variables, plus ``extra`` (as tests/server.py does)."""
    env = {k: v for k, v in os.environ.items() if k not in APP_ENV}
    env.update({"DJANGO_SETTINGS_MODULE": "project.settings", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def run_script(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=BASE_DIR, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def build_layer(url: str, prefix: str):
    """A channel layer of its own (not the process's ``get_channel_layer()``): a receiver."""
    config = redis_channel_layer(url, prefix)
    return import_string(config["BACKEND"])(**config["CONFIG"])


async def receive_all(layer, channel: str, count: int, timeout: float = 5.0) -> list[dict]:
    return [await asyncio.wait_for(layer.receive(channel), timeout) for _ in range(count)]


def push_failures() -> float:
    return REGISTRY.get_sample_value("notifications_push_failures_total") or 0.0


def wait_for(condition, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def groups_of_personal_notifications(user, monkeypatch) -> set[str]:
    """The channel-layer groups a personal notification of ``user`` is pushed to, as the code
    routes it (one send, its publish recorded instead of sent)."""
    recorded: list[tuple[str, dict]] = []
    with monkeypatch.context() as patch:
        patch.setattr(transport, "publish", recorded.extend)
        notification_send(title="where does it go", users=[user])
    assert recorded, "the send published nothing"
    return {group for group, _ in recorded}


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own, so that every connection it counts is the test's."""
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not installed (this test counts connections on a private one)")
    server = RedisServer(tmp_path / "redis.log").start()
    yield server
    server.stop()


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A loopback port that accepts connections and never answers (a hung Redis, a black hole)."""
    listener = socket.create_server((HOST, 0))
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://{HOST}:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join(2)
    for conn in accepted:
        conn.close()
    listener.close()


@pytest.fixture
def short_push_timeout(settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "PUSH_TIMEOUT": PUSH_TIMEOUT}
    transport.failures.seen.clear()  # an earlier test's outage would hide this one's log line
    yield
    transport.failures.seen.clear()


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_100_sends_from_a_sync_script_open_at_most_one_redis_connection(private_redis, make_user, monkeypatch):
    from django.db import connection

    user = make_user("script-recipient")
    groups = groups_of_personal_notifications(user, monkeypatch)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    env = script_env(DATABASE_URL=database_url(connection.settings_dict), REDIS_URL=private_redis.url,
                     REDIS_PREFIX=prefix)
    admin = redis.Redis(host=HOST, port=private_redis.port)
    admin.ping()  # its own connection is made (and counted) before the first count

    async def scenario():
        receiver = build_layer(private_redis.url, prefix)
        channel = await receiver.new_channel()
        for group in groups:  # the receiver's connection too
            await receiver.group_add(group, channel)
        before = admin.info("stats")["total_connections_received"]
        await asyncio.to_thread(run_script, SEND_SCRIPT, env, user.username, str(SENDS))
        after = admin.info("stats")["total_connections_received"]
        messages = await receive_all(receiver, channel, SENDS)
        await receiver.close_pools()
        return after - before, messages

    opened, messages = asyncio.run(scenario())
    admin.close()
    stored = list(Notification.objects.filter(recipient=user, title__startswith="from a script")
                  .order_by("id").values_list("id", flat=True))
    assert len(stored) == SENDS
    assert [m["id"] for m in messages] == stored  # every push arrived, in order
    assert opened <= 1, f"{SENDS} sends opened {opened} Redis connections"


@pytest.mark.parametrize("redis_state", ["nothing listening", "accepts, never answers"])
@pytest.mark.django_db(transaction=True)
def test_send_with_redis_unreachable_stores_and_returns_within_push_timeout(
        redis_state, request, settings, short_push_timeout, alice, caplog):
    if redis_state == "nothing listening":
        url = f"redis://{HOST}:{free_port()}/0"
    else:
        url = request.getfixturevalue("silent_redis")
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(url, f"test-{uuid.uuid4().hex[:8]}")}
    failed_before = push_failures()
    caplog.set_level(logging.ERROR, logger="notifications.transport")
    took = []
    for i in range(3):
        started = time.monotonic()
        notification_send(title=f"while Redis is away {i}", users=[alice])
        took.append(time.monotonic() - started)

    assert Notification.objects.filter(recipient=alice).count() == 3
    assert max(took) < PUSH_TIMEOUT + SLACK, took
    assert wait_for(lambda: push_failures() == failed_before + 3), push_failures() - failed_before
    lines = [r.getMessage() for r in caplog.records if "push failed" in r.getMessage()]
    assert len(lines) == 1, lines  # one line per outage, not one per send


async def test_publish_from_async_code_schedules_and_returns(settings, short_push_timeout, silent_redis):
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(silent_redis, f"test-{uuid.uuid4().hex[:8]}")}
    failed_before = push_failures()
    started = time.monotonic()
    transport.publish([("stream", {"type": "t"})])
    assert time.monotonic() - started < 0.1  # this loop was not blocked waiting for Redis
    await asyncio.sleep(PUSH_TIMEOUT + SLACK)  # the batch gives up by itself, and is counted
    assert push_failures() == failed_before + 1


@pytest.mark.redis
async def test_pushes_from_several_threads_at_once_all_arrive(redis_url, settings):
    settings.CHANNEL_LAYERS = redis_layer_settings()
    layer = get_channel_layer()  # the receiver shares the layer with the publishers, as a hub does
    channel = await layer.new_channel()
    await layer.group_add("stream", channel)
    threads, each = 8, 25
    barrier = threading.Barrier(threads)

    def send(t: int) -> None:
        barrier.wait(timeout=10)
        for k in range(each):
            transport.publish([("stream", {"type": "t", "n": f"{t}.{k}"})])

    def send_from_threads() -> None:
        started = [threading.Thread(target=send, args=(t,), daemon=True) for t in range(threads)]
        for thread in started:
            thread.start()
        for thread in started:
            thread.join(30)

    await asyncio.to_thread(send_from_threads)
    received = await receive_all(layer, channel, threads * each)
    assert sorted(m["n"] for m in received) == sorted(f"{t}.{k}" for t in range(threads) for k in range(each))
    for t in range(threads):  # each thread's pushes in the order it made them
        assert [m["n"] for m in received if m["n"].startswith(f"{t}.")] == [f"{t}.{k}" for k in range(each)]
    await layer.group_discard("stream", channel)


def messages_of_script(redis_url: str, script: str, count: int) -> list[dict]:
    """Run ``script`` in a new process that publishes to the group "stream"; what a receiver got."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    async def scenario():
        receiver = build_layer(redis_url, prefix)
        channel = await receiver.new_channel()
        await receiver.group_add("stream", channel)
        await asyncio.to_thread(run_script, script, script_env(REDIS_URL=redis_url, REDIS_PREFIX=prefix))
        received = await receive_all(receiver, channel, count)
        await receiver.flush()
        return received

    return asyncio.run(scenario())


@pytest.mark.redis
def test_a_forked_child_publishes_on_a_loop_of_its_own(redis_url):
    assert [m["who"] for m in messages_of_script(redis_url, FORK_SCRIPT, 3)] == [
        "parent, before the fork", "child", "parent, after the fork"]


@pytest.mark.redis
def test_a_push_scheduled_just_before_exit_is_delivered(redis_url):
    received = messages_of_script(redis_url, EXIT_SCRIPT, 1)
    assert received == [{"type": "t", "who": "scheduled just before exit"}]


async def test_publish_from_async_code_reaches_the_in_memory_layer_of_its_loop(settings):
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("stream", channel)
    transport.publish([("stream", {"type": "t", "n": 1}), ("stream", {"type": "t", "n": 2})])
    assert await receive_all(layer, channel, 2, timeout=2) == [{"type": "t", "n": 1}, {"type": "t", "n": 2}]


@pytest.mark.redis
@pytest.mark.parametrize("hosts", [1, 2])
async def test_a_batch_reaches_each_member_as_group_send_would_in_order(redis_url, second_redis, hosts):
    """``group_send_many`` (two pipelined round trips per host for a whole batch) delivers what
    channels-redis' ``group_send`` delivers message by message: each member gets its groups'
    messages once, in order, through msgpack on real Redis, over one or two shards; a channel at
    capacity drops the copies past it, as ``group_send`` does."""
    urls = [redis_url, second_redis.url][:hosts]
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    sender, receiver = build_layer(",".join(urls), prefix), build_layer(",".join(urls), prefix)
    channels = [await receiver.new_channel() for _ in range(4)]
    groups = {"u.1": channels[:2], "u.2": channels[1:3], "b": channels}
    for group, members in groups.items():
        for channel in members:
            await sender.group_add(group, channel)
    batch = [(group, {"type": "stream.notification", "stream": group, "offset": k, "frame": "é" * 10})
             for k in range(1, 6) for group in groups]
    await transport.group_send_many(sender, batch)
    for channel in channels:
        expected = [(g, m["offset"]) for g, m in batch if channel in groups[g]]
        got = await receive_all(receiver, channel, len(expected))
        assert [(m["stream"], m["offset"]) for m in got] == expected
        assert all(m["frame"] == "é" * 10 for m in got)
    # Capacity: as group_send, copies past a channel's capacity are dropped, not queued.
    small = build_layer(",".join(urls), prefix)
    small.capacity = 3
    await transport.group_send_many(small, [("u.1", {"type": "t", "n": n}) for n in range(5)])
    assert [m["n"] for m in await receive_all(receiver, channels[0], 3)] == [0, 1, 2]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(receiver.receive(channels[0]), 0.3)
    for layer in (sender, receiver, small):
        await layer.flush()
        await layer.close_pools()


@pytest.mark.redis
@pytest.mark.parametrize("hosts", [1, 2])
async def test_joining_and_leaving_many_groups_at_once(redis_url, second_redis, hosts):
    """``group_add_many``/``group_discard_many``: channels-redis' own ZADD+EXPIRE and ZREM for each
    group, one pipeline per host: a message to any of them arrives after the join, none after the
    leave; the membership expires as ``group_add``'s does."""
    urls = ",".join([redis_url, second_redis.url][:hosts])
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    layer = build_layer(urls, prefix)
    channel = await layer.new_channel()
    groups = [f"u.{i}" for i in range(300)]
    await transport.group_add_many(layer, groups, channel)
    for index in range(hosts):
        client = layer.connection(index)
        mine = [g for g in groups if layer.consistent_hash(g) == index]
        assert mine
        assert all([await client.zscore(layer._group_key(g), channel) is not None for g in mine])
        assert 0 < await client.ttl(layer._group_key(mine[0])) <= layer.group_expiry
    await transport.group_send_many(layer, [("u.7", {"type": "t", "n": 1}), ("u.250", {"type": "t", "n": 2})])
    assert [m["n"] for m in await receive_all(layer, channel, 2)] == [1, 2]
    await transport.group_discard_many(layer, groups, channel)
    await transport.group_send_many(layer, [("u.7", {"type": "t", "n": 3})])
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 0.3)
    await layer.flush()
    await layer.close_pools()


async def test_joining_and_leaving_many_groups_on_the_in_memory_layer(settings):
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await transport.group_add_many(layer, ["a", "b"], channel)
    await layer.group_send("b", {"type": "t"})
    assert await asyncio.wait_for(layer.receive(channel), 1) == {"type": "t"}
    await transport.group_discard_many(layer, ["a", "b"], channel)
    assert layer.groups == {} or all(channel not in members for members in layer.groups.values())
