"""A real SMTP server for tests and benchmarks: aiosmtpd on a free loopback port, in a thread.

    server = SmtpServer().start()      # .port, .email_url, .django_settings()
    ...                                # Django's SMTP backend sends to it
    server.handler.messages            # what it accepted (DATA answered 250), in order
    server.stop()

The handler records only accepted messages, each with the number of its SMTP session (one per
connection that said EHLO or HELO: ``handler.sessions``). It can hold the reply to the Nth
message's DATA until released (``stall_at``, ``stalled``, ``release``), so a test can kill the
sender meanwhile (its message is then never accepted), and refuse messages with a 4xx reply
(``refuse``). No pytest here: test modules wrap it in a fixture.
"""

import asyncio
import email
import email.policy
import logging
import threading
from dataclasses import dataclass
from email.message import EmailMessage

from aiosmtpd.controller import Controller

from tests.server import HOST, free_port


@dataclass
class Received:
    """One accepted message."""

    session: int
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def to(self) -> str:
        return str(self.message["To"])


class RecordingHandler:
    """aiosmtpd handler: records accepted messages; can stall on one message or refuse them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Received] = []
        self.sessions = 0
        self.attempts = 0  # DATA commands seen, accepted or not
        self.delay = 0.0  # seconds before each DATA reply (a slower server)
        self.stall_at: int | None = None  # hold the reply to this DATA (1-based) until release()
        self.stalled = threading.Event()  # set when that DATA arrives
        self._released = threading.Event()
        self._accept_stalled = True
        self._refusal: str | None = None
        self._refusals_left: int | None = None

    # Controls (from the test's thread)

    def stall(self, nth: int) -> None:
        """Hold the reply to the ``nth`` message's DATA (counted from now on) until ``release``."""
        with self.lock:
            self.stall_at = self.attempts + nth
        self.stalled.clear()
        self._released.clear()

    def release(self, *, accept: bool = True) -> None:
        """Answer the stalled DATA: 250 if ``accept`` and the client is still there, else 451."""
        self._accept_stalled = accept
        self._released.set()

    def refuse(self, reply: str = "451 4.3.0 Try again later", count: int | None = None) -> None:
        """Answer the next ``count`` messages' DATA (None: every one until ``accept``) with ``reply``."""
        with self.lock:
            self._refusal, self._refusals_left = reply, count

    def accept(self) -> None:
        with self.lock:
            self._refusal = self._refusals_left = None

    def recipients(self) -> list[str]:
        """Every accepted envelope recipient, in order (one per copy received)."""
        with self.lock:
            return [address for received in self.messages for address in received.rcpt_tos]

    # aiosmtpd hooks (in the server's thread)

    def _new_session(self, session) -> None:
        with self.lock:
            if getattr(session, "number", None) is None:
                self.sessions += 1
                session.number = self.sessions

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self._new_session(session)
        return responses

    async def handle_HELO(self, server, session, envelope, hostname):
        session.host_name = hostname
        self._new_session(session)
        return f"250 {server.hostname}"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.attempts += 1
            number = self.attempts
            refusal = self._refusal
            if refusal is not None and self._refusals_left is not None:
                self._refusals_left -= 1
                if self._refusals_left <= 0:
                    self._refusal = self._refusals_left = None
        if self.delay:
            await asyncio.sleep(self.delay)
        if refusal is not None:
            return refusal
        if number == self.stall_at:
            self.stalled.set()
            while not self._released.is_set():  # a client that goes away cancels this coroutine
                await asyncio.sleep(0.02)
            if not self._accept_stalled or server.transport is None or server.transport.is_closing():
                return "451 4.3.0 Not accepted"
        message = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.append(Received(getattr(session, "number", 0), envelope.mail_from,
                                          list(envelope.rcpt_tos), message))  # type: ignore[arg-type]
        return "250 2.0.0 OK"


class SmtpServer:
    """aiosmtpd's ``Controller`` with a ``RecordingHandler`` on a free loopback port."""

    def __init__(self, handler: RecordingHandler | None = None, host: str = HOST):
        self.handler = handler or RecordingHandler()
        self.host = host
        self.port = free_port(host)
        self.controller = Controller(self.handler, hostname=host, port=self.port)

    def start(self) -> "SmtpServer":
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command at INFO
        self.controller.start()
        return self

    def stop(self) -> None:
        self.handler.release(accept=False)  # a stalled DATA must not hold the loop's shutdown
        self.controller.stop()

    @property
    def email_url(self) -> str:
        """``EMAIL_URL`` for a process of this project (project/settings.py)."""
        return f"smtp://{self.host}:{self.port}"

    def django_settings(self) -> dict:
        """Django settings that point the SMTP backend at this server."""
        return {"EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend", "EMAIL_HOST": self.host,
                "EMAIL_PORT": self.port, "EMAIL_HOST_USER": "", "EMAIL_HOST_PASSWORD": "", "EMAIL_USE_TLS": False,
                "EMAIL_USE_SSL": False, "EMAIL_TIMEOUT": 10}
