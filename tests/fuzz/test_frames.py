"""Property-based fuzzing of every client frame over the WebSocket.

Whatever a client sends (text or binary, JSON or not, any type, wrong field types, huge
numbers, deep nesting, unusual Unicode, empty, near the size limit) gets a documented
answer: an ``error`` frame whose ``code`` is listed in docs/protocol.md, or the frame
type's own reply, or a close with a code listed there. Nothing is logged at ERROR, every
frame the server sends encodes as UTF-8 (a real server must encode it), and the
connection, or a fresh one after a close, still answers ``ping``.

One connection serves the examples until the server closes it. The per-connection rate
limit is lifted here; the limits have their own tests (tests/test_security.py).
Figures (frames tried, error codes seen): ``pytest -s``, and bench/results/fuzz-latest.json.
"""

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from hypothesis import given, note
from hypothesis import strategies as st

from notifications import auth, protocol, services
from notifications.auth import token_create
from notifications.models import Topic

from ..conftest import MEMORY_LAYER, WS_PATH
from .figures import record

pytestmark = [pytest.mark.django_db(transaction=True)]

PROTOCOL_DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def _first_column(heading: str) -> set[str]:
    """The first column of the first table under ``heading`` in docs/protocol.md."""
    rows: list[str] = []
    for line in PROTOCOL_DOC.split(f"\n{heading}\n", 1)[1].splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return {row.split("|")[1].strip().strip("`") for row in rows[2:]}


DOCUMENTED_ERRORS = _first_column("### Errors") | _first_column("### When the handshake is refused")
DOCUMENTED_CLOSES = {int(code) for cell in _first_column("## Close codes") for code in re.findall(r"\d{4}", cell)}
SERVER_TYPES = {"hello", "notification", "unread_count", "read", "dismissed", "subscribed", "unsubscribed",
                "ack", "resumed", "pong", "error"}
# The direct answer to a client frame (the others arrive on their own: pushes, counts).
REPLY_TYPES = {"error", "pong", "subscribed", "unsubscribed", "ack", "resumed"}
SENTINEL = "fuzz-sentinel-"


# Strategies

# Strings a client might put anywhere: any text; text from unusual Unicode categories,
# lone surrogates included (they reach the server as JSON escapes such as "\ud800",
# since a text frame must be valid UTF-8); and known edge cases (digits that are not
# ASCII, lengths at the limits, names of the server's own frames and methods).
EDGE_STRINGS = [
    "", " ", "\x00", "\ufeff", "\u202e", "\u0301", "\U0001f600", "\ud800", "\udfff", "\ud83d\ude00",
    "²", "١٢", "①", "0012", "-1", "1e3", "a" * 64, "a" * 65, "é" * 81, "deploys", "secret", "nope",
    "ping", "PING", "ping ", "handle_ping", "__class__", "../etc", "' OR 1=1 --",
]
strings = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Cf", "Co", "Cn", "Mn", "Nd", "No", "Zs"]),
            max_size=12),
    st.sampled_from(EDGE_STRINGS),
)
HUGE = [2**31, 2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**300]
numbers = st.one_of(
    st.integers(-3, 40),  # the real notification ids are among these
    st.integers(),
    st.sampled_from(HUGE),
    st.floats(),  # NaN and infinities too: json.dumps writes NaN/Infinity, which Python's json reads
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, strings),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=4),
    max_leaves=10,
)
frame_objects = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(protocol.CLIENT_TYPES), strings, json_values)},
    optional={
        "id": st.one_of(st.integers(-(2**54), 2**54), st.text(max_size=70), json_values),
        "topic": st.one_of(st.sampled_from(["deploys", "secret", "nope"]), strings, json_values),
        "ids": st.one_of(st.lists(st.integers(1, 40), min_size=1, max_size=5), st.lists(numbers, max_size=110),
                         json_values),
        "since": st.one_of(st.integers(0, 60), numbers, strings, json_values, cursors := st.one_of(
            st.dictionaries(st.sampled_from(["b", "u.1", "u.2", "t.1", "t.999999", "x.1", "u.01", "t."]),
                            st.one_of(st.integers(-1, 14), numbers, strings), max_size=4),
            st.lists(st.tuples(st.sampled_from(["b", "u.1", "t.1", "", "b:"]), st.integers(-1, 14)), max_size=4)
            .map(lambda pairs: ",".join(f"{k}:{v}" for k, v in pairs)),
        )),
        "epoch": st.one_of(strings, json_values),
    },
).flatmap(lambda frame: st.dictionaries(strings, json_values, max_size=3).map(lambda extra: {**extra, **frame}))

