"""The examples: the documented pattern for "when my model changes, notify users"
(examples/services.py), and the terminal client examples/listen.py against a real daphne process."""

import asyncio
import json
import re
import subprocess
import sys

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction
from websockets.asyncio.server import serve

from examples import listen
from examples.models import Order
from examples.services import order_place, order_ship
from tests.conftest import MEMORY_LAYER
from tests.server import BASE_DIR, HOST, LiveServer, daphne_executable, database_url, http_async, start_server

pytestmark = [pytest.mark.django_db(transaction=True)]


async def test_placing_an_order_notifies_the_customer_live(layer, ws, alice, alice_token):
    comm, _ = await ws(alice_token)
    order = await sync_to_async(order_place)(customer=alice, item="Blue mug")
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["title"], frame["data"], frame["link"]) == (
        f"Order #{order.pk} placed", {"order_id": order.pk, "status": "placed"}, f"/orders/{order.pk}/"
    )
    await sync_to_async(order_ship)(order=order)
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["title"], frame["level"], frame["data"]) == (
        f"Order #{order.pk} shipped", "success", {"order_id": order.pk, "status": "shipped"}
    )


async def test_a_rolled_back_model_change_stores_and_pushes_nothing(layer, ws, alice, alice_token):
    comm, _ = await ws(alice_token)

    def place_then_fail():
        with pytest.raises(RuntimeError), transaction.atomic():
            order_place(customer=alice, item="Never")
            raise RuntimeError("payment failed")

    await sync_to_async(place_then_fail)()
    assert await comm.receive_nothing(timeout=0.3)
    assert not await sync_to_async(Order.objects.exists)()
    assert not await sync_to_async(alice.notifications.exists)()


# examples/listen.py


class Daphne:
    """daphne on the test database and its own in-memory channel layer; restartable on the same port."""

    def __init__(self, log_dir):
        from django.conf import settings
        from django.db import connection

        self.env = {"DATABASE_URL": database_url(connection.settings_dict), "SECRET_KEY": settings.SECRET_KEY,
                    "ALLOWED_HOSTS": HOST}
        self.log_path = log_dir / "daphne.log"
        self.server: LiveServer | None = None

    def start(self) -> LiveServer:
        port = self.server.port if self.server else None
        self.server = start_server(
            "daphne", lambda chosen: [daphne_executable(), "-b", HOST, "-p", str(chosen), "project.asgi:application"],
            self.env, self.log_path, port=port,
        )
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


@pytest.fixture
def daphne(tmp_path, settings):
    settings.CHANNEL_LAYERS = MEMORY_LAYER  # what this process sends while daphne is down is pushed to no one
    server = Daphne(tmp_path)
    yield server
    server.stop()
    assert "Traceback" not in server.log_path.read_text(errors="replace")


@pytest.mark.parametrize(("given", "endpoint"), [
    ("http://127.0.0.1:8123", "ws://127.0.0.1:8123/ws/notifications/"),
    ("https://notify.example.com/", "wss://notify.example.com/ws/notifications/"),
    ("http://example.com/notify/", "ws://example.com/notify/ws/notifications/"),  # a site under a path
    ("ws://[::1]:9001/ws/notifications/", "ws://[::1]:9001/ws/notifications/"),
    ("WSS://notify.example.com:8443/ws/notifications/", "wss://notify.example.com:8443/ws/notifications/"),
    ("http://127.0.0.1:8123/ws/notifications/", "ws://127.0.0.1:8123/ws/notifications/"),
])
def test_listen_takes_the_site_or_its_socket_endpoint_on_any_port(given, endpoint):
    assert listen.socket_url(given) == endpoint


@pytest.mark.parametrize("given", ["127.0.0.1:8123", "ftp://example.com/", "http:///ws/notifications/"])
def test_listen_refuses_a_url_it_cannot_turn_into_a_socket_endpoint(given):
    with pytest.raises(ValueError, match="is not a ws://, wss://, http:// or https:// URL with a host"):
        listen.socket_url(given)
    run = subprocess.run([sys.executable, "examples/listen.py", given, "ntf_x"], cwd=BASE_DIR,
                         capture_output=True, text=True, timeout=20)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.splitlines()[-1] == (
        f"listen.py: error: {given!r} is not a ws://, wss://, http:// or https:// URL with a host")


