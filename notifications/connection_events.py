"""One call per WebSocket connection event: a structured log line and the metrics.

Logger ``notifications.connections``, at INFO, one line each:

- ``websocket connect``: the handshake succeeded (``hello`` sent);
- ``websocket refused``: the handshake was refused (an ``error`` frame, then a 4xxx close);
- ``websocket disconnect``: an open connection ended, with its close code and duration;
- ``websocket error``: an ``error`` frame was sent on an open connection.

Each carries ``event``, ``user_id``, ``connection_id``, ``client_ip`` and, where it applies,
``close_code``, ``code`` (the error code), ``auth`` (bearer, ticket or session) and
``duration_s`` as ``extra`` fields (keys of the JSON format) and as ``key=value`` in the
message. Credentials are never among them (and the formatters redact them anyway).
"""

import logging
import time

from . import metrics
from .proxies import scope_client_ip

logger = logging.getLogger("notifications.connections")


def _fields(consumer, event: str, **more) -> dict:
    user = getattr(consumer, "user", None)
    return {
        "event": event,
        "user_id": getattr(user, "pk", None),
        "connection_id": consumer.connection_id,
        "client_ip": scope_client_ip(consumer.scope),
        **more,
    }


def _log(fields: dict) -> None:
    text = " ".join(f"{key}={value}" for key, value in fields.items() if key != "event")
    logger.info("websocket %s %s", fields["event"], text, extra=fields)


def connected(consumer) -> None:
    consumer._opened_at = time.monotonic()
    metrics.connection_opened()
    _log(_fields(consumer, "connect", auth=consumer.scope.get("auth_method")))


def refused(consumer, code: str, close_code: int) -> None:
    metrics.connection_refused()
    _log(_fields(consumer, "refused", code=code, close_code=close_code))


def disconnected(consumer, close_code) -> None:
    was_open = getattr(consumer, "outbox", None) is not None
    metrics.connection_closed(close_code, was_open=was_open)
    if was_open:  # a refused handshake already has its line
        opened = getattr(consumer, "_opened_at", None)
        duration = round(time.monotonic() - opened, 3) if opened is not None else None
        _log(_fields(consumer, "disconnect", close_code=close_code, duration_s=duration))


def frame_out(consumer, frame: dict) -> None:
    metrics.frame_out(frame)
    if frame.get("type") == "error" and getattr(consumer, "user", None) is not None:
        _log(_fields(consumer, "error", code=frame.get("code")))
