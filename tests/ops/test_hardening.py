"""What a production server (``bin/serve``, ``DEBUG=0``) does with hostile or odd requests: request
bodies refused at the limit, while the client is still sending; WebSocket handshakes to unknown
paths refused with a 404, not a 500; the Swagger UI and every page's static files served from this
site, with the Content-Security-Policy. In-process tests of the same code: tests/test_http.py,
tests/test_routing.py."""

import json
import re
import socket
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from notifications.http import CONTENT_SECURITY_POLICY
from tests.server import server_trouble

pytestmark = [pytest.mark.server, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

API_LIMIT = 256 * 1024  # NOTIFICATIONS["API_MAX_BODY_BYTES"]'s default
ANSWER_WITHIN = 2.0  # seconds: "at once", on loopback


def open_socket(server) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=ANSWER_WITHIN)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of the one response on ``sock``, read until the server closes
    it; fails if that takes more than ANSWER_WITHIN seconds."""
    data = b""
    deadline = time.monotonic() + ANSWER_WITHIN
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no complete answer within {ANSWER_WITHIN} s, got {data[:300]!r}") from None
        if not chunk:
            break  # the server closed the connection
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def request_head(path: str, *headers: str) -> bytes:
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
                        *headers, "", ""]).encode()


TOO_LARGE = {"error": {"code": "body_too_large", "message": f"Request bodies are limited to {API_LIMIT} bytes."}}


def test_a_huge_declared_body_is_refused_413_before_the_client_sends_it(serve):
    server = serve("declared")
    with open_socket(server) as sock:
        sock.sendall(request_head("/api/notifications/", "Content-Length: 400000000") + b'{"title": "')
        status, headers, body = read_response(sock)  # having sent 11 of the 400 million bytes
    assert (status, headers["content-type"], headers["connection"]) == (413, "application/json", "close")
    assert json.loads(body) == TOO_LARGE


def test_a_chunked_body_over_the_limit_is_refused_413_while_the_client_is_still_sending(serve):
    server = serve("chunked")
    chunk = b"x" * 16384
    with open_socket(server) as sock:
        sock.sendall(request_head("/api/notifications/", "Transfer-Encoding: chunked"))
        for _ in range(API_LIMIT // len(chunk) + 1):  # just past the limit; the body goes on (no last chunk)
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, headers, body = read_response(sock)
    assert (status, headers["content-type"], headers["connection"]) == (413, "application/json", "close")
    assert json.loads(body) == TOO_LARGE


def test_a_body_within_the_limit_still_reaches_the_api(serve, staff_token, alice):
    server = serve("within")
    payload = json.dumps({"title": "Chunked", "users": ["alice"]}).encode()
    with open_socket(server) as sock:
        sock.sendall(request_head("/api/notifications/", f"Authorization: Bearer {staff_token}",
                                  "Transfer-Encoding: chunked", "Connection: close"))
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
        status, _, body = read_response(sock)
    assert status == 201, body
    assert json.loads(body)["notifications"][0]["title"] == "Chunked"


@pytest.mark.parametrize("path", ["/ws/notifications", "/ws/nope/"])
def test_a_websocket_handshake_to_an_unknown_path_gets_404_json_and_logs_no_error(serve, path):
    server = serve("ws-path")
    with pytest.raises(InvalidStatus) as refused:
        connect(server.ws_url(path), open_timeout=ANSWER_WITHIN).close()
    response = refused.value.response
    assert (response.status_code, response.headers["Content-Type"]) == (404, "application/json")
    assert json.loads(response.body) == {"error": {
        "code": "not_found", "message": "No WebSocket endpoint at this path; connect to /ws/notifications/."}}
    time.sleep(0.2)
    log = server.log()
    assert f'"WebSocket {path}" 404' in log, log
    assert server_trouble(log) == [], log


def test_the_pages_and_their_static_files_are_served_with_debug_off_under_the_policy(serve, superuser_session):
    """Swagger UI from this site (no CDN), the admin's and the notification page's files too."""
    server = serve("static")
    cookie = {"Cookie": f"sessionid={superuser_session['sessionid']}"}
    assert server.env["DEBUG"] == "0"
    files = set()
    for path in ("/api/docs", "/", "/admin/", "/accounts/login/"):
        page = server.request("GET", path, headers=cookie if path != "/accounts/login/" else {})
        assert page.status == 200, (path, page.text[:300])
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, path
        urls = re.findall(r"""<(?:script|link)\b[^>]*\b(?:src|href)=["']([^"']+)["']""", page.text)
        assert urls and all(url.startswith("/static/") for url in urls), (path, urls)
        files.update(urls)
    assert {"/static/ninja/swagger-ui-bundle.js", "/static/ninja/swagger-ui-init.js",
            "/static/notifications/client.js", "/static/admin/css/base.css"} <= files
    for url in sorted(files):
        static = server.request("GET", url)
        assert static.status == 200, url
        assert static.text, url
    assert server.request("GET", "/static/no-such-file.js").status == 404
