"""Several server processes sharing Redis: two ``bin/serve`` processes on two ports stand for two
machines (different ``SERVER_ID``s). A user connected to both receives every kind of send made
through either; the admin's disconnect action and "who is online" page span both."""

import asyncio
import re

import pytest
from asgiref.sync import sync_to_async

from tests.server import expect_close, expect_no_frame, recv_json, send_json

pytestmark = [pytest.mark.server, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

ONLINE = "/admin/notifications/notification/online/"


@pytest.fixture
def deploys():
    from notifications.models import Topic

    return Topic.objects.create(slug="deploys", title="Deploys")


async def two_servers(serve):
    """Two single-worker servers started side by side, as two machines: SERVER_ID host-a and host-b."""
    return await asyncio.gather(
        asyncio.to_thread(serve, "host-a", SERVER_ID="host-a"),
        asyncio.to_thread(serve, "host-b", SERVER_ID="host-b"),
    )


async def hello(server, token):
    ws = await server.websocket(token=token)
    frame = await recv_json(ws)
    assert frame["type"] == "hello", frame
    return ws, frame


async def sends_through_either_reach_a_user_on_both(a, b, topic, user, token, staff_token, *, rounds: int = 1):
    """The user, following ``topic``, is connected to both servers; personal, topic and broadcast
    sends through either server reach both sockets, each at the next offset of its stream."""
    followed = await a.request_async("POST", f"/api/topics/{topic.slug}/follow/", token=token)
    assert followed.status == 200, followed.text
    (on_a, hello_a), (on_b, hello_b) = await hello(a, token), await hello(b, token)
    assert hello_a["topics"] == hello_b["topics"] == [topic.slug]
    cursor = hello_a["cursor"]
    assert hello_b["cursor"] == cursor
    streams = [f"u.{user.pk}", f"t.{topic.pk}", "b"]  # their own, the topic's, the broadcasts'
    assert sorted(cursor) == sorted(streams)

    audiences = [{"users": [user.username]}, {"topic": topic.slug}, {"broadcast": True}]
    for i, (audience, stream) in enumerate(zip(audiences * rounds, streams * rounds, strict=True)):
        sender = (a, b)[i % 2]  # sent through either process
        response = await sender.request_async("POST", "/api/notifications/", token=staff_token,
                                              json_body={"title": f"send {i}", **audience})
        assert response.status == 201, response.text
        [sent] = response.json()["notifications"]
        cursor[stream] += 1  # the next offset of its stream
        for ws in (on_a, on_b):
            assert await recv_json(ws) == {"type": "notification", **sent, "stream": stream, "offset": cursor[stream]}
    for ws in (on_a, on_b):
        await expect_no_frame(ws, 0.3)
        await ws.close()


async def test_personal_topic_and_broadcast_sends_reach_both_processes(serve, deploys, alice, alice_token,
                                                                       staff_token):
    a, b = await two_servers(serve)
    await sends_through_either_reach_a_user_on_both(a, b, deploys, alice, alice_token, staff_token)


def admin_csrf(server, session: dict[str, str]) -> tuple[str, str]:
    """The CSRF cookie and form token of the admin's user list."""
    page = server.request("GET", "/admin/auth/user/", headers={"Cookie": f"sessionid={session['sessionid']}"})
    assert page.status == 200, page.text[:300]
    form_token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    return page.cookies()["csrftoken"], form_token


def online_rows(server, session) -> list[tuple[str, str]]:
    """(server, client IP) of each connection on the "Who is online" page."""
    page = server.request("GET", ONLINE, headers={"Cookie": f"sessionid={session['sessionid']}"})
    assert page.status == 200, page.text[:300]
    table = page.text.split('id="online-users"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<td>[^<]*UTC</td><td>([^<]*)</td><td>[^<]*</td>\s*<td>([^<]*)</td>", table)
    return sorted((server_id, ip) for ip, server_id in rows)


async def wait_for_rows(server, session, expected: list, timeout: float = 5.0) -> list:
    """The online page's rows once they equal ``expected`` (presence is written just after hello)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rows = await asyncio.to_thread(online_rows, server, session)
        if rows == expected or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_admin_online_page_and_disconnect_action_span_both_processes(serve, alice, bob, alice_token,
                                                                           bob_token, superuser_session):
    a, b = await two_servers(serve)
    (alice_a, _), (alice_b, _), (bob_b, _) = [await hello(s, t) for s, t in
                                             ((a, alice_token), (b, alice_token), (b, bob_token))]

    # "Who is online", asked of either process, lists the connections of both: two servers.
    everyone = [("host-a", "127.0.0.1"), ("host-b", "127.0.0.1"), ("host-b", "127.0.0.1")]
    for server in (a, b):
        assert await wait_for_rows(server, superuser_session, everyone) == everyone

    # "Disconnect selected users" posted to process A closes Alice's sockets on both, with 4003.
    csrf_cookie, form_token = await asyncio.to_thread(admin_csrf, a, superuser_session)
    posted = await a.request_async(
        "POST", "/admin/auth/user/",
        form={"action": "disconnect", "_selected_action": [str(alice.pk)], "csrfmiddlewaretoken": form_token},
        headers={"Cookie": f"sessionid={superuser_session['sessionid']}; csrftoken={csrf_cookie}"},
    )
    assert posted.status == 302, posted.text[:500]
    for ws in (alice_a, alice_b):
        assert await recv_json(ws) == {"type": "error", "code": "disconnected",
                                       "message": "disconnected by an administrator"}
        await expect_close(ws, 4003)
    await send_json(bob_b, {"type": "ping", "id": "still-here"})
    assert await recv_json(bob_b) == {"type": "pong", "id": "still-here"}

    # Alice's connections leave the page; Bob's stays.
    assert await wait_for_rows(a, superuser_session, [("host-b", "127.0.0.1")]) == [("host-b", "127.0.0.1")]
    await bob_b.close()


async def test_a_topic_deleted_in_one_process_leaves_sockets_on_both_and_its_slug_reused_reaches_neither(
    serve, deploys, alice, bob, alice_token, staff_token, superuser_session
):
    """Topics are routed by id on every process: the admin deletes "deploys" through process A,
    both of Alice's sockets drop it, and a new private "deploys" (Bob only) reaches neither."""
    from notifications.models import Topic

    a, b = await two_servers(serve)
    followed = await a.request_async("POST", "/api/topics/deploys/follow/", token=alice_token)
    assert followed.status == 200, followed.text
    (alice_a, _), (alice_b, _) = await hello(a, alice_token), await hello(b, alice_token)
    csrf_cookie, form_token = await asyncio.to_thread(admin_csrf, a, superuser_session)
    deleted = await a.request_async(
        "POST", f"/admin/notifications/topic/{deploys.pk}/delete/",
        form={"post": "yes", "csrfmiddlewaretoken": form_token},
        headers={"Cookie": f"sessionid={superuser_session['sessionid']}; csrftoken={csrf_cookie}"},
    )
    assert deleted.status == 302, deleted.text[:500]
    for ws in (alice_a, alice_b):
        assert await recv_json(ws) == {"type": "unsubscribed", "topic": "deploys", "stream": f"t.{deploys.pk}"}

    private = await sync_to_async(Topic.objects.create)(slug="deploys", title="Deploys", private=True)
    await sync_to_async(private.members.add)(bob)
    sent = await b.request_async("POST", "/api/notifications/", token=staff_token,
                                 json_body={"title": "members only", "topic": "deploys"})
    assert sent.status == 201, sent.text
    for ws in (alice_a, alice_b):
        await expect_no_frame(ws, 0.5)
        await ws.close()


def hub_messages(server) -> dict[str, float]:
    """``notifications_hub_messages_received_total`` by kind, from the server's /metrics."""
    text = server.request("GET", "/metrics").text
    found = re.findall(r'^notifications_hub_messages_received_total\{kind="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {kind: float(value) for kind, value in found}


async def test_each_process_receives_only_the_audiences_of_its_own_sockets(
    serve, deploys, alice, bob, alice_token, bob_token, staff_token
):
    """A personal send reaches only the process where its user is connected; a topic only those
    with a follower; a broadcast every process with a socket (issue: routing by audience)."""
    a, b = await two_servers(serve)
    followed = await a.request_async("POST", "/api/topics/deploys/follow/", token=alice_token)
    assert followed.status == 200, followed.text
    (alice_a, first), (bob_b, _) = await hello(a, alice_token), await hello(b, bob_token)
    before_a, before_b = await asyncio.to_thread(hub_messages, a), await asyncio.to_thread(hub_messages, b)

    sent = []
    for i in range(200):  # through either process: the sender's process need not serve the user
        response = await (a, b)[i % 2].request_async("POST", "/api/notifications/", token=staff_token,
                                                     json_body={"title": f"p{i}", "users": ["alice"]})
        assert response.status == 201, response.text
        sent.append(response.json()["notifications"][0]["id"])
    frames = [await recv_json(alice_a) for _ in sent]
    mine = f"u.{alice.pk}"
    assert [f["id"] for f in frames] == sent
    assert [f["offset"] for f in frames] == list(range(first["cursor"][mine] + 1, first["cursor"][mine] + 201))

    topic = await b.request_async("POST", "/api/notifications/", token=staff_token,
                                  json_body={"title": "deployed", "topic": "deploys"})
    everyone = await b.request_async("POST", "/api/notifications/", token=staff_token,
                                     json_body={"title": "all", "broadcast": True})
    assert (topic.status, everyone.status) == (201, 201)
    assert [(await recv_json(alice_a))["title"] for _ in range(2)] == ["deployed", "all"]
    assert (await recv_json(bob_b))["title"] == "all"
    await expect_no_frame(bob_b, 0.3)

    after_a, after_b = await asyncio.to_thread(hub_messages, a), await asyncio.to_thread(hub_messages, b)
    received_a = {k: after_a.get(k, 0) - before_a.get(k, 0) for k in ("user", "topic", "broadcast")}
    received_b = {k: after_b.get(k, 0) - before_b.get(k, 0) for k in ("user", "topic", "broadcast")}
    assert received_a == {"user": 200, "topic": 1, "broadcast": 1}
    assert received_b == {"user": 0, "topic": 0, "broadcast": 1}  # nobody there reads alice's or the topic
    for ws in (alice_a, bob_b):
        await ws.close()
