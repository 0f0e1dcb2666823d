"""``GET /metrics``: who may scrape it, what moves, and the sum over several server processes."""

import asyncio
import logging
import re

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from notifications import services
from notifications.auth import WebSocketAuthMiddlewareStack
from notifications.consumers import NotificationConsumer
from tests.conftest import WS_PATH, bearer, token_for
from tests.faults.client import format_cursor
from tests.server import recv_json, send_json

FORBIDDEN = {"error": {"code": "forbidden", "message": (
    "Metrics are served to METRICS_ALLOWED_IPS or with 'Authorization: Bearer <METRICS_TOKEN>'.")}}


def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# Who may scrape


def test_loopback_client_gets_the_text_format(client):
    response = client.get("/metrics")  # the test client's REMOTE_ADDR is 127.0.0.1
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    names = {name for name, _ in scrape(response.content.decode())}
    assert names >= {
        "notifications_ws_connections", "notifications_push_latency_seconds_bucket",
        "notifications_ws_slow_consumer_closes_total", "notifications_channel_layer_over_capacity_total",
        "notifications_push_failures_total", "notifications_hub_store_reads_total",
    }
    assert not any(name.endswith("_created") for name in names)


def test_other_clients_get_403_json(client):
    response = client.get("/metrics", REMOTE_ADDR="203.0.113.9")
    assert (response.status_code, response.json()) == (403, FORBIDDEN)
    assert client.post("/metrics").status_code == 405


def test_allowed_networks_and_the_token(client, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "METRICS_ALLOWED_IPS": ["10.0.0.0/8"],
                              "METRICS_TOKEN": "s3cret-metrics-token"}
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert client.get("/metrics").status_code == 403  # loopback is no longer listed
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics-token").status_code == 200
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "METRICS_TOKEN": ""}
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 403  # no token configured


def test_behind_a_trusted_proxy_the_forwarded_client_counts(client, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "TRUSTED_PROXIES": ["127.0.0.1"]}
    # The proxy is on loopback; the client it forwards is not: refused.
    assert client.get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 403
    assert client.get("/metrics", HTTP_X_FORWARDED_FOR="::1").status_code == 200


# What moves (this process, in-memory channel layer)


@pytest.mark.django_db(transaction=True)
async def test_counters_move_on_connect_send_frames_resume_and_close(ws, alice, alice_token):
    before = {
        "open": value("notifications_ws_connections"),
        "accepted": value("notifications_ws_connects_total", result="accepted"),
        "refused": value("notifications_ws_connects_total", result="refused"),
        "closed_1000": value("notifications_ws_disconnects_total", code="1000"),
        "closed_4001": value("notifications_ws_disconnects_total", code="4001"),
        "sent_user": value("notifications_sent_total", audience="user"),
        "sent_broadcast": value("notifications_sent_total", audience="broadcast"),
        "out_notification": value("notifications_ws_frames_out_total", type="notification"),
        "out_hello": value("notifications_ws_frames_out_total", type="hello"),
        "in_ping": value("notifications_ws_frames_in_total", type="ping"),
        "errors_bad_json": value("notifications_ws_errors_total", code="bad_json"),
        "latency_count": value("notifications_push_latency_seconds_count"),
        "recovered": value("notifications_resumes_total", outcome="recovered"),
        "epoch_changed": value("notifications_resumes_total", outcome="epoch_changed"),
    }
    comm, hello = await ws(alice_token)
    other, _ = await ws(alice_token)
    assert value("notifications_ws_connections") == before["open"] + 2
    await sync_to_async(services.notification_send)(users=[alice], title="one")
    await sync_to_async(services.notification_send)(broadcast=True, title="two")
    for c in (comm, other):
        assert [(await c.receive_json_from(timeout=5))["title"] for _ in range(2)] == ["one", "two"]
    await comm.send_json_to({"type": "ping", "id": 1})
    assert (await comm.receive_json_from(timeout=5))["type"] == "pong"
    await comm.send_to(text_data="{nope")
    assert (await comm.receive_json_from(timeout=5))["code"] == "bad_json"
    await other.disconnect(code=1000)

    since = format_cursor(hello["cursor"])  # before the two sends: both are replayed
    resumed, _ = await ws(alice_token, path=f"{WS_PATH}?since={since}&epoch={hello['epoch']}")
    frames = [await resumed.receive_json_from(timeout=5) for _ in range(4)]
    assert [f["type"] for f in frames] == ["notification", "notification", "resumed", "unread_count"]
    stale, _ = await ws(alice_token, path=f"{WS_PATH}?since={since}&epoch=another")
    assert (await stale.receive_json_from(timeout=5))["reason"] == "epoch_changed"

    refused = WebsocketCommunicator(WebSocketAuthMiddlewareStack(NotificationConsumer.as_asgi()), WS_PATH)
    await refused.connect()
    assert (await refused.receive_json_from(timeout=5))["code"] == "unauthenticated"
    assert (await refused.receive_output(timeout=5))["code"] == 4001
    await refused.disconnect(code=4001)  # a real client echoes the server's close code

    assert value("notifications_ws_connections") == before["open"] + 3  # comm, resumed, stale
    moved = {
        "accepted": 4, "refused": 1, "closed_1000": 1, "closed_4001": 1, "sent_user": 1, "sent_broadcast": 1,
        "out_notification": 2 + 2 + 2,  # two live sends to two sockets, then two replayed
        "out_hello": 4, "in_ping": 1, "errors_bad_json": 1, "latency_count": 2, "recovered": 1,
        "epoch_changed": 1,
    }
    after = {
        "accepted": value("notifications_ws_connects_total", result="accepted"),
        "refused": value("notifications_ws_connects_total", result="refused"),
        "closed_1000": value("notifications_ws_disconnects_total", code="1000"),
        "closed_4001": value("notifications_ws_disconnects_total", code="4001"),
        "sent_user": value("notifications_sent_total", audience="user"),
        "sent_broadcast": value("notifications_sent_total", audience="broadcast"),
        "out_notification": value("notifications_ws_frames_out_total", type="notification"),
        "out_hello": value("notifications_ws_frames_out_total", type="hello"),
        "in_ping": value("notifications_ws_frames_in_total", type="ping"),
        "errors_bad_json": value("notifications_ws_errors_total", code="bad_json"),
        "latency_count": value("notifications_push_latency_seconds_count"),
        "recovered": value("notifications_resumes_total", outcome="recovered"),
        "epoch_changed": value("notifications_resumes_total", outcome="epoch_changed"),
    }
    assert {k: after[k] - before[k] for k in moved} == moved


