"""The WebSocket protocol ``notifications.v2``: frame shapes, error codes, close codes.

Documented for clients in ``docs/protocol.md``; keep the two in step.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import streams

SUBPROTOCOL = "notifications.v2"
PROTOCOL_VERSION = 2
# Version 1 numbered every notification in one stream for everyone (an integer cursor); it is
# not served any more: a client that offers only it gets UNSUPPORTED_PROTOCOL and close 4426.
OLD_SUBPROTOCOLS = ("notifications.v1",)

# Close codes the application sends. Only 1000 and 3000-4999 may be sent by an application
# under Daphne (autobahn refuses the others), so the RFC 6455 meanings 1008, 1009, 1013
# have application twins: 4400, 4009, 4013.
CLOSE_NORMAL = 1000
CLOSE_UNAUTHENTICATED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_REPLACED = 4005
CLOSE_SLOW_CONSUMER = 4008
# The session behind a cookie-authenticated connection changed (logout, password change):
# reconnect, and the handshake decides whether the session is still valid.
CLOSE_REAUTHENTICATE = 4010
CLOSE_TOO_LARGE = 4009
CLOSE_STREAM_RESET = 4012
CLOSE_TRY_AGAIN_LATER = 4013
CLOSE_RATE_LIMITED = 4029
# The client speaks a protocol version this server no longer serves (HTTP's 426 Upgrade Required).
CLOSE_UNSUPPORTED_PROTOCOL = 4426
CLOSE_BAD_REQUEST = 4400

# Limit violations (rate, topics) tolerated on one connection before it is closed with 4029.
MAX_VIOLATIONS = 20

# Error codes carried in ``{"type": "error", "code": ...}`` frames.
BAD_JSON = "bad_json"
BAD_FRAME = "bad_frame"
UNKNOWN_TYPE = "unknown_type"
INVALID = "invalid"
NOT_FOUND = "not_found"
FORBIDDEN = "forbidden"
BINARY_NOT_SUPPORTED = "binary_not_supported"
SERVER_ERROR = "server_error"
UNAUTHENTICATED = "unauthenticated"
FRAME_TOO_LARGE = "frame_too_large"
DISCONNECTED = "disconnected"
SESSION_CHANGED = "session_changed"
UNAVAILABLE = "unavailable"
OVERLOADED = "overloaded"
RATE_LIMITED = "rate_limited"
TOO_MANY_TOPICS = "too_many_topics"
TOO_MANY_CONNECTIONS = "too_many_connections"
UNSUPPORTED_PROTOCOL = "unsupported_protocol"

MAX_IDS_PER_REQUEST = 100
MAX_REQUEST_ID_LENGTH = 64


def encode(frame: dict[str, Any]) -> str:
    """Encode a server frame as compact JSON text."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


@dataclass
class ProtocolError(Exception):
    code: str
    message: str
    request_id: Any = None
    fields: dict[str, str] = field(default_factory=dict)

    def frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.request_id is not None:
            frame["id"] = self.request_id
        if self.fields:
            frame["fields"] = self.fields
        return frame


def error_frame(code: str, message: str, request_id: Any = None, *, retry_after: float | None = None) -> dict[str, Any]:
    """An ``error`` frame; ``retry_after``: the seconds a client should wait before it reconnects
    (sent before a 4013 close: the server is overloaded or a dependency is down)."""
    frame = ProtocolError(code, message, request_id).frame()
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return frame


@dataclass(frozen=True)
class Request:
    """A validated client frame."""

    type: str
    id: Any = None
    topic: str | None = None
    ids: tuple[int, ...] = ()
    since: dict[str, int] = field(default_factory=dict)
    epoch: str | None = None


# Lone surrogates arrive as JSON escapes (\ud800): UTF-8 cannot encode them, so a frame
# echoing one could not be sent. Neither they nor NUL can be stored or compared by PostgreSQL.
_UNSAFE_CHARACTER = re.compile("[\x00\ud800-\udfff]")


def is_storable_text(value: Any) -> bool:
    """A string without NUL or lone surrogates."""
    return isinstance(value, str) and not _UNSAFE_CHARACTER.search(value)


def _request_id(frame: dict) -> Any:
    request_id = frame.get("id")
    if request_id is None:
        return None
    valid_int = isinstance(request_id, int) and not isinstance(request_id, bool) and abs(request_id) < 2**53
    valid_str = is_storable_text(request_id) and len(request_id) <= MAX_REQUEST_ID_LENGTH
    if not (valid_int or valid_str):
        raise ProtocolError(
            INVALID,
            f"'id' must be a string of at most {MAX_REQUEST_ID_LENGTH} characters or an integer.",
            fields={"id": "invalid"},
        )
    return request_id


def _topic(frame: dict, request_id: Any) -> str:
    topic = frame.get("topic")
    if not is_storable_text(topic) or not topic or len(topic) > 80:
        raise ProtocolError(INVALID, "'topic' must be a topic slug.", request_id, {"topic": "required slug"})
    return topic


