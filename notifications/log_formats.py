"""Log formats (plain text or one JSON object per line) and secret redaction.

Both formatters redact secrets from the whole formatted line, traceback included: API
tokens (``ntf_…``), WebSocket tickets (``tkt_…``), ``Authorization`` values, and the
values of ``token``/``ticket``/``sessionid``/``csrftoken``/``password``-like parameters
and cookies, and the token of a password-reset link (``/accounts/reset/<uid>/<token>/``).
uvicorn logs every handshake and request with its query string (``?ticket=…``);
settings route its loggers through these formatters.

Connection events carry their fields as ``extra`` (``event``, ``user_id``,
``connection_id``, ``client_ip``, ``close_code``, ...): the JSON formatter writes each
as a key, the plain formatter writes the message, which repeats them as ``key=value``.
"""

import json
import logging
import re
import traceback
from datetime import UTC, datetime

REDACTED = "[redacted]"
_SECRET_PATTERNS = [
    # An Authorization value: the scheme stays, the credentials go.
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{12,}"), rf"\g<1> {REDACTED}"),
    (re.compile(r"\b(ntf_[0-9a-f]{12}_)[A-Za-z0-9_\-]+"), rf"\g<1>{REDACTED}"),  # a token's prefix is not secret
    (re.compile(r"\btkt_[A-Za-z0-9_\-]+"), f"tkt_{REDACTED}"),
    # name=value, name: value, "name": "value" (query strings, cookies, headers, JSON).
    (
        re.compile(
            r"(?i)\b(ticket|token|access_token|api_key|apikey|bearer|authorization|sessionid|csrftoken"
            r"|csrfmiddlewaretoken|password|secret)([\"']?\s*[=:]\s*[\"']?)"
            r"(?!\[redacted\]|(?:bearer|basic)\s)[^\s&;,\"'\\]+"
        ),
        rf"\g<1>\g<2>{REDACTED}",
    ),
    # A password-reset link, /accounts/reset/<uidb64>/<token>/: the token goes. Django's next
    # step, /accounts/reset/<uidb64>/set-password/, holds none and stays readable.
    (re.compile(r"(/reset/[A-Za-z0-9_\-]+/)(?!set-password\b|\[redacted\])[^/\s?#\"'\\]+"), rf"\g<1>{REDACTED}"),
]


def redact(text: str) -> str:
    """``text`` with every token, ticket, cookie and password value replaced by ``[redacted]``."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class PlainFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s %(message)s``, redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, every ``extra``
    field, and ``exception`` (the traceback) when there is one; redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(record.stack_info)
        # Redacted field by field (before encoding: a replacement must not eat a JSON escape), then
        # once more as a whole, for secrets inside other values (lists, dicts).
        return redact(json.dumps(entry, default=str, ensure_ascii=False))
