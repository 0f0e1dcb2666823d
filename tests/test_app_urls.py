"""The app's one include (``notifications.urls``) under any prefix, with JSON errors and body
limits and no middleware of the host's, and its ASGI helper's lifespan chained with a host's."""

import asyncio
import json

import pytest
from django.test import Client

from notifications import asgi as app_asgi
from notifications import services
from notifications.http import body_limit
from notifications.urls import api_root

pytestmark = [pytest.mark.django_db]

PREFIXED = "tests.hosts.prefixed_urls"
# A host's middleware: Django's startproject list, without anything of this app's.
HOST_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]


@pytest.fixture
def host(settings):
    settings.ROOT_URLCONF = PREFIXED
    settings.MIDDLEWARE = HOST_MIDDLEWARE
    return Client(raise_request_exception=False)


def error_of(response) -> str:
    assert response["Content-Type"] == "application/json", (response.status_code, response.content[:200])
    return response.json()["error"]["code"]


def test_the_api_root_follows_the_include(settings):
    assert api_root() == "/api/"
    settings.ROOT_URLCONF = PREFIXED
    assert api_root() == "/notify/api/"
    assert body_limit("/notify/api/notifications/") == settings.NOTIFICATIONS["API_MAX_BODY_BYTES"]
    assert body_limit("/api/notifications/") == settings.DATA_UPLOAD_MAX_MEMORY_SIZE  # not the API here


def test_under_a_prefix_every_api_answer_is_json(host, alice_token):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {alice_token}"}
    assert host.get("/notify/api/notifications/", **auth).status_code == 200
    wrong_method = host.put("/notify/api/notifications/", **auth)
    assert (wrong_method.status_code, error_of(wrong_method)) == (405, "method_not_allowed")
    assert "GET" in wrong_method["Allow"]
    unknown = host.get("/notify/api/nope/", **auth)
    assert (unknown.status_code, error_of(unknown)) == (404, "not_found")
    write_without_slash = host.post("/notify/api/notifications", "{}", content_type="application/json", **auth)
    assert (write_without_slash.status_code, error_of(write_without_slash)) == (404, "not_found")
    read_without_slash = host.get("/notify/api/notifications", **auth)
    assert (read_without_slash.status_code, read_without_slash["Location"]) == (301, "/notify/api/notifications/")
    too_big = host.post("/notify/api/notifications/", json.dumps({"title": "x" * 400_000}),
                        content_type="application/json", **auth)
    assert (too_big.status_code, error_of(too_big)) == (413, "body_too_large")
    not_json = host.post("/notify/api/notifications/", "title=x", content_type="text/plain", **auth)
    assert (not_json.status_code, error_of(not_json)) == (415, "unsupported_media_type")


def test_an_unexpected_failure_in_an_api_view_is_a_json_500(host, staff_token, monkeypatch, caplog):
    def broken(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(services, "notification_send", broken)
    response = host.post("/notify/api/notifications/", json.dumps({"title": "x", "broadcast": True}),
                         content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {staff_token}")
    assert (response.status_code, error_of(response)) == (500, "server_error")
    assert "API view failed" in caplog.text


def test_the_page_under_a_prefix_points_its_client_at_the_included_api(host, alice):
    host.force_login(alice)
    page = host.get("/notify/")
    assert page.status_code == 200
    assert page.context["client_config"] == {"url": "/ws/notifications/", "apiUrl": "/notify/api/"}
    assert "default-src 'self'" in page["Content-Security-Policy"]  # the page's own, without the middleware


# The lifespan: the app's work chained with the host's own lifespan app.

def _recorder(name: str, events: list, *, fail_on: str | None = None):
    async def app(scope, receive, send):
        while True:
            message = await receive()
            events.append((name, message["type"]))
            if message["type"] == fail_on:
                raise RuntimeError(f"{name} cannot start")
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    return app


async def _run(app, *messages) -> list[dict]:
    inbox: asyncio.Queue = asyncio.Queue()
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    for message in messages:
        inbox.put_nowait({"type": message})
    await asyncio.wait_for(app({"type": "lifespan"}, inbox.get, send), timeout=5)
    return sent


async def test_the_lifespan_runs_the_app_first_at_startup_and_last_at_shutdown(monkeypatch):
    events: list = []
    monkeypatch.setattr(app_asgi, "notifications_lifespan", _recorder("app", events))
    chained = app_asgi.lifespan_chain(_recorder("host", events))
    sent = await _run(chained, "lifespan.startup", "lifespan.shutdown")
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert events == [("app", "lifespan.startup"), ("host", "lifespan.startup"),
                      ("host", "lifespan.shutdown"), ("app", "lifespan.shutdown")]


async def test_a_host_lifespan_that_fails_fails_the_startup(monkeypatch):
    events: list = []
    monkeypatch.setattr(app_asgi, "notifications_lifespan", _recorder("app", events))
    chained = app_asgi.lifespan_chain(_recorder("host", events, fail_on="lifespan.startup"))
    sent = await _run(chained, "lifespan.startup")
    assert [message["type"] for message in sent] == ["lifespan.startup.failed"]
    assert "cannot start" in sent[0]["message"]


def test_without_a_host_lifespan_it_is_the_apps_own():
    assert app_asgi.lifespan_chain(None) is app_asgi.notifications_lifespan
    application = app_asgi.notifications_application(lambda *a: None)
    assert application.app.application_mapping["lifespan"] is app_asgi.notifications_lifespan


def test_the_asgi_helper_can_be_imported_before_django_is_set_up():
    """``application = notifications_application(get_asgi_application())`` in the host's asgi.py,
    with the import above it: importing the module must not touch models or settings."""
    import subprocess
    import sys

    code = "import notifications.asgi, sys; assert 'notifications.models' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("path", ["/api/notifications/%0A/read/", "/api/x%0Ay/", "/api/%0D%0A"])
def test_a_path_with_an_encoded_newline_is_a_json_404_too(client, alice_token, path):
    """(The schema fuzzer found it: the catch-all's '.' did not match a newline, so Django answered in HTML.)"""
    response = client.post(path, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {alice_token}")
    assert (response.status_code, response["Content-Type"]) == (404, "application/json")
    assert response.json()["error"]["code"] == "not_found"
