"""``notifications.http``: request bodies refused before they are read (ASGI middleware, with a
fake client that counts the bytes read), the Content-Security-Policy of the HTML pages, and the
Swagger UI page on local static files only. The same against a real server: tests/ops/test_hardening.py."""

import json
import re

import pytest
from django.http import HttpResponse
from django.test import RequestFactory

from notifications.http import CONTENT_SECURITY_POLICY, BodyLimitMiddleware, ContentSecurityPolicyMiddleware
from tests.support import PASSWORD

LIMIT = 1000
SEND = "/api/notifications/"


@pytest.fixture
def api_limit(settings) -> int:
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "API_MAX_BODY_BYTES": LIMIT}
    return LIMIT


class Client:
    """The ASGI ``receive`` of a client that sends ``chunks`` messages of ``chunk_size`` bytes (the
    last without ``more_body``; ``None``: never ends); counts what the application read."""

    def __init__(self, chunk_size: int = 100, chunks: int | None = None):
        self.chunk = b"x" * chunk_size
        self.chunks = chunks
        self.messages_read = 0
        self.bytes_read = 0

    async def receive(self) -> dict:
        if self.chunks is not None and self.messages_read >= self.chunks:
            return {"type": "http.disconnect"}
        self.messages_read += 1
        self.bytes_read += len(self.chunk)
        more = self.chunks is None or self.messages_read < self.chunks
        return {"type": "http.request", "body": self.chunk, "more_body": more}


class Django:
    """Stands for the Django application: reads the whole body, answers 200."""

    def __init__(self):
        self.called = False
        self.body = b""

    async def __call__(self, scope, receive, send) -> None:
        self.called = True
        while True:
            message = await receive()
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(client: Client, *, path: str = SEND, headers: list[tuple[bytes, bytes]] = (),
               app: Django | None = None) -> dict:
    """POST through ``BodyLimitMiddleware``: the status, headers and body it answered."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"host", b"testserver"), *headers]}
    await BodyLimitMiddleware(app or Django())(scope, client.receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    return {"status": sent[0]["status"], "headers": dict(sent[0]["headers"]), "body": sent[1]["body"]}


def error(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def assert_refused(response: dict, status: int, code: str, message: str) -> None:
    """The whole answer: the API's JSON error, and the connection closed after it."""
    assert response["status"] == status
    assert response["headers"][b"content-type"] == b"application/json"
    assert response["headers"][b"connection"] == b"close"
    assert int(response["headers"][b"content-length"]) == len(response["body"])
    assert json.loads(response["body"]) == error(code, message)


# Body limits


async def test_a_chunked_body_over_the_limit_is_read_only_just_past_the_limit_then_refused_413(api_limit):
    client, django = Client(chunk_size=100), Django()  # sends forever
    response = await call(client, headers=[(b"transfer-encoding", b"chunked")], app=django)
    assert_refused(response, 413, "body_too_large", "Request bodies are limited to 1000 bytes.")
    assert (client.messages_read, client.bytes_read) == (11, 1100)  # the first message past 1000 bytes
    assert not django.called


async def test_a_declared_length_over_the_limit_is_refused_413_before_any_byte_is_read(api_limit):
    client, django = Client(), Django()
    response = await call(client, headers=[(b"content-length", b"400000000")], app=django)
    assert_refused(response, 413, "body_too_large", "Request bodies are limited to 1000 bytes.")
    assert client.bytes_read == 0
    assert not django.called


@pytest.mark.parametrize("lengths", [[b"12abc"], [b"-1"], [b""], [b"10", b"20"], [b"1e3"]])
async def test_a_malformed_content_length_is_400_json(api_limit, lengths):
    client, django = Client(), Django()
    response = await call(client, headers=[(b"content-length", value) for value in lengths], app=django)
    assert_refused(response, 400, "bad_request", "Content-Length is not a number.")
    assert (client.bytes_read, django.called) == (0, False)


@pytest.mark.parametrize("headers", [[(b"transfer-encoding", b"chunked")], [(b"content-length", b"1000")]])
async def test_a_body_at_the_limit_reaches_django_whole(api_limit, headers):
    client, django = Client(chunk_size=100, chunks=10), Django()
    response = await call(client, headers=headers, app=django)
    assert (response["status"], response["body"]) == (200, b"ok")
    assert django.body == b"x" * 1000