# Well-formed requests with plausible values (the real topics and ids among them), so the
# fuzzer also reaches the handlers and the database, not only the parser.
request_ids = st.one_of(st.integers(-(2**53) + 1, 2**53 - 1), st.text(max_size=64))
topics = st.one_of(st.just("deploys"), st.sampled_from(["deploys", "secret", "nope", "DEPLOYS", "deploys ", "a\x00b"]),
                   st.sampled_from(EDGE_STRINGS), strings)
plausible_requests = st.one_of(
    st.fixed_dictionaries({"type": st.just("ping")}, optional={"id": request_ids}),
    st.fixed_dictionaries({"type": st.just("mark_all_read")}, optional={"id": request_ids}),
    st.fixed_dictionaries({"type": st.sampled_from(["subscribe", "unsubscribe"]), "topic": topics},
                          optional={"id": request_ids}),
    st.fixed_dictionaries({"type": st.just("mark_read"), "ids": st.lists(st.integers(1, 12), min_size=1, max_size=4)},
                          optional={"id": request_ids}),
    st.fixed_dictionaries(
        {"type": st.just("resume"), "since": cursors},
        optional={"id": request_ids, "epoch": st.one_of(st.none(), st.text(max_size=33))},
    ),
)


@dataclass(frozen=True)
class Frame:
    kind: str
    payload: str | bytes | None = None  # None: built at the size limit the server announced
    offset: int = 0
    filler: str = "a"

    def build(self, max_frame_bytes: int) -> str | bytes:
        if self.payload is not None:
            return self.payload
        # A ping padded to exactly max_frame_bytes + offset bytes of UTF-8.
        head, tail = '{"type":"ping","pad":"', '"}'
        room = max_frame_bytes + self.offset - len(head) - len(tail)
        width = len(self.filler.encode())
        return head + self.filler * (room // width) + "a" * (room % width) + tail

    def __repr__(self) -> str:
        if self.payload is None:
            return f"Frame(near_limit, {self.offset:+d} bytes of {self.filler!r})"
        shown = self.payload if len(self.payload) <= 120 else self.payload[:120]
        return f"Frame({self.kind}, {shown!r}{f' ... {len(self.payload)} in all' if shown is not self.payload else ''})"


def _encode(value, ascii_only: bool) -> str:
    text = json.dumps(value, ensure_ascii=ascii_only)
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: only their JSON escapes can be sent
        text = json.dumps(value)
    return text


RAW_TEXTS = [
    " ", "null", "true", "0", '""', "[]", "{}", '{"type":null}', "NaN", "-Infinity", "1e999999",
    '{"type":"ping"', '{"type":"ping"}}', '{"type":"ping"} {"type":"ping"}', "{'type':'ping'}",
    '\ufeff{"type":"ping"}', '{"type":"ping"}\x00', '{"type":"ping","type":"subscribe"}',
    '{"type":"ping","id":"\\ud800"}', '{"type":"subscribe","topic":"\\udfff"}', '{"type":"\\ud800"}',
    '{"\\ud800":1,"type":"ping"}', '{"type":"resume","since":"\\u00b2"}', '{"type":"ping","id":"\\ud83d\\ude00"}',
]

frames = st.one_of(
    st.builds(lambda value: Frame("request", json.dumps(value)), plausible_requests),
    st.builds(lambda value, ascii_only: Frame("object", _encode(value, ascii_only)), frame_objects, st.booleans()),
    st.builds(lambda value, ascii_only: Frame("json", _encode(value, ascii_only)), json_values, st.booleans()),
    st.builds(lambda text: Frame("text", text), st.text(max_size=60) | st.sampled_from(RAW_TEXTS)),
    st.just(Frame("empty", "")),
    st.builds(lambda data: Frame("binary", data), st.binary(max_size=200) | st.sampled_from([b"", b'{"type":"ping"}'])),
    st.builds(
        lambda depth, opener, wrapped: Frame(
            "nested",
            ('{"type":"ping","x":' if wrapped else "") + opener * depth + "1" + opener[0].translate(
                {ord("["): "]", ord("{"): "}"}) * depth + ("}" if wrapped else ""),
        ),
        st.integers(1, 30_000), st.sampled_from(["[", '{"a":']), st.booleans(),
    ),
    st.builds(lambda digits, key: Frame("huge_number", f'{{"type":"resume","{key}":{"9" * digits}}}'),
              st.integers(1, 6000), st.sampled_from(["since", "id", "epoch"])),
    st.builds(lambda offset, filler: Frame("near_limit", None, offset, filler),
              st.integers(-8, 8), st.sampled_from(["a", "é", "€", "😀"])),
)


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


# The session: one connection across examples, reopened after a close


class FuzzSession:
    def __init__(self, ws, token: str, caplog):
        self.ws, self.token, self.caplog = ws, token, caplog
        self.comm = None
        self.max_frame_bytes = 0
        self.sentinels = 0
        self.logged = 0
        self.examples = 0
        self.frames = Counter()
        self.error_codes = Counter()
        self.close_codes = Counter()
        self.reply_types = Counter()
        self.connections = 0

    async def connection(self):
        if self.comm is None:
            self.comm, hello = await self.ws(self.token, subprotocols=[protocol.SUBPROTOCOL])
            self.connections += 1
            self.max_frame_bytes = hello["max_frame_bytes"]
        return self.comm

    async def example(self, frames: list[Frame]) -> None:
        self.examples += 1
        for frame in frames:
            await self.try_frame(frame)
        await self.ping()
        self.check_logs()

    async def try_frame(self, frame: Frame) -> None:
        comm = await self.connection()
        payload = frame.build(self.max_frame_bytes)
        # send_input, not send_to: send_to refuses empty frames, which clients can send.
        key = "bytes" if isinstance(payload, bytes) else "text"
        await comm.send_input({"type": "websocket.receive", key: payload})
        self.frames[frame.kind] += 1
        replies, close_code = await self.read_until_sentinel()
        oversize = isinstance(payload, str) and len(payload.encode()) > self.max_frame_bytes
        if oversize:
            assert [r.get("code") for r in replies if r["type"] == "error"] == [protocol.FRAME_TOO_LARGE], replies
            assert close_code == protocol.CLOSE_TOO_LARGE, (frame.kind, close_code)
            return
        assert close_code is None, (frame, replies, close_code)
        if isinstance(payload, bytes):
            assert replies[0] == {"type": "error", "code": protocol.BINARY_NOT_SUPPORTED,
                                  "message": "Send JSON text frames, not binary frames."}
        assert any(r["type"] in REPLY_TYPES for r in replies), (frame, replies)

    async def read_until_sentinel(self) -> tuple[list[dict], int | None]:
        """Everything the server sent up to the pong of a ping sent now; or up to its close."""
        self.sentinels += 1
        sentinel = f"{SENTINEL}{self.sentinels}"
        await self.comm.send_to(text_data=json.dumps({"type": "ping", "id": sentinel}))
        replies = []
        while True:
            output = await self.comm.receive_output(timeout=10)
            if output["type"] == "websocket.close":
                code = output.get("code", 1000)
                assert code in DOCUMENTED_CLOSES, code
                self.close_codes[code] += 1
                await self.drop_connection()
                await self.ping()  # a fresh connection works
                return replies, code
            assert output["type"] == "websocket.send" and output.get("text") is not None, output
            assert _encodes(output["text"]), f"a real server cannot send this frame: {output['text']!r}"
            reply = json.loads(output["text"])
            if reply == {"type": "pong", "id": sentinel}:
                return replies, None
            self.check_frame(reply)
            replies.append(reply)

    async def ping(self) -> None:
        comm = await self.connection()
        await comm.send_to(text_data='{"type":"ping","id":"alive"}')
        while (frame := await comm.receive_json_from(timeout=10)) != {"type": "pong", "id": "alive"}:
            self.check_frame(frame)

    async def drop_connection(self) -> None:
        comm, self.comm = self.comm, None
        try:
            await comm.disconnect(timeout=2)
        except Exception:  # noqa: S110 - closed by the server: its application has already finished
            pass

    def check_frame(self, frame: dict) -> None:
        assert isinstance(frame, dict) and frame.get("type") in SERVER_TYPES, frame
        self.reply_types[frame["type"]] += 1
        if frame["type"] == "error":
            assert frame["code"] in DOCUMENTED_ERRORS, frame
            assert frame["code"] != protocol.SERVER_ERROR, frame
            assert isinstance(frame["message"], str) and frame["message"], frame
            assert set(frame) <= {"type", "code", "message", "id", "fields"}, frame
            self.error_codes[frame["code"]] += 1

    def check_logs(self) -> None:
        records = self.caplog.records[self.logged:]
        self.logged += len(records)
        errors = [r for r in records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() + (r.exc_text or "") for r in errors]

    def figures(self) -> dict:
        return {
            "examples": self.examples,
            "frames_tried": sum(self.frames.values()),
            "frames_by_kind": dict(self.frames),
            "distinct_error_codes": len(self.error_codes),
            "error_codes": dict(self.error_codes),
            "close_codes": {str(code): n for code, n in self.close_codes.items()},
            "server_frame_types": dict(self.reply_types),
            "connections_opened": self.connections,
        }


@pytest.fixture
async def fuzz(ws, settings, caplog, make_user):
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "WS_RATE": 1e9, "WS_BURST": 10**9}
    caplog.set_level(logging.WARNING)

    @sync_to_async
    def world():
        alice, bob = make_user("alice"), make_user("bob")
        Topic.objects.create(slug="deploys", title="Deploys")
        Topic.objects.create(slug="secret", title="Secret", private=True).members.add(bob)
        for i in range(3):
            services.notification_send(users=[alice], title=f"for alice {i}")
        services.notification_send(users=[bob], title="for bob")
        services.notification_send(topic="deploys", title="deploy")
        services.notification_send(broadcast=True, title="everyone")
        return token_create(user=alice)[1]

    session = FuzzSession(ws, await world(), caplog)
    yield session
    if session.examples:
        record("websocket_frames", session.figures())


