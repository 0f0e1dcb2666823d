"""The page says why the server refused or closed its socket: the error frame's message and code
and the close code, under the status (page.js). Fixtures are in ``tests/browser/conftest.py``."""

import contextlib
import re
import socket
import threading
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import CLIENT_OPTIONS
from tests.server import HOST
from tests.support import PASSWORD, session_cookie

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.django_db(transaction=True)]

# Before any script of the page: the URL of every socket the page opens.
COUNT_SOCKETS = """
window.socketUrls = [];
window.WebSocket = class extends window.WebSocket {
  constructor(url, protocols) { window.socketUrls.push(String(url)); super(url, protocols); }
};
"""
RECONNECTING = re.compile(r"^Reconnecting( in \d+(\.\d)? s|…)$")


def status_text(page: Page):
    return page.locator("#connection-status .status-text")


def reason(page: Page):
    return page.locator("#connection-reason")


def sockets_opened(page: Page) -> int:
    return page.evaluate("() => window.socketUrls.length")


class HostRewritingProxy:
    """A reverse proxy in front of the site that passes ``Host`` on without its port, as nginx's
    ``proxy_set_header Host $host`` does (``forward_host = True``: unchanged, as ``$http_host``).
    Pages load through it (the host is in ALLOWED_HOSTS); the socket's Origin no longer equals
    the Host its server sees."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.forward_host = False
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener was closed
            while True:
                client, _ = self.listener.accept()
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection((HOST, self.upstream_port)) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:  # the first request's head: the only one rewritten
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            if not self.forward_host:
                head = head.replace(f"\r\nHost: {HOST}:{self.port}\r\n".encode(), f"\r\nHost: {HOST}\r\n".encode(), 1)
            upstream.sendall(head)
            back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
            back.start()
            self._pipe(client, upstream)
            back.join(10)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                target.sendall(chunk)
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(live) -> Iterator[HostRewritingProxy]:
    server = HostRewritingProxy(live.port)
    yield server
    server.close()


def test_a_refused_origin_shows_the_servers_reason_and_what_to_set_and_stays(browser, proxy, alice):
    """The page loads through a proxy that drops the port from Host: the socket gets
    ``origin_not_allowed`` and close 4003, after which client.js does not retry."""
    context = browser.new_context(base_url=proxy.url)
    context.set_default_timeout(5_000)
    context.add_init_script(CLIENT_OPTIONS)
    context.add_init_script(COUNT_SOCKETS)
    context.add_cookies([{"name": "sessionid", "value": session_cookie(alice), "url": proxy.url}])
    try:
        page = context.new_page()
        page.goto("/")
        expect(page.locator("#connection-status")).to_have_attribute("data-status", "offline")
        expect(status_text(page)).to_have_text("Offline: not allowed")
        expect(reason(page)).to_be_visible()
        expect(reason(page)).to_have_text(
            "Refused by the server: Cookie authentication needs an allowed Origin (origin_not_allowed, close 4003). "
            f'Add "{HOST}" to ALLOWED_HOSTS, or "{proxy.url}" to NOTIFICATIONS["WS_ALLOWED_ORIGINS"]; behind a '
            "proxy, pass the Host header on with its port (nginx: proxy_set_header Host $http_host). "
            "See docs/install.md."
        )
        # No reconnect after 4003: the reason stays (this test's maxDelay is 1 s).
        page.wait_for_timeout(1_500)
        expect(status_text(page)).to_have_text("Offline: not allowed")
        expect(reason(page)).to_contain_text("(origin_not_allowed, close 4003)")
        assert sockets_opened(page) == 1

        # Doing what it says works: the proxy passes the Host header on with its port.
        proxy.forward_host = True
        page.reload()
        expect(page.locator("#connection-status")).to_have_attribute("data-status", "connected")
        expect(reason(page)).to_be_hidden()
        expect(reason(page)).to_have_text("")
    finally:
        context.close()


def test_a_close_without_retry_after_the_socket_was_open_shows_the_servers_message(
    open_page, alice, django_user_model
):
    """An administrator disconnects the user (error frame ``disconnected``, close 4003)."""
    root = django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)
    page = open_page(alice, goto=False)
    page.add_init_script(COUNT_SOCKETS)
    page.goto("/")
    expect(page.locator("#connection-status")).to_have_attribute("data-status", "connected")
    expect(reason(page)).to_be_hidden()

    admin = open_page(root, "/admin/auth/user/")
    admin.locator(f"input[name='_selected_action'][value='{alice.pk}']").check()
    admin.locator("select[name='action']").select_option("disconnect")
    admin.get_by_role("button", name="Go").click()
    expect(admin.locator(".messagelist")).to_contain_text("Disconnected every live connection of 1 user(s).")

    expect(page.locator("#connection-status")).to_have_attribute("data-status", "offline")
    expect(status_text(page)).to_have_text("Offline: not allowed")
    expect(reason(page)).to_have_text(
        "Closed by the server: disconnected by an administrator (disconnected, close 4003)."
    )
    page.wait_for_timeout(1_500)
    expect(reason(page)).to_have_text(
        "Closed by the server: disconnected by an administrator (disconnected, close 4003)."
    )
    assert sockets_opened(page) == 1


def test_a_busy_server_shows_reconnecting_in_its_retry_after_with_the_reason_then_connects(open_page, alice):
    """The first handshake gets ``overloaded`` with ``retry_after`` and close 4013 (Playwright answers it
    in the server's place); the next one reaches the server."""
    page = open_page(alice, goto=False)
    attempts = []

    def handshake(ws):
        attempts.append(ws.url)
        if len(attempts) > 1:
            ws.connect_to_server()
            return
        ws.send('{"type": "error", "code": "overloaded", "message": "The server is busy; try again later.", '
                '"retry_after": 2.5}')
        ws.close(code=4013, reason="overloaded")

    page.route_web_socket(re.compile(r"/ws/notifications/"), handshake)
    page.goto("/")
    expect(page.locator("#connection-status")).to_have_attribute("data-status", "reconnecting")
    expect(status_text(page)).to_have_text("Reconnecting in 2.5 s")  # the test's backoff is shorter: retry_after wins
    expect(reason(page)).to_have_text(
        "Refused by the server: The server is busy; try again later (overloaded, close 4013)."
    )
    expect(page.locator("#connection-status")).to_have_attribute("data-status", "connected", timeout=6_000)
    expect(reason(page)).to_be_hidden()
    assert len(attempts) == 2
