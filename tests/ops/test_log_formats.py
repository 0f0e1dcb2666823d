"""Structured logs: one line per WebSocket connect, refusal, error and disconnect, with the user,
connection, client IP and close code; plain or JSON; never a token, ticket, cookie or password."""

import asyncio
import json
import logging

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from notifications.auth import ticket_issue
from notifications.log_formats import JsonFormatter, PlainFormatter, redact
from tests.server import expect_close, recv_json

CONNECTIONS = "notifications.connections"


def connection_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == CONNECTIONS]


def every_formatted_line(caplog) -> str:
    """Every captured record, through both production formatters."""
    plain = PlainFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    json_format = JsonFormatter()
    return "\n".join(f.format(r) for r in caplog.records for f in (plain, json_format))


# Redaction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GET /ws/notifications/?ticket=tkt_abcDEF-123_x HTTP/1.1",
         "GET /ws/notifications/?ticket=[redacted] HTTP/1.1"),
        ('"WebSocket /ws/?since=4&token=ntf_0123456789ab_SECRETsecret"',
         '"WebSocket /ws/?since=4&token=[redacted]"'),
        ("Authorization: Bearer ntf_0123456789ab_SECRETsecret", "Authorization: Bearer [redacted]"),
        ("auth failed for ntf_0123456789ab_SECRETsecret", "auth failed for ntf_0123456789ab_[redacted]"),
        ("Cookie: sessionid=abc123def; csrftoken=xyz789", "Cookie: sessionid=[redacted]; csrftoken=[redacted]"),
        ('{"password": "hunter2", "username": "alice"}', '{"password": "[redacted]", "username": "alice"}'),
        ("websocket connect user_id=1 auth=bearer client_ip=::1",
         "websocket connect user_id=1 auth=bearer client_ip=::1"),
        ("error code=invalid_token close_code=4001", "error code=invalid_token close_code=4001"),
        # A password-reset link's token goes; the uid, and the next step's URL, stay.
        ('127.0.0.1:50000 - "GET /accounts/reset/MQ/cz1a2b-0123456789abcdef0123456789abcdef/ HTTP/1.1" 302',
         '127.0.0.1:50000 - "GET /accounts/reset/MQ/[redacted]/ HTTP/1.1" 302'),
        ("Not Found: /accounts/reset/Mjc/cz1a2b-0123456789abcdef", "Not Found: /accounts/reset/Mjc/[redacted]"),
        ('127.0.0.1:50000 - "GET /accounts/reset/MQ/set-password/ HTTP/1.1" 200',
         '127.0.0.1:50000 - "GET /accounts/reset/MQ/set-password/ HTTP/1.1" 200'),
        ('"POST /accounts/reset/MQ/set-password/ HTTP/1.1" 302',
         '"POST /accounts/reset/MQ/set-password/ HTTP/1.1" 302'),
        ("GET /accounts/reset/done/ HTTP/1.1", "GET /accounts/reset/done/ HTTP/1.1"),
    ],
)
def test_redact(text, expected):
    assert redact(text) == expected


def test_json_format_has_the_extra_fields_and_the_traceback():
    logger = logging.getLogger("test.json")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("bad ticket=tkt_leaky")
        except ValueError:
            logger.exception("failed for %s", "alice", extra={"user_id": 7, "close_code": 4003})
    finally:
        logger.removeHandler(handler)
    entry = json.loads(JsonFormatter().format(records[0]))
    assert set(entry) == {"time", "level", "logger", "message", "user_id", "close_code", "exception"}
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "test.json", "failed for alice")
    assert (entry["user_id"], entry["close_code"]) == (7, 4003)
    assert "ValueError: bad ticket=[redacted]" in entry["exception"]


# One line per event, in this process (caplog)