def _ids(frame: dict, request_id: Any) -> tuple[int, ...]:
    ids: Any = frame.get("ids")
    valid = (
        isinstance(ids, list)
        and 0 < len(ids) <= MAX_IDS_PER_REQUEST
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in ids)
    )
    if not valid:
        raise ProtocolError(
            INVALID,
            f"'ids' must be a list of 1 to {MAX_IDS_PER_REQUEST} positive integer notification ids.",
            request_id,
            {"ids": "invalid"},
        )
    return tuple(dict.fromkeys(ids))


MAX_OFFSET = 2**63 - 1
# Streams one cursor may name: the user's own, the broadcast stream, and the topics followed.
MAX_CURSOR_STREAMS = 1000
CURSOR_HELP = ("'since' must be a cursor: the position in each stream, as {\"u.42\": 17, \"b\": 3} in a frame "
               "or 'u.42:17,b:3' in the URL (hello's 'cursor', then each notification's 'stream' and 'offset').")


def parse_cursor(value, request_id: Any = None) -> dict[str, int]:
    """A resume cursor: the offset of the last notification the client saw in each stream."""
    if isinstance(value, str):
        if len(value) > 40 * MAX_CURSOR_STREAMS:
            raise ProtocolError(INVALID, CURSOR_HELP, request_id, {"since": "too long"})
        pairs = [part.rpartition(":")[::2] for part in value.split(",") if part]
        if any(not key for key, _ in pairs) or len({key for key, _ in pairs}) != len(pairs):
            raise ProtocolError(INVALID, CURSOR_HELP, request_id, {"since": "invalid"})
        value = dict(pairs)
    if not isinstance(value, dict) or len(value) > MAX_CURSOR_STREAMS:
        hint = " An integer is a notifications.v1 cursor." if isinstance(value, int) else ""
        raise ProtocolError(INVALID, CURSOR_HELP + hint, request_id, {"since": "invalid"})
    cursor = {}
    for key, offset in value.items():
        number = offset
        if isinstance(offset, str) and offset.isascii() and offset.isdigit() and len(offset) < 20:  # not "²"
            number = int(offset)
        valid_key = isinstance(key, str) and key.isascii() and _stream_key(key)
        if not valid_key or not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= MAX_OFFSET:
            raise ProtocolError(INVALID, CURSOR_HELP, request_id, {"since": "invalid"})
        cursor[key] = number
    return cursor


def _stream_key(key: str) -> bool:
    return streams.parse(key) is not None


def _resume(frame: dict, request_id: Any) -> dict:
    epoch = frame.get("epoch")
    if epoch is not None and (not isinstance(epoch, str) or len(epoch) > 32):
        raise ProtocolError(INVALID, "'epoch' must be the epoch string from hello.", request_id,
                            {"epoch": "invalid"})
    return {"since": parse_cursor(frame.get("since"), request_id), "epoch": epoch}


_PARSERS: dict[str, Callable[[dict, Any], dict[str, Any]]] = {
    "ping": lambda frame, rid: {},
    "mark_all_read": lambda frame, rid: {},
    "subscribe": lambda frame, rid: {"topic": _topic(frame, rid)},
    "unsubscribe": lambda frame, rid: {"topic": _topic(frame, rid)},
    "mark_read": lambda frame, rid: {"ids": _ids(frame, rid)},
    "resume": _resume,
}
CLIENT_TYPES = tuple(_PARSERS)


def parse_client_frame(text: str) -> Request:
    """Validate a client text frame; raise ``ProtocolError`` with a stable code if it is wrong."""
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(BAD_JSON, "The frame is not valid JSON.") from None
    if not isinstance(frame, dict):
        raise ProtocolError(BAD_FRAME, "A frame must be a JSON object with a 'type'.")
    request_id = _request_id(frame)
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(BAD_FRAME, "A frame must have a string 'type'.", request_id, {"type": "required"})
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(
            UNKNOWN_TYPE, f"Unknown frame type. Known types: {', '.join(CLIENT_TYPES)}.", request_id
        )
    return Request(type=kind, id=request_id, **parser(frame, request_id))


def notification_frame(notification, *, is_read: bool = False) -> dict[str, Any]:
    """The ``notification`` frame; pushed, identical for every recipient of a topic or broadcast
    (``is_read`` is False), and replayed on resume with the user's read state. ``stream`` and
    ``offset`` are the notification's position: the client's cursor advances to it."""
    payload = notification_payload(notification, is_read=is_read)
    return {"type": "notification", **payload, "stream": streams.stream_of(notification),
            "offset": notification.offset}


def notification_payload(notification, *, is_read: bool) -> dict[str, Any]:
    """JSON-safe representation shared by frames and the REST API."""
    topic = notification.topic
    actor = notification.actor
    return {
        "id": notification.id,
        "audience": notification.audience,
        "title": notification.title,
        "body": notification.body,
        "level": notification.level,
        "data": notification.data,
        "link": notification.link or None,
        "topic": topic.slug if topic else None,
        "actor": actor.get_username() if actor else None,
        "created_at": notification.created_at.isoformat(),
        "read": is_read,
    }