def test_listen_has_no_port_of_its_own():
    """It works on any port: no default URL, no 8000 in its code or its usage text."""
    assert "8000" not in (BASE_DIR / "examples" / "listen.py").read_text()
    usage = subprocess.run([sys.executable, "examples/listen.py", "--help"], cwd=BASE_DIR,
                           capture_output=True, text=True, timeout=20)
    assert usage.returncode == 0 and "8000" not in usage.stdout
    assert usage.stdout.startswith("usage: listen.py [-h] [--max-delay SECONDS] URL TOKEN\n")


class Listener:
    """examples/listen.py run from the command line, as a user runs it; its stdout read line by line."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process

    @classmethod
    async def start(cls, url: str, token: str) -> "Listener":
        return cls(await asyncio.create_subprocess_exec(
            sys.executable, "examples/listen.py", url, token, "--max-delay", "0.5", cwd=BASE_DIR,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        ))

    async def frame(self) -> dict:
        """The next line it printed, a frame."""
        line = await asyncio.wait_for(self.process.stdout.readline(), 10)
        assert line, f"listen.py exited ({self.process.returncode}) instead of printing a frame"
        return json.loads(line)

    async def exit(self) -> tuple[int, str, str]:
        """Its exit status, the rest of its stdout and its stderr."""
        out, err = await asyncio.wait_for(self.process.communicate(), 20)
        return self.process.returncode, out.decode(), err.decode()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


@pytest.mark.server
async def test_listen_prints_notifications_resumes_after_a_restart_and_stops_on_a_revoked_token(
    daphne, alice, alice_token, staff_token
):
    """Against daphne on a free port (never 8000's), given the site's http:// URL."""
    from notifications import auth, protocol, services

    server = await asyncio.to_thread(daphne.start)
    listener = await Listener.start(server.http_url, alice_token)
    try:
        hello = await listener.frame()
        assert (hello["type"], hello["protocol"], hello["cursor"]) == ("hello", "notifications.v2",
                                                                        {f"u.{alice.pk}": 0, "b": 0})
        response = await http_async(server, "POST", "/api/notifications/", token=staff_token,
                                    json_body={"title": "Live", "users": ["alice"]})
        assert response.status == 201, response.text
        [sent] = response.json()["notifications"]
        assert await listener.frame() == {"type": "notification", **sent, "stream": f"u.{alice.pk}", "offset": 1}

        # The server goes away; what is sent meanwhile is stored, and pushed to no one.
        await asyncio.to_thread(daphne.stop)
        [missed] = await sync_to_async(services.notification_send)(users=[alice], title="Sent while down")
        await asyncio.sleep(1)  # a few failed reconnect attempts
        await asyncio.to_thread(daphne.start)  # the same port

        # Resumed from {u.<alice>: 1, b: 0}: the one sent while down is printed, once; the live one is not again.
        hello = await listener.frame()
        assert (hello["type"], hello["cursor"]) == ("hello", {f"u.{alice.pk}": 2, "b": 0})
        assert await listener.frame() == protocol.notification_frame(missed)
        assert (missed.offset, missed.recipient_id) == (2, alice.pk)
        assert await listener.frame() == {"type": "resumed", "recovered": True, "count": 1,
                                          "cursor": {f"u.{alice.pk}": 2, "b": 0}}
        assert await listener.frame() == {"type": "unread_count", "count": 2}

        # A revoked token: the server's reason, then it stops with status 1 instead of retrying.
        await asyncio.to_thread(daphne.stop)
        await sync_to_async(auth.token_revoke)(await sync_to_async(auth.token_lookup)(alice_token))
        await asyncio.to_thread(daphne.start)
        assert await listener.frame() == {"type": "error", "code": "token_revoked", "message": "The token was revoked."}
        status, rest, errors = await listener.exit()
    finally:
        listener.kill()
    assert (status, rest) == (1, "")
    *reconnects, last = errors.splitlines()
    assert reconnects, errors
    assert all(re.fullmatch(r"(closed with \d{4}|cannot connect: .+); reconnecting in \d+\.\d s", line)
               for line in reconnects), errors
    assert last == f"closed with 4003 (token_revoked: The token was revoked.): {listen.FINAL[4003]}; not reconnecting"


@pytest.mark.server
async def test_listen_stops_at_once_on_a_token_the_server_does_not_know(daphne):
    server = await asyncio.to_thread(daphne.start)
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "examples/listen.py", server.ws_url(), "ntf_not_a_token"],
        cwd=BASE_DIR, capture_output=True, text=True, timeout=20,
    )
    assert (run.returncode, run.stdout, run.stderr) == (
        1, '{"type": "error", "code": "invalid_token", "message": "The token is not valid."}\n',
        f"closed with 4001 (invalid_token: The token is not valid.): {listen.FINAL[4001]}; not reconnecting\n")