@pytest.mark.django_db(transaction=True)
async def test_one_line_per_connect_error_and_disconnect_with_ids_and_no_secrets(ws, caplog, alice, alice_token,
                                                                                  settings):
    """Token, ticket and session handshakes, a bad frame, a refused ticket: the lines name the user, the
    connection, the client and the close code, and no formatted line contains a credential."""
    caplog.set_level(logging.INFO)
    ticket, _ = await sync_to_async(ticket_issue)(user=alice)
    client = Client()
    await sync_to_async(client.force_login)(alice)
    session = client.cookies["sessionid"].value
    cookie = [(b"cookie", f"sessionid={session}".encode()), (b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]

    by_token, _ = await ws(alice_token, client=("198.51.100.7", 40000))
    by_ticket, _ = await ws(path=f"/ws/notifications/?ticket={ticket}")
    by_session, _ = await ws(headers=cookie)
    await by_token.send_to(text_data="{oops")
    assert (await by_token.receive_json_from(timeout=5))["code"] == "bad_json"
    await by_token.disconnect(code=1000)
    reused = await ws(path=f"/ws/notifications/?ticket={ticket}", hello=False)
    assert (await reused.receive_json_from(timeout=5))["code"] == "invalid_ticket"

    records = connection_records(caplog)
    events = [(r.event, getattr(r, "auth", None)) for r in records]
    assert events == [("connect", "bearer"), ("connect", "ticket"), ("connect", "session"), ("error", None),
                      ("disconnect", None), ("refused", None)]
    connect, error, disconnect, refused = records[0], records[3], records[4], records[5]
    assert (connect.user_id, connect.client_ip) == (alice.pk, "198.51.100.7")
    assert len(connect.connection_id) == 32
    assert (error.code, error.connection_id) == ("bad_json", connect.connection_id)
    assert (disconnect.close_code, disconnect.connection_id, disconnect.user_id) == (1000, connect.connection_id,
                                                                                     alice.pk)
    assert disconnect.duration_s >= 0
    assert (refused.user_id, refused.code, refused.close_code) == (None, "invalid_ticket", 4001)
    assert connect.getMessage() == (f"websocket connect user_id={alice.pk} connection_id={connect.connection_id} "
                                    f"client_ip=198.51.100.7 auth=bearer")

    text = every_formatted_line(caplog)
    for secret in (alice_token, alice_token.split("_", 2)[2], ticket, session):  # ntf_<prefix>_<secret>
        assert secret not in text


# The real server's log file


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_server_log_in_json_has_the_events_and_no_credentials(serve, alice, alice_token, settings):
    """uvicorn logs each handshake and request with its query string: a ticket, and a token someone
    put in a URL, are redacted there too; the session cookie and the Authorization header never
    appear."""
    server = await asyncio.to_thread(serve, "json", LOG_FORMAT="json")
    client = Client()
    await sync_to_async(client.force_login)(alice)
    session = client.cookies["sessionid"].value

    issued = await server.request_async("POST", "/api/ws-ticket/", token=alice_token)
    ticket = issued.json()["ticket"]
    with_ticket = await server.websocket(query={"ticket": ticket})
    assert (await recv_json(with_ticket))["type"] == "hello"
    with_token = await server.websocket(token=alice_token)
    assert (await recv_json(with_token))["type"] == "hello"
    with_session = await server.websocket(headers={"Cookie": f"sessionid={session}", "Origin": server.http_url})
    assert (await recv_json(with_session))["type"] == "hello"
    token_in_url = await server.websocket(query={"token": alice_token})
    assert (await recv_json(token_in_url))["code"] == "token_in_query"
    await expect_close(token_in_url, 4001)
    api = await server.request_async("GET", f"/api/notifications/?access_token={alice_token}",
                                     headers={"Cookie": f"sessionid={session}"})
    assert api.status in (200, 400, 401)
    for ws in (with_ticket, with_token, with_session):
        await ws.close()
    await asyncio.sleep(0.3)

    log = server.log()
    for secret in (alice_token, alice_token.split("_", 2)[2], ticket, ticket.removeprefix("tkt_"), session):
        assert secret not in log, f"a credential is in the server log:\n{log}"
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert entries, log
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    events = [e for e in entries if e["logger"] == CONNECTIONS]
    assert sorted((e["event"], e.get("auth") or e.get("code")) for e in events if e["event"] != "disconnect") == [
        ("connect", "bearer"), ("connect", "session"), ("connect", "ticket"), ("refused", "token_in_query")]
    disconnects = [e for e in events if e["event"] == "disconnect"]
    assert [(e["user_id"], e["client_ip"], e["close_code"]) for e in disconnects] == [(alice.pk, "127.0.0.1", 1000)] * 3
    handshakes = [e["message"] for e in entries if e["logger"] == "uvicorn.error" and "WebSocket" in e["message"]]
    assert any("ticket=[redacted]" in m for m in handshakes), handshakes
    assert any("token=[redacted]" in m for m in handshakes), handshakes


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_a_password_reset_links_token_is_not_in_the_access_log(serve, alice):
    """The link in the reset e-mail carries the token in its path; uvicorn logs every path."""
    from django.contrib.auth.tokens import default_token_generator
    from django.utils.encoding import force_bytes
    from django.utils.http import urlsafe_base64_encode

    server = await asyncio.to_thread(serve, "reset")
    uid = urlsafe_base64_encode(force_bytes(alice.pk))
    token = await sync_to_async(default_token_generator.make_token)(alice)
    link = await server.request_async("GET", f"/accounts/reset/{uid}/{token}/")
    assert (link.status, link.headers["Location"]) == (302, f"/accounts/reset/{uid}/set-password/")
    form = await server.request_async("GET", link.headers["Location"],
                                      headers={"Cookie": f"sessionid={link.cookies()['sessionid']}"})
    assert form.status == 200 and "new_password1" in form.text  # the token was good
    await asyncio.sleep(0.3)

    log = server.log()
    assert token not in log and token.split("-")[1] not in log, log
    assert f'"GET /accounts/reset/{uid}/[redacted]/ HTTP/1.1" 302' in log, log
    assert f'"GET /accounts/reset/{uid}/set-password/ HTTP/1.1" 200' in log, log
