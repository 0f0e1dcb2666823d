"""Delivery guarantees: cursors, resume after reconnect, no duplicates or gaps at the seam,
lost pushes recovered from the store, slow consumers closed with 4008."""

import asyncio
import random
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from notifications import push, selectors, services
from notifications.auth import WebSocketAuthMiddlewareStack
from notifications.consumers import NotificationConsumer
from notifications.models import Notification, Topic

from .conftest import WS_PATH, bearer, since

pytestmark = [pytest.mark.django_db(transaction=True)]

send = sync_to_async(services.notification_send)


async def receive_notifications(comm, count: int) -> list[dict]:
    frames = [await comm.receive_json_from(timeout=5) for _ in range(count)]
    assert all(f["type"] == "notification" for f in frames), frames
    return frames


async def test_each_stream_numbers_its_notifications_one_by_one(layer, ws, alice, bob, alice_token):
    comm, hello = await ws(alice_token)
    mine = f"u.{alice.pk}"
    for i in range(3):
        await send(users=[alice], title=f"n{i}")
        await send(users=[bob], title=f"other {i}")  # another stream: no effect on alice's
    frames = await receive_notifications(comm, 3)
    start = hello["cursor"][mine]
    assert [(f["stream"], f["offset"]) for f in frames] == [(mine, start + 1), (mine, start + 2), (mine, start + 3)]
    await send(broadcast=True, title="all")
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["stream"], frame["offset"]) == ("b", hello["cursor"]["b"] + 1)


async def test_resume_in_the_url_replays_what_was_missed_in_order_then_resumed(layer, ws, alice, alice_token, bob):
    topic = await sync_to_async(Topic.objects.create)(slug="deploys", title="Deploys")
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    comm, hello = await ws(alice_token)
    await comm.disconnect()
    missed = [
        (await send(users=[alice], title="personal"))[0],
        (await send(users=[bob], title="not alice's"))[0],
        (await send(topic="deploys", title="topic"))[0],
        (await send(broadcast=True, title="everyone"))[0],
    ]
    await sync_to_async(services.notification_mark_read)(user=alice, ids=[missed[0].pk])
    comm, hello2 = await ws(alice_token, path=f"{WS_PATH}?since={since(hello['cursor'])}&epoch={hello['epoch']}")
    frames = await receive_notifications(comm, 3)
    assert [(f["id"], f["title"], f["read"]) for f in frames] == [
        (missed[0].pk, "personal", True), (missed[2].pk, "topic", False), (missed[3].pk, "everyone", False),
    ]
    assert [(f["stream"], f["offset"]) for f in frames] == [
        (f"u.{alice.pk}", missed[0].offset), (f"t.{topic.pk}", missed[2].offset), ("b", missed[3].offset),
    ]
    assert hello2["cursor"] == {f"u.{alice.pk}": missed[0].offset, "b": missed[3].offset,
                                f"t.{topic.pk}": missed[2].offset}
    assert await comm.receive_json_from(timeout=5) == {
        "type": "resumed", "recovered": True, "count": 3, "cursor": hello2["cursor"],
    }
    assert await comm.receive_json_from(timeout=5) == {"type": "unread_count", "count": 2}
    # Live frames continue after the replay. (The mark_read's own event may come first: with the
    # Redis layer under load its push can reach this process after the socket registered.)
    (live,) = await send(users=[alice], title="live")
    frame = await comm.receive_json_from(timeout=5)
    while frame["type"] != "notification":
        assert frame["type"] in ("read", "unread_count"), frame
        frame = await comm.receive_json_from(timeout=5)
    assert frame["id"] == live.pk


async def test_resume_frame_replays_only_what_this_connection_has_not_seen(layer, ws, alice, alice_token):
    first = (await send(users=[alice], title="before"))[0]
    comm, hello = await ws(alice_token)
    (live,) = await send(users=[alice], title="live")
    assert (await comm.receive_json_from(timeout=5))["id"] == live.pk
    mine = f"u.{alice.pk}"
    cursor = {**hello["cursor"], mine: first.offset - 1}
    await comm.send_json_to({"type": "resume", "since": cursor, "epoch": hello["epoch"], "id": "r"})
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["type"], frame["id"]) == ("notification", first.pk)
    assert await comm.receive_json_from(timeout=5) == {
        "type": "resumed", "recovered": True, "count": 1, "cursor": {**hello["cursor"], mine: live.offset}, "id": "r",
    }