@given(frames=st.lists(frames, min_size=1, max_size=6))
async def test_every_client_frame_gets_a_documented_answer_and_the_connection_survives(fuzz, frames):
    note(f"frames: {frames!r}")
    await fuzz.example(frames)


def test_every_error_and_close_code_of_the_server_is_in_docs_protocol_md():
    constants = {name: value for name, value in vars(protocol).items() if name.isupper()}
    assert {v for n, v in constants.items() if n.startswith("CLOSE_")} <= DOCUMENTED_CLOSES
    errors = {v for v in constants.values() if isinstance(v, str) and re.fullmatch(r"[a-z_]+", v)}
    handshake = {*auth.COUNTED_FAILURES, auth.TOO_MANY_FAILURES.code, "user_inactive", "origin_not_allowed",
                 "token_in_query", "unauthenticated"}
    assert errors | handshake <= DOCUMENTED_ERRORS, (errors | handshake) - DOCUMENTED_ERRORS


# What the fuzzer found, kept as plain tests


async def test_a_cursor_of_non_ascii_digits_is_invalid_not_a_server_error(ws, alice_token, caplog):
    comm, _ = await ws(alice_token)
    await comm.send_json_to({"type": "resume", "since": {"b": "²"}, "id": 1})
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "invalid", "id": 1, "fields": {"since": "invalid"}, "message": protocol.CURSOR_HELP,
    }
    refused = await ws(alice_token, path=f"{WS_PATH}?since=b:%C2%B2", hello=False)
    assert (await refused.receive_json_from(timeout=5))["code"] == "invalid"
    assert (await refused.receive_output(timeout=5))["code"] == protocol.CLOSE_BAD_REQUEST
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_lone_surrogates_and_nul_are_invalid_in_ids_and_topics(ws, alice_token, caplog):
    comm, _ = await ws(alice_token)
    await comm.send_to(text_data='{"type": "ping", "id": "\\ud800"}')  # a reply echoing it could not be sent
    assert await comm.receive_json_from(timeout=5) == {
        "type": "error", "code": "invalid", "fields": {"id": "invalid"},
        "message": "'id' must be a string of at most 64 characters or an integer.",
    }
    for topic in ("\\udfff", "a\\u0000b"):  # PostgreSQL cannot compare either
        await comm.send_to(text_data=f'{{"type": "subscribe", "topic": "{topic}", "id": 2}}')
        assert await comm.receive_json_from(timeout=5) == {
            "type": "error", "code": "invalid", "id": 2, "fields": {"topic": "required slug"},
            "message": "'topic' must be a topic slug.",
        }
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