class NeverReads(NotificationConsumer):
    """A client that stops reading after hello."""

    async def send(self, text_data=None, bytes_data=None, close=False):
        if text_data and '"type":"hello"' not in text_data:
            await asyncio.Event().wait()
        await super().send(text_data=text_data, bytes_data=bytes_data, close=close)


@pytest.mark.django_db(transaction=True)
async def test_slow_consumer_close_is_counted(alice, alice_token):
    before = value("notifications_ws_slow_consumer_closes_total")
    comm = WebsocketCommunicator(WebSocketAuthMiddlewareStack(NeverReads.as_asgi(max_queued_frames=2)), WS_PATH,
                                 headers=bearer(alice_token))
    await comm.connect()
    assert (await comm.receive_json_from(timeout=5))["type"] == "hello"
    for i in range(5):
        await sync_to_async(services.notification_send)(users=[alice], title=f"n{i}")
    assert (await comm.receive_output(timeout=5))["code"] == 4008
    await comm.disconnect()
    assert value("notifications_ws_slow_consumer_closes_total") == before + 1


@pytest.mark.redis
async def test_channel_layer_over_capacity_drops_are_counted(redis_url):
    """channels-redis drops a group message for a full channel and logs it; the log handler counts it."""
    from channels_redis.core import RedisChannelLayer

    assert any(type(h).__name__ == "OverCapacityHandler" for h in logging.getLogger("channels_redis.core").handlers)
    layer = RedisChannelLayer(hosts=[redis_url], prefix="test-capacity", capacity=1)
    channel = await layer.new_channel()
    await layer.group_add("g", channel)
    before = value("notifications_channel_layer_over_capacity_total")
    for i in range(3):
        await layer.group_send("g", {"type": "x", "i": i})
    assert value("notifications_channel_layer_over_capacity_total") == before + 2
    await layer.flush()


# Several processes


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_two_worker_processes_report_one_sum(serve, make_user, superuser_session, staff_token):
    tokens = await sync_to_async(lambda: [token_for(make_user(f"u{i}")) for i in range(12)])()
    server = await asyncio.to_thread(serve, "workers", workers=2)

    # Connect until both workers hold some sockets (the kernel decides which worker accepts).
    sockets, servers_seen = [], set()
    while len(servers_seen) < 2 and len(sockets) < 96:
        for token in tokens:
            ws = await server.websocket(token=token)
            assert (await recv_json(ws))["type"] == "hello"
            sockets.append(ws)
        await asyncio.sleep(0.2)  # presence is written just after hello
        page = await server.request_async("GET", "/admin/notifications/notification/online/",
                                          headers={"Cookie": f"sessionid={superuser_session['sessionid']}"})
        servers_seen = set(re.findall(r"<td>([^<]+:\d+)</td>", page.text))  # SERVER_ID: host:pid
    assert len(servers_seen) == 2, f"the connections did not spread over both workers: {servers_seen}"
    n = len(sockets)

    sent = await server.request_async("POST", "/api/notifications/", token=staff_token,
                                      json_body={"title": "to all", "broadcast": True})
    assert sent.status == 201, sent.text
    for ws in sockets:
        assert (await recv_json(ws))["title"] == "to all"
    await send_json(sockets[0], {"type": "ping"})
    assert (await recv_json(sockets[0]))["type"] == "pong"

    # Whichever worker answers, the numbers are the sum over both.
    for _ in range(6):
        response = await server.request_async("GET", "/metrics")
        assert response.status == 200, response.text
        samples = scrape(response.text)
        assert samples[("notifications_ws_connections", ())] == n
        assert samples[("notifications_ws_connects_total", (("result", "accepted"),))] == n
        assert samples[("notifications_ws_frames_out_total", (("type", "notification"),))] == n
        assert samples[("notifications_ws_frames_in_total", (("type", "ping"),))] == 1
        assert samples[("notifications_sent_total", (("audience", "broadcast"),))] == 1
        assert samples[("notifications_push_latency_seconds_count", ())] == 2  # one per process hub
    pids = {name.rsplit("_", 1)[1] for name in (p.stem for p in server.metrics_dir.glob("gauge_livesum_*.db"))}
    assert len(pids) == 2

    for ws in sockets:
        await ws.close()
    for _ in range(50):
        samples = scrape((await server.request_async("GET", "/metrics")).text)
        if samples[("notifications_ws_connections", ())] == 0:
            break
        await asyncio.sleep(0.1)
    assert samples[("notifications_ws_connections", ())] == 0
    assert samples[("notifications_ws_disconnects_total", (("code", "1000"),))] == n
