"""WebSocket handshakes to a path no route serves: a clean refusal, never an HTTP 500 with a
traceback. Against a real uvicorn: tests/ops/test_hardening.py."""

import json
import logging

import pytest
from channels.testing import WebsocketCommunicator

from notifications import routing

UNKNOWN_PATHS = ["/ws/notifications", "/ws/nope/", "/", "/ws/notifications/extra/"]


def communicator(path: str, *, http_response: bool) -> WebsocketCommunicator:
    from project.asgi import application

    comm = WebsocketCommunicator(application, path)
    comm.scope["client"] = ("127.0.0.1", 50000)
    if http_response:
        comm.scope["extensions"] = {"websocket.http.response": {}}  # as uvicorn offers it
    return comm


def errors(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("path", UNKNOWN_PATHS)
async def test_unknown_path_gets_http_404_with_a_json_body_when_the_server_can_send_one(path, caplog, monkeypatch):
    monkeypatch.setattr(routing, "DENIAL_LINGER", 0.1)
    comm = communicator(path, http_response=True)
    await comm.send_input({"type": "websocket.connect"})
    start = await comm.receive_output(timeout=5)
    body = await comm.receive_output(timeout=5)
    assert start == {"type": "websocket.http.response.start", "status": 404,
                     "headers": [(b"content-type", b"application/json")]}
    assert body["type"] == "websocket.http.response.body"
    assert json.loads(body["body"]) == {"error": {
        "code": "not_found", "message": "No WebSocket endpoint at this path; connect to /ws/notifications/."}}
    await comm.send_input({"type": "websocket.disconnect", "code": 1006})
    await comm.wait(timeout=5)  # the application ended, without an exception
    assert errors(caplog) == []


@pytest.mark.parametrize("path", UNKNOWN_PATHS)
async def test_unknown_path_is_refused_before_accept_without_the_extension(path, caplog):
    comm = communicator(path, http_response=False)
    assert await comm.connect(timeout=5) == (False, 1000)  # the server answers HTTP 403
    await comm.wait(timeout=5)
    assert errors(caplog) == []


@pytest.mark.django_db(transaction=True)
async def test_the_notifications_path_is_still_served(ws, alice_token):
    _, hello = await ws(alice_token)
    assert hello["type"] == "hello"
