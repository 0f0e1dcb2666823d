"""The examples: the documented pattern for "when my model changes, notify users"
(examples/services.py), and the terminal client examples/listen.py against a real daphne process."""

import asyncio
import subprocess
import sys

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction

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


async def next_frame(frames: asyncio.Queue) -> dict:
    return await asyncio.wait_for(frames.get(), 10)


@pytest.mark.server
async def test_listen_reconnects_resumes_from_its_cursor_and_stops_on_a_revoked_token(
    daphne, monkeypatch, alice, alice_token, staff_token
):
    from notifications import auth, protocol, services

    monkeypatch.setattr(listen, "BASE_DELAY", 0.05)
    monkeypatch.setattr(listen, "MAX_DELAY", 0.2)
    server = await asyncio.to_thread(daphne.start)
    frames: asyncio.Queue = asyncio.Queue()
    listening = asyncio.create_task(listen.listen(alice_token, server.ws_url(), frames.put_nowait))
    try:
        hello = await next_frame(frames)
        assert (hello["type"], hello["protocol"], hello["cursor"]) == ("hello", "notifications.v2",
                                                                        {f"u.{alice.pk}": 0, "b": 0})
        response = await http_async(server, "POST", "/api/notifications/", token=staff_token,
                                    json_body={"title": "Live", "users": ["alice"]})
        assert response.status == 201, response.text
        [sent] = response.json()["notifications"]
        assert await next_frame(frames) == {"type": "notification", **sent, "stream": f"u.{alice.pk}", "offset": 1}

        await asyncio.to_thread(daphne.stop)
        [missed] = await sync_to_async(services.notification_send)(users=[alice], title="Sent while down")
        await asyncio.sleep(0.5)  # a few failed reconnect attempts
        await asyncio.to_thread(daphne.start)

        # Resumed from {u.<alice>: 1, b: 0}: the one sent while down is replayed, the live one is not.
        hello = await next_frame(frames)
        assert (hello["type"], hello["cursor"]) == ("hello", {f"u.{alice.pk}": 2, "b": 0})
        assert await next_frame(frames) == protocol.notification_frame(missed)
        assert (missed.offset, missed.recipient_id) == (2, alice.pk)
        assert await next_frame(frames) == {"type": "resumed", "recovered": True, "count": 1,
                                            "cursor": {f"u.{alice.pk}": 2, "b": 0}}
        assert await next_frame(frames) == {"type": "unread_count", "count": 2}

        await asyncio.to_thread(daphne.stop)
        await sync_to_async(auth.token_revoke)(await sync_to_async(auth.token_lookup)(alice_token))
        await asyncio.to_thread(daphne.start)
        assert (await next_frame(frames))["code"] == "token_revoked"  # the error frame before close 4003
        assert await asyncio.wait_for(listening, 10) == f"closed with 4003: {listen.FINAL[4003]}"
    finally:
        listening.cancel()

    # From the command line, a refused token ends it with that message and exit status 1.
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "examples/listen.py", "ntf_not_a_token", "--url", server.ws_url()],
        cwd=BASE_DIR, capture_output=True, text=True, timeout=20,
    )
    assert (run.returncode, run.stdout, run.stderr) == (
        1, '{"type": "error", "code": "invalid_token", "message": "The token is not valid."}\n',
        f"closed with 4001: {listen.FINAL[4001]}\n")
