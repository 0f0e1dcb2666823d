"""The hub's group memberships on the real Redis layer: joined for local sockets, renewed before
channels-redis forgets them, left when the last local socket of a stream is gone."""

import asyncio

import pytest
import redis
from asgiref.sync import sync_to_async
from prometheus_client import REGISTRY

from notifications import hub as hub_module
from notifications import services
from notifications.hub import get_hub

from .conftest import redis_layer_settings

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

send = sync_to_async(services.notification_send)


def members(redis_url: str, layer_config: dict, group: str) -> int:
    """How many channels the group has in Redis (channels-redis keeps a sorted set per group)."""
    prefix = layer_config["default"]["CONFIG"]["prefix"]
    client = redis.Redis.from_url(redis_url)
    try:
        return client.zcard(f"{prefix}:group:{group}")
    finally:
        client.close()


@pytest.fixture
def redis_layer(redis_url, settings):
    settings.CHANNEL_LAYERS = redis_layer_settings()
    return settings.CHANNEL_LAYERS


async def test_a_socket_keeps_receiving_past_group_expiry_because_the_hub_renews(
    redis_layer, settings, ws, alice, alice_token
):
    redis_layer["default"]["CONFIG"]["group_expiry"] = 2
    settings.CHANNEL_LAYERS = redis_layer
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "HUB_SYNC_INTERVAL": 0.2}
    comm, _ = await ws(alice_token)
    await asyncio.sleep(3)  # longer than group_expiry: without renewal the membership is gone
    received = REGISTRY.get_sample_value("notifications_hub_messages_received_total", {"kind": "user"}) or 0
    (sent,) = await send(users=[alice], title="after expiry")
    frame = await comm.receive_json_from(timeout=5)
    assert frame["id"] == sent.pk
    # It came through the channel layer (the group still has this process), not from the store check.
    assert REGISTRY.get_sample_value("notifications_hub_messages_received_total", {"kind": "user"}) == received + 1


async def test_the_hub_leaves_a_stream_after_its_last_local_socket_is_gone(
    redis_url, redis_layer, settings, ws, alice, alice_token, monkeypatch
):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "HUB_SYNC_INTERVAL": 0.1}
    monkeypatch.setattr(hub_module, "LEAVE_AFTER", 0.3)
    comm, _ = await ws(alice_token)
    group = f"u.{alice.pk}"
    assert await asyncio.to_thread(members, redis_url, redis_layer, group) == 1
    await comm.disconnect()
    for _ in range(50):
        if await asyncio.to_thread(members, redis_url, redis_layer, group) == 0:
            break
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(members, redis_url, redis_layer, group) == 0
    hub = await get_hub()
    assert group not in hub.sequencer.streams
    # A send to the user now reaches no process; when they come back, the hub joins again.
    await send(users=[alice], title="while away")
    comm, hello = await ws(alice_token)
    assert hello["cursor"][group] == 1
    (sent,) = await send(users=[alice], title="back")
    assert (await comm.receive_json_from(timeout=5))["id"] == sent.pk