async def test_a_client_that_leaves_during_the_body_gets_no_answer_and_django_no_call(api_limit):
    client, django = Client(chunk_size=100, chunks=3), Django()
    sent = []

    async def receive():
        message = await client.receive()
        if message.get("more_body") is False:
            return {"type": "http.disconnect"}  # gone before the last chunk
        return message

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": SEND, "headers": [(b"transfer-encoding", b"chunked")]}
    await BodyLimitMiddleware(django)(scope, receive, send)
    assert (sent, django.called) == ([], False)


async def test_other_paths_have_djangos_data_upload_limit(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 500
    refused = await call(Client(), path="/accounts/login/", headers=[(b"content-length", b"501")])
    assert_refused(refused, 413, "body_too_large", "Request bodies are limited to 500 bytes.")
    chunked = Client(chunk_size=100)
    refused = await call(chunked, path="/admin/login/", headers=[(b"transfer-encoding", b"chunked")])
    assert (refused["status"], chunked.bytes_read) == (413, 600)
    accepted = await call(Client(chunk_size=500, chunks=1), path="/accounts/login/",
                          headers=[(b"content-length", b"500")])
    assert accepted["status"] == 200


async def test_no_data_upload_limit_means_none_outside_the_api(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = None
    django = Django()
    response = await call(Client(chunk_size=100, chunks=100), path="/admin/login/",
                          headers=[(b"content-length", b"10000")], app=django)
    assert (response["status"], len(django.body)) == (200, 10_000)


def test_the_asgi_application_has_the_body_limit():
    from project.asgi import application

    assert isinstance(application.app.application_mapping["http"], BodyLimitMiddleware)


# Content-Security-Policy


def test_the_policy_allows_only_this_origin_for_scripts_frames_forms_and_plugins():
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives == {
        "default-src": "'self'",
        "script-src": "'self'",
        "style-src": "'self'",
        "img-src": "'self' data:",
        "connect-src": "'self'",
        "object-src": "'none'",
        "base-uri": "'self'",
        "frame-ancestors": "'none'",
        "form-action": "'self'",
    }


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "signed_in"), [
    ("/", True), ("/admin/", True), ("/admin/notifications/notification/send/", True), ("/api/docs", False),
    ("/accounts/login/", False), ("/admin/login/", False),
])
def test_html_pages_have_the_content_security_policy(client, django_user_model, path, signed_in):
    if signed_in:
        client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD))
    response = client.get(path)
    assert response.status_code == 200, path
    assert response["Content-Type"].startswith("text/html")
    assert response["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/healthz", "/api/openapi.json", "/static/notifications/client.js"])
def test_other_responses_have_no_policy(client, path):
    response = client.get(path)
    assert response.status_code == 200, path
    assert "Content-Security-Policy" not in response


def test_a_policy_of_the_views_own_is_kept():
    own = HttpResponse("<p>hi", headers={"Content-Security-Policy": "default-src 'none'"})
    response = ContentSecurityPolicyMiddleware(lambda request: own)(RequestFactory().get("/"))
    assert response["Content-Security-Policy"] == "default-src 'none'"


# /api/docs: Swagger UI from this site's static files


def page_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


@pytest.mark.django_db
def test_api_docs_page_loads_only_local_static_files_and_they_are_served(client):
    response = client.get("/api/docs")
    assert response.status_code == 200
    html = response.content.decode()
    urls = page_urls(html)
    assert sorted(urls) == [
        "/static/ninja/favicon.png", "/static/ninja/favicon.svg", "/static/ninja/swagger-ui-bundle.js",
        "/static/ninja/swagger-ui-init.js", "/static/ninja/swagger-ui.css",
    ]
    assert not re.search(r"https?:|//[a-z]", html)  # no other host
    assert re.findall(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)[^>]*>", html) == []  # no inline script
    for url in urls:
        static = client.get(url)  # DEBUG=0 here: WhiteNoise serves them
        assert static.status_code == 200, url
        assert b"".join(static.streaming_content), url