async def test_resume_twice_on_one_connection_is_an_error(layer, ws, alice_token):
    comm, hello = await ws(alice_token)
    await comm.send_json_to({"type": "resume", "since": hello["cursor"]})
    assert (await comm.receive_json_from(timeout=5))["type"] == "resumed"
    assert (await comm.receive_json_from(timeout=5))["type"] == "unread_count"
    await comm.send_json_to({"type": "resume", "since": hello["cursor"], "id": 2})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "invalid", "message": "This connection has already resumed.", "id": 2,
    }


async def test_resume_from_another_epoch_is_not_recovered(layer, ws, alice, alice_token):
    await send(users=[alice], title="x")
    comm, hello = await ws(alice_token, path=f"{WS_PATH}?since=&epoch=someotherepoch")
    assert await comm.receive_json_from(timeout=5) == {
        "type": "resumed", "recovered": False, "reason": "epoch_changed", "count": 0, "cursor": hello["cursor"],
    }


async def test_resume_from_a_cursor_ahead_of_the_store_is_not_recovered(layer, ws, alice_token):
    comm, hello = await ws(alice_token, path=f"{WS_PATH}?since=b:999999")
    assert (await comm.receive_json_from(timeout=5))["reason"] == "cursor_ahead"


async def test_resume_of_too_many_is_not_recovered(layer, ws, alice, alice_token, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "REPLAY_MAX_COUNT": 2}
    for i in range(3):
        await send(users=[alice], title=f"n{i}")
    comm, hello = await ws(alice_token, path=f"{WS_PATH}?since=")
    assert await comm.receive_json_from(timeout=5) == {
        "type": "resumed", "recovered": False, "reason": "too_many", "count": 0, "cursor": hello["cursor"],
    }


async def test_resume_older_than_the_retention_window_is_not_recovered(layer, ws, alice, alice_token, settings):
    await send(users=[alice], title="old")
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "REPLAY_MAX_AGE": -1}
    comm, _ = await ws(alice_token, path=f"{WS_PATH}?since=")
    assert (await comm.receive_json_from(timeout=5))["reason"] == "too_old"


async def test_resume_age_is_judged_by_the_users_own_notifications_only(layer, ws, alice, bob, alice_token,
                                                                        settings):
    """Another user's old notification after the cursor must not tell this user how old it is."""
    (old,) = await send(users=[bob], title="bob's, old")
    await sync_to_async(Notification.objects.filter(pk=old.pk).update)(created_at=timezone.now() - timedelta(days=30))
    await send(users=[alice], title="alice's, new")
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "REPLAY_MAX_AGE": 7 * 24 * 3600}
    comm, _ = await ws(alice_token, path=f"{WS_PATH}?since=")
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["type"], frame["title"]) == ("notification", "alice's, new")
    resumed = await comm.receive_json_from(timeout=5)
    assert (resumed["type"], resumed["recovered"], resumed["count"]) == ("resumed", True, 1)


@pytest.mark.parametrize("query", ["since=abc", "since=-1", "since=99999999999999999999999"])
async def test_bad_since_in_the_url_is_an_error_and_close_4400(layer, ws, alice_token, query):
    comm = await ws(alice_token, path=f"{WS_PATH}?{query}", hello=False)
    assert (await comm.receive_json_from(timeout=5))["code"] == "invalid"
    assert (await comm.receive_output(timeout=5))["code"] == 4400


async def test_replay_never_shows_another_users_notifications(layer, ws, alice, bob, alice_token):
    private = await sync_to_async(Topic.objects.create)(slug="secret", title="Secret", private=True)
    await sync_to_async(private.members.add)(bob)
    await sync_to_async(services.topic_follow)(user=bob, topic=private)
    await send(users=[bob], title="bob only")
    await send(topic="secret", title="members only")
    comm, hello = await ws(alice_token, path=f"{WS_PATH}?since=")
    assert await comm.receive_json_from(timeout=5) == {
        "type": "resumed", "recovered": True, "count": 0, "cursor": hello["cursor"],
    }


