"""The uvicorn protocols ``bin/serve`` runs: uvicorn's own httptools HTTP protocol and
websockets-sansio WebSocket protocol, with the limits a server exposed without a proxy needs.

    uvicorn ... --http notifications.serving:HttpProtocol --ws notifications.serving:WebSocketProtocol

HTTP (``HttpProtocol``, a ``HttpToolsProtocol``):

- the request line and headers of one request may take ``SERVE_MAX_HEADER_BYTES`` (16 KiB);
  more gets ``431`` and the connection is closed (httptools itself has no limit, and uvicorn's
  ``--h11-max-incomplete-event-size`` applies to h11 only). Counted as the bytes arrive, so a
  header that never ends costs at most the limit plus one read (256 KB with uvloop).
- a connection must complete its request headers within ``SERVE_HEADER_TIMEOUT`` (10 s) of
  connecting, or of its previous response (or uvicorn's ``--timeout-keep-alive`` if that is
  longer); otherwise it is closed, and aborted if still there one more timeout later (its peer
  does not read). uvicorn's ``--timeout-keep-alive`` is armed only after a response and
  cancelled by the first byte received, so it covers neither the first request nor a keep-alive
  connection that trickles bytes.

WebSocket (``WebSocketProtocol``, a ``WebSocketsSansIOProtocol``), through a wrapper of the
transport that uvicorn's code uses unchanged:

- reading is paused while the transport's write buffer is over its high-water mark, as well as
  while the application has not taken the last message (uvicorn's own ``read_paused``); reading
  resumes only when both allow it. So a peer that sends pings and never reads the pongs stops
  being read instead of growing the buffer.
- more than ``SERVE_WS_MAX_UNSENT_BYTES`` (4 MiB) waiting in the write buffer aborts the
  connection. The application's sends wait while the buffer is over its high-water mark (64 KiB),
  so this is a last bound, far above what a connection queues: a slow consumer is closed by the
  application itself (4008) when its outbox fills.
- once a close frame has been sent (by the application, a keepalive timeout, a protocol error,
  the peer's close or the shutdown's 1012) or the transport has been asked to close, the
  connection is aborted if it is not gone within ``SERVE_WS_CLOSE_TIMEOUT`` (5 s): ``close()``
  alone waits for a write buffer that a peer which never reads never drains. uvicorn's own wait
  for the peer's close frame (10 s there) uses the same value.

The settings are read from the environment when this module is imported (each worker, before
it loads the application); a value that is not a positive number stops the server at start.
See docs/deployment.md, "Limits of the server itself".
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from array import array
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState


def _setting(name: str, default: float, *, whole: bool = False) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = 0
    if not (value > 0 and math.isfinite(value)):
        kind = "a positive whole number" if whole else "a positive number"
        raise ValueError(f"{name} must be {kind}, not {raw!r}")
    return value


MAX_HEADER_BYTES = int(_setting("SERVE_MAX_HEADER_BYTES", 16 * 1024, whole=True))
HEADER_TIMEOUT = _setting("SERVE_HEADER_TIMEOUT", 10.0)
WS_MAX_UNSENT_BYTES = int(_setting("SERVE_WS_MAX_UNSENT_BYTES", 4 * 1024 * 1024, whole=True))
WS_CLOSE_TIMEOUT = _setting("SERVE_WS_CLOSE_TIMEOUT", 5.0)


# HTTP


class _HeadTooLarge(Exception):
    """Raised in a parser callback: the request line and headers are over the limit."""


class _RequestParser(httptools.HttpRequestParser):
    """httptools' parser, except that ``_HeadTooLarge`` raised in a callback comes out as itself
    rather than as the ``HttpParserCallbackError`` uvicorn answers with 400."""

    def feed_data(self, data: bytes | bytearray | memoryview | array[int]) -> None:
        try:
            super().feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                raise exc.__context__ from None
            raise


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size limit and a time limit on request headers."""

    max_header_bytes = MAX_HEADER_BYTES
    header_timeout = HEADER_TIMEOUT

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.parser = _RequestParser(self)
        with contextlib.suppress(AttributeError):  # as uvicorn: httptools < 0.6.3 has no leniencies
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        # Waiting for (or reading) a request line and headers: from the connection until its
        # first request's headers are complete, and again from each later request's first byte.
        self.head_pending = True
        self.head_bytes = 0  # of the pending head, received in earlier reads
        self.head_began_in_read = False  # the pending head began inside the current read
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.head_began_in_read = False
        try:
            super().data_received(data)
        except _HeadTooLarge:
            self._refuse_head()
            return
        if self.head_pending and not self.transport.is_closing():
            if self.head_began_in_read:  # after the end of the previous request: count what was parsed
                self.head_bytes = self._parsed_head_bytes()
            else:
                self.head_bytes += len(data)
            if self.head_bytes > self.max_header_bytes:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self.head_pending:
            self.head_pending, self.head_bytes, self.head_began_in_read = True, 0, True

    def on_headers_complete(self) -> None:
        if max(self.head_bytes, self._parsed_head_bytes()) > self.max_header_bytes:
            raise _HeadTooLarge
        self.head_pending = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:
            # uvicorn armed its keep-alive timer: nothing is pipelined, the next request's headers
            # have their time from now (not less than the idle time uvicorn is configured to allow).
            self._arm_header_timer(max(self.header_timeout, self.timeout_keep_alive))
        elif self.transport.is_closing():  # Connection: close: the peer has that time to read the rest
            self._arm_header_timer()

    def _parsed_head_bytes(self) -> int:
        """The request target and the complete header fields parsed so far (about the bytes of
        the request line and headers: a header still arriving is counted by ``data_received``)."""
        if self.headers is None:
            return 0
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _refuse_head(self) -> None:
        self._cancel_header_timer()
        self.logger.warning("%s - Request line and headers over %d bytes: 431, connection closed.",
                            "{}:{}".format(*self.client) if self.client else "-", self.max_header_bytes)
        body = b"Request line and headers too large."
        content = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"content-type: text/plain; charset=utf-8\r\n",
                        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n\r\n", body])
        self.transport.write(b"".join(content))
        self.transport.close()
        self._arm_header_timer()  # aborts if the peer does not take the response

    def _arm_header_timer(self, delay: float | None = None) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(delay or self.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():  # closed, but what it still had to send is not read
            self.transport.abort()
            return
        self.transport.close()
        self._arm_header_timer()


# WebSocket


class _Transport(asyncio.Transport):
    """The transport as ``WebSocketProtocol`` (uvicorn's code) sees it: the real transport, with
    reading paused while the application's backpressure or a full write buffer asks, and each
    write and close reported to the protocol."""

    def __init__(self, transport: asyncio.Transport, protocol: WebSocketProtocol) -> None:
        super().__init__()
        self.transport = transport
        self.protocol = protocol
        self.app_paused = False  # uvicorn's read_paused: a message waits for the application
        self.write_paused = False  # the write buffer is over its high-water mark
        self.reading = transport.is_reading()
        self.aborted = False

    def _update_reading(self) -> None:
        reading = not (self.app_paused or self.write_paused)
        if reading != self.reading:
            self.reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def hold_reading(self, held: bool) -> None:
        """Pause (or allow again) reading because of the write buffer."""
        self.write_paused = held
        self._update_reading()

    def pause_reading(self) -> None:
        self.app_paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        self.app_paused = False
        self._update_reading()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.aborted:
            return
        self.transport.write(data)
        self.protocol.wrote(self.transport.get_write_buffer_size())

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        self.transport.close()
        self.protocol.start_close_deadline()

    def abort(self) -> None:
        self.aborted = True
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()

    def write_eof(self) -> None:
        self.transport.write_eof()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with reading paused while writing is, a bound on
    unsent bytes, and a bounded close."""

    max_unsent_bytes = WS_MAX_UNSENT_BYTES
    close_deadline = WS_CLOSE_TIMEOUT

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.close_timeout = self.close_deadline  # uvicorn's wait for the peer's close frame
        self.abort_timer: asyncio.TimerHandle | None = None
        self.guarded: _Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.guarded = _Transport(self.transport, self)
        self.transport = self.guarded

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.abort_timer is not None:
            self.abort_timer.cancel()
            self.abort_timer = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.guarded is not None:
            self.guarded.hold_reading(True)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.guarded is not None:
            self.guarded.hold_reading(False)

    def wrote(self, unsent: int) -> None:
        """After each write: ``unsent`` bytes wait in the transport's buffer."""
        if unsent > self.max_unsent_bytes:
            self.logger.warning("%s - WebSocket aborted: over %d bytes unsent (the client does not read)",
                                "{}:{}".format(*self.client) if self.client else "-", self.max_unsent_bytes)
            if self.guarded is not None:
                self.guarded.abort()
        elif self.conn.close_sent is not None:
            self.start_close_deadline()

    def start_close_deadline(self) -> None:
        """A close frame was sent or the transport asked to close: the connection has
        ``close_deadline`` seconds to be gone."""
        if self.abort_timer is None and not self.disconnected:
            self.abort_timer = self.loop.call_later(self.close_deadline, self._close_deadline_passed)

    def _close_deadline_passed(self) -> None:
        self.abort_timer = None
        if not self.disconnected and self.guarded is not None:
            self.guarded.abort()
