"""The database work of handshakes on several threads (``notifications/db.py``), and the answer
when too much of it waits: close 4013 with a retry hint, at once."""

import asyncio
import threading

import pytest

from notifications import auth, db

from .conftest import WS_PATH, bearer

pytestmark = [pytest.mark.django_db(transaction=True)]


async def test_two_handshakes_do_their_database_work_at_the_same_time(ws, alice_token, bob_token, monkeypatch):
    """Each handshake reads its token, user and topics; with one database thread per process
    (Channels' default) the second read would start only after the first returned, and this
    barrier for two would never open."""
    barrier = threading.Barrier(2, timeout=5)
    real = auth._token_row
    threads = set()

    def token_rows_together(prefix, with_topics):
        threads.add(threading.current_thread().name)
        barrier.wait()  # raises BrokenBarrierError (a failed handshake) unless both are here at once
        return real(prefix, with_topics)

    monkeypatch.setattr(auth, "_token_row", token_rows_together)
    (_, alice_hello), (_, bob_hello) = await asyncio.gather(ws(alice_token), ws(bob_token))
    assert (alice_hello["type"], bob_hello["type"]) == ("hello", "hello")
    assert len(threads) == 2 and all(name.startswith("notifications-db") for name in threads)


async def test_a_handshake_while_the_database_threads_are_far_behind_is_told_to_retry_later(
        ws, alice_token, monkeypatch):
    monkeypatch.setattr(db, "backlog", lambda: db.max_backlog())
    comm = await ws(alice_token, hello=False)
    frame = await comm.receive_json_from(timeout=5)
    assert frame["type"] == "error" and frame["code"] == "overloaded", frame
    assert 1.0 <= frame["retry_after"] <= 5.0
    close = await comm.receive_output(timeout=5)
    assert close["type"] == "websocket.close" and close["code"] == 4013
    # Refused before any database work: no token lookup was queued behind the others.
    monkeypatch.setattr(db, "backlog", lambda: 0)
    _, hello = await ws(alice_token)
    assert hello["type"] == "hello"


async def test_a_database_outage_at_the_handshake_gives_a_retry_hint_too(ws, alice_token, monkeypatch):
    from django.db import OperationalError

    def down(raw, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(auth, "token_and_topics", down)
    from channels.testing import WebsocketCommunicator

    from project.asgi import application

    comm = WebsocketCommunicator(application, WS_PATH, headers=bearer(alice_token))
    comm.scope["client"] = ("127.0.0.1", 50000)
    connected, _ = await comm.connect(timeout=5)
    assert connected
    frame = await comm.receive_json_from(timeout=5)
    assert (frame["code"], 1.0 <= frame["retry_after"] <= 5.0) == ("unavailable", True), frame
    assert (await comm.receive_output(timeout=5))["code"] == 4013
    await comm.disconnect()
