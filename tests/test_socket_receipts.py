"""The socket channel's delivery records: the hub notes what it hands to each user's sockets
(live or replayed) and writes one row per user and stream (notifications.socket_receipts)."""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from notifications import services, socket_receipts
from notifications.hub import get_hub
from notifications.models import SocketReceipt

from .conftest import WS_PATH, since

pytestmark = [pytest.mark.django_db(transaction=True)]

send = sync_to_async(services.notification_send)


@sync_to_async
def receipts() -> dict[tuple[str, str], int]:
    return {(r.user.username, r.stream): r.offset for r in SocketReceipt.objects.select_related("user")}


async def flush() -> None:
    await (await get_hub()).flush_receipts()


async def test_a_live_frame_is_recorded_for_the_user_and_its_stream(layer, ws, alice, bob, alice_token):
    comm, _ = await ws(alice_token)
    (mine,) = await send(users=[alice], title="to alice")
    everyone = (await send(broadcast=True, title="to all"))[0]
    assert {(await comm.receive_json_from(timeout=5))["id"] for _ in range(2)} == {mine.pk, everyone.pk}
    await flush()
    assert await receipts() == {("alice", f"u.{alice.pk}"): mine.offset, ("alice", "b"): everyone.offset}
    assert await sync_to_async(socket_receipts.frame_sent)(mine, alice.pk)
    assert await sync_to_async(socket_receipts.frame_sent)(everyone, alice.pk)
    assert not await sync_to_async(socket_receipts.frame_sent)(everyone, bob.pk)  # no socket of bob's


async def test_a_replay_is_recorded_too(layer, ws, alice, alice_token):
    comm, hello = await ws(alice_token)
    await comm.disconnect()
    await flush()
    missed = [(await send(users=[alice], title=f"missed {i}"))[0] for i in range(3)]
    comm, _ = await ws(alice_token, path=f"{WS_PATH}?since={since(hello['cursor'])}&epoch={hello['epoch']}")
    for _ in missed:
        assert (await comm.receive_json_from(timeout=5))["type"] == "notification"
    await flush()
    assert (await receipts())[("alice", f"u.{alice.pk}")] == missed[-1].offset


def test_flush_keeps_the_greater_offset_and_leaves_out_deleted_users(alice, bob):
    now = timezone.now()
    socket_receipts.flush({(alice.pk, "b"): 7, (bob.pk, "b"): 3}, now)
    socket_receipts.flush({(alice.pk, "b"): 5}, now + timedelta(seconds=1))  # another process, behind
    bob_id = bob.pk
    bob.delete()
    socket_receipts.flush({(bob_id, "b"): 9, (alice.pk, "b"): 8}, now + timedelta(seconds=2))
    rows = {(r.user_id, r.stream): (r.offset, r.at) for r in SocketReceipt.objects.all()}
    assert rows == {(alice.pk, "b"): (8, now + timedelta(seconds=2))}


def test_flush_writes_many_pairs_in_chunks(make_user):
    users = [make_user(f"reader-{i}") for i in range(socket_receipts.CHUNK + 5)]
    assert socket_receipts.flush({(user.pk, "b"): 1 for user in users}) == len(users)
    assert SocketReceipt.objects.count() == len(users)


async def test_the_hub_writes_its_receipts_every_interval_by_itself(layer, settings, ws, alice, alice_token):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "HUB_SYNC_INTERVAL": 0.1, "SOCKET_RECEIPTS_INTERVAL": 0.3}
    comm, _ = await ws(alice_token)
    (mine,) = await send(users=[alice], title="to alice")
    assert (await comm.receive_json_from(timeout=5))["id"] == mine.pk
    for _ in range(100):
        if await receipts():
            break
        await asyncio.sleep(0.05)
    assert await receipts() == {("alice", f"u.{alice.pk}"): mine.offset}


async def test_with_an_interval_of_zero_nothing_is_noted(layer, settings, ws, alice, alice_token):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "SOCKET_RECEIPTS_INTERVAL": 0}
    comm, _ = await ws(alice_token)
    (mine,) = await send(users=[alice], title="to alice")
    assert (await comm.receive_json_from(timeout=5))["id"] == mine.pk
    assert (await get_hub()).socket_marks == {}
    await flush()
    assert await receipts() == {}