async def test_reconnecting_many_times_while_sending_loses_and_duplicates_nothing(layer, alice, bob, alice_token):
    """The seam: notifications committed while a client reconnects and replays arrive exactly once, in order."""
    from project.asgi import application

    total = 120
    sent: list[int] = []

    async def sender():
        for i in range(total):
            kwargs = random.choice([{"users": [alice]}, {"broadcast": True}, {"users": [bob]}])
            (row,) = await send(title=f"n{i}", **kwargs)
            if "broadcast" in kwargs or kwargs["users"] == [alice]:
                sent.append(row.pk)
            await asyncio.sleep(random.random() / 200)

    received: list[int] = []
    first = WebsocketCommunicator(application, WS_PATH, headers=bearer(alice_token))
    await first.connect()
    cursor = (await first.receive_json_from(timeout=5))["cursor"]
    await first.disconnect()
    task = asyncio.create_task(sender())
    reconnects = 0
    while not task.done() or len(received) < len(sent):
        comm = WebsocketCommunicator(application, f"{WS_PATH}?since={since(cursor)}", headers=bearer(alice_token))
        await comm.connect()
        assert (await comm.receive_json_from(timeout=5))["type"] == "hello"
        for _ in range(random.randint(1, 8)):
            if await comm.receive_nothing(timeout=0.3):
                break
            frame = await comm.receive_json_from(timeout=5)
            if frame["type"] == "notification":
                assert frame["offset"] == cursor[frame["stream"]] + 1, (frame, cursor)  # in order, no gap
                received.append(frame["id"])
                cursor[frame["stream"]] = frame["offset"]
            elif frame["type"] == "resumed":
                assert frame["recovered"], frame
                cursor = frame["cursor"]
        await comm.disconnect()
        reconnects += 1
        assert reconnects < 500
    await task
    assert sorted(received) == sorted(sent) and len(set(received)) == len(received), (len(received), len(sent))
    assert reconnects > 10


async def test_a_lost_push_is_recovered_from_the_store_in_order(layer, ws, alice, alice_token, monkeypatch):
    comm, _ = await ws(alice_token)
    real = push.notifications_created
    monkeypatch.setattr(push, "notifications_created", lambda rows: None)
    (lost,) = await send(users=[alice], title="lost on the way")
    monkeypatch.setattr(push, "notifications_created", real)
    (later,) = await send(users=[alice], title="later")
    frames = await receive_notifications(comm, 2)
    assert [f["id"] for f in frames] == [lost.pk, later.pk]


async def test_a_lost_last_push_is_found_by_the_stream_head_check(layer, ws, alice, alice_token, monkeypatch,
                                                                  settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "HUB_SYNC_INTERVAL": 0.2}
    comm, _ = await ws(alice_token)
    monkeypatch.setattr(push, "notifications_created", lambda rows: None)
    (lost,) = await send(users=[alice], title="lost, and nothing after it")
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["id"], frame["title"]) == (lost.pk, "lost, and nothing after it")


class BlockedConsumer(NotificationConsumer):
    """A client that stops reading: after hello, nothing it is sent is ever written."""

    async def send(self, text_data=None, bytes_data=None, close=False):
        if text_data and '"type":"hello"' not in text_data:
            await asyncio.Event().wait()
        await super().send(text_data=text_data, bytes_data=bytes_data, close=close)


async def test_slow_consumer_is_closed_with_4008_and_others_keep_receiving(layer, ws, alice, alice_token,
                                                                           bob_token):
    app = WebSocketAuthMiddlewareStack(BlockedConsumer.as_asgi(max_queued_frames=5))
    slow = WebsocketCommunicator(app, WS_PATH, headers=bearer(alice_token))
    await slow.connect()
    assert (await slow.receive_json_from(timeout=5))["type"] == "hello"
    fast, _ = await ws(bob_token)
    sent = [(await send(broadcast=True, title=f"b{i}"))[0].pk for i in range(12)]
    assert [f["id"] for f in await receive_notifications(fast, 12)] == sent
    assert await slow.receive_output(timeout=5) == {"type": "websocket.close", "code": 4008, "reason": "slow consumer"}
    await slow.disconnect()