@pytest.mark.server
async def test_listen_stops_on_a_handshake_refused_with_an_http_4xx_a_wrong_path(daphne):
    server = await asyncio.to_thread(daphne.start)  # daphne refuses a path no route serves: HTTP 403, uvicorn 404
    wrong = f"ws://{HOST}:{server.port}/not/the/socket/ws/notifications/"
    run = await asyncio.to_thread(subprocess.run, [sys.executable, "examples/listen.py", wrong, "ntf_x"],
                                  cwd=BASE_DIR, capture_output=True, text=True, timeout=20)
    assert (run.returncode, run.stdout) == (1, "")
    assert re.fullmatch(rf"the server refused the WebSocket handshake with HTTP 40[34]: is {re.escape(wrong)} "
                        r"its endpoint\?\n", run.stderr), run.stderr


async def test_listen_waits_for_retry_after_and_resumes_from_its_cursor_after_a_dropped_socket(monkeypatch):
    """A scripted server: a busy refusal (``retry_after`` 1 s, close 4013); a connection that
    delivers one notification and drops (1012); a resume with the cursor and epoch; a final 4003."""
    monkeypatch.setattr(listen, "BASE_DELAY", 0.01)
    hello = {"type": "hello", "protocol": "notifications.v2", "version": 2, "user": {"id": 1, "username": "alice"},
             "unread_count": 0, "topics": [], "cursor": {"u.1": 4, "b": 9}, "epoch": "e1", "max_frame_bytes": 65536}
    notification = {"type": "notification", "id": 7, "title": "Hi", "stream": "u.1", "offset": 5}
    connections: list[tuple[float, str]] = []

    async def script(ws):
        connections.append((asyncio.get_running_loop().time(), ws.request.path))
        if len(connections) == 1:
            await ws.send(json.dumps({"type": "error", "code": "overloaded", "message": "Busy.", "retry_after": 1.0}))
            await ws.close(4013, "overloaded")
        elif len(connections) == 2:
            for frame in (hello, notification):
                await ws.send(json.dumps(frame))
            await ws.close(1012, "restarting")
        else:
            await ws.send(json.dumps({"type": "error", "code": "disconnected", "message": "Bye."}))
            await ws.close(4003, "disconnected")

    frames: list[dict] = []
    async with serve(script, HOST, 0) as server:
        port = server.sockets[0].getsockname()[1]
        stopped = await asyncio.wait_for(listen.listen(f"http://{HOST}:{port}", "ntf_x", frames.append), 10)
    assert stopped == f"closed with 4003 (disconnected: Bye.): {listen.FINAL[4003]}; not reconnecting"
    assert [path for _, path in connections] == [
        "/ws/notifications/", "/ws/notifications/", "/ws/notifications/?since=u.1:5,b:9&epoch=e1"]
    assert connections[1][0] - connections[0][0] >= 1.0  # not sooner than retry_after
    assert [f["type"] for f in frames] == ["error", "hello", "notification", "error"]