async def test_hello_cursor_is_the_head_of_each_stream_the_user_reads(layer, ws, alice, bob):
    topic = await sync_to_async(Topic.objects.create)(slug="deploys", title="Deploys")
    await sync_to_async(services.topic_follow)(user=alice, topic=topic)
    await send(broadcast=True, title="x")
    await send(users=[alice, bob], title="y")
    await send(topic=topic, title="z")
    await send(topic=topic, title="z2")
    from .conftest import token_for

    streams = [f"u.{alice.pk}", "b", f"t.{topic.pk}"]
    heads = await sync_to_async(selectors.store_heads)(streams)
    _, hello = await ws(await sync_to_async(token_for)(alice))
    assert hello["cursor"] == heads[1] == {f"u.{alice.pk}": 1, "b": heads[1]["b"], f"t.{topic.pk}": 2}


async def test_too_many_frames_get_rate_limited_then_closed_with_4029(layer, ws, alice_token, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_RATE": 0.001, "WS_BURST": 3}
    comm, _ = await ws(alice_token)
    for i in range(3):
        await comm.send_json_to({"type": "ping", "id": i})
        assert await comm.receive_json_from(timeout=5) == {"type": "pong", "id": i}
    await comm.send_json_to({"type": "ping", "id": "over"})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "rate_limited", "message": "Slow down: at most 0.001 frames per second.",
    }
    for _ in range(19):  # 20 violations are tolerated, the 21st closes
        await comm.send_json_to({"type": "ping"})
        assert (await comm.receive_json_from(timeout=5))["code"] == "rate_limited"
    await comm.send_json_to({"type": "ping"})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "rate_limited", "message": "Too many limit violations; closing.",
    }
    assert (await comm.receive_output(timeout=5))["code"] == 4029


async def test_topics_per_user_are_limited_over_the_socket(layer, ws, alice_token, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_MAX_TOPICS": 2}
    for slug in ("a", "b", "c"):
        await sync_to_async(Topic.objects.create)(slug=slug, title=slug)
    comm, _ = await ws(alice_token)
    for slug in ("a", "b"):
        await comm.send_json_to({"type": "subscribe", "topic": slug})
        assert (await comm.receive_json_from(timeout=5))["type"] == "subscribed"
    await comm.send_json_to({"type": "subscribe", "topic": "c", "id": 3})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "too_many_topics", "id": 3,
        "message": "At most 2 followed topics per user; unfollow one first.",
    }


async def test_a_replaced_store_closes_connections_with_4012_so_clients_resume(layer, ws, alice, alice_token,
                                                                               settings):
    from notifications.models import Store

    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "HUB_SYNC_INTERVAL": 0.2}
    await send(users=[alice], title="before")
    comm, hello = await ws(alice_token)
    await sync_to_async(Store.objects.filter(pk=1).update)(epoch="restored-from-backup")
    assert (await comm.receive_output(timeout=5))["code"] == 4012
    comm2, _ = await ws(alice_token, path=f"{WS_PATH}?since={since(hello['cursor'])}&epoch={hello['epoch']}")
    assert (await comm2.receive_json_from(timeout=5))["reason"] == "epoch_changed"


async def test_unread_count_after_a_resume_plus_the_live_frames_after_it_is_the_true_count(
    layer, ws, alice, alice_token, monkeypatch
):
    """A notification committed while the replay is read arrives live after `resumed`: the
    `unread_count` before it must not have counted it already."""
    from notifications import resume

    comm, hello = await ws(alice_token)
    await comm.disconnect()
    await send(users=[alice], title="missed")
    real = resume.outcome

    def outcome_with_a_send_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        services.notification_send(users=[alice], title="live during the replay")
        return result

    monkeypatch.setattr(resume, "outcome", outcome_with_a_send_meanwhile)
    comm, _ = await ws(alice_token, path=f"{WS_PATH}?since={since(hello['cursor'])}&epoch={hello['epoch']}")
    frames = [await comm.receive_json_from(timeout=5) for _ in range(4)]
    kinds = [f["type"] for f in frames]
    # "missed" is replayed before `resumed`, or, when its push reached this process only after the
    # socket registered (the Redis layer under load), it arrives live after `unread_count`.
    assert kinds in (["notification", "resumed", "unread_count", "notification"],
                     ["resumed", "unread_count", "notification", "notification"]), kinds
    assert sorted(f["title"] for f in frames if f["type"] == "notification") == ["live during the replay", "missed"]
    count_at = kinds.index("unread_count")
    shown = frames[count_at]["count"] + kinds[count_at:].count("notification")  # the client adds one per live one
    assert shown == await sync_to_async(selectors.unread_count_for)(alice) == 2
