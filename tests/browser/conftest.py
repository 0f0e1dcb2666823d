"""Browser tests: Debian's Chromium, driven by Playwright for Python, against a real daphne process.

Never downloads a browser: Chromium is the apt package at ``/usr/bin/chromium`` (``make test``
installs it when it is missing). Without it, or without Playwright, the tests skip on a
developer machine and fail when ``CI=true``.

The server is ``daphne project.asgi:application`` on a free port, on the pytest-django test
database (tests use ``django_db(transaction=True)`` so the server sees their data) and the
in-memory channel layer (one process: everything a page receives went through that server).
A test can stop it and start it again on the same port.

Playwright's sync API keeps an asyncio loop running in the test thread, which makes Django
refuse ORM calls there ("SynchronousOnlyOperation"). Nothing else runs on that loop while a
test calls the ORM, so ``DJANGO_ALLOW_ASYNC_UNSAFE`` is set while the browser is open (this
package only). Code that pushes (``async_to_sync``) runs in a thread: ``run_in_thread``.
"""

import http.client
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from tests.conftest import missing_service, token_for
from tests.server import (
    APP_ENV,
    BASE_DIR,
    HOST,
    daphne_executable,
    database_url,
    free_port,
    http_request,
    stop_process,
    wait_for_port,
)
from tests.support import session_cookie

CHROMIUM = "/usr/bin/chromium"
# The flags this machine's Chromium needs (no sandbox as root, no background traffic to a
# network that is closed), plus a resolver rule: every *.example.test name is 127.0.0.1, so
# a test can open the site and a foreign page on different host names of this machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--host-resolver-rules=MAP *.example.test 127.0.0.1",
]
APP_HOST = "app.example.test"  # another name of the site, in ALLOWED_HOSTS
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 812}
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Short reconnect delays so a restart test waits seconds, not the production 30 s cap.
CLIENT_OPTIONS = "window.notificationClientOptions = {baseDelay: 200, maxDelay: 1000, stableAfter: 2000};"


class FastPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    """Django's default algorithm with few iterations: fast to make here, and the server (on its
    default hashers) still verifies it, since the hash records its iteration count."""

    iterations = 1_000


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Overrides tests/conftest.py's MD5 hasher, which the server process would not accept."""
    settings.PASSWORD_HASHERS = [f"{__name__}.FastPBKDF2PasswordHasher"]


class BrowserServer:
    """daphne on a fixed port, stoppable and restartable; stdout and stderr go to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [daphne_executable(), "-b", HOST, "-p", str(self.port), "project.asgi:application"],
                cwd=BASE_DIR, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        if wait_for_port(self.process, self.port, START_TIMEOUT, interval=0.05):
            return
        self.stop()
        raise RuntimeError(f"daphne did not start on port {self.port}:\n{self.log()}")

    def stop(self) -> None:
        if self.running():
            stop_process(self.process)

    def log(self, offset: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """One headless Debian Chromium for the browser tests."""
    if not Path(CHROMIUM).exists():
        missing_service(f"Chromium is not installed at {CHROMIUM}: apt-get install -y chromium (make test does)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        missing_service("Playwright is not installed: pip install -r requirements-dev.txt")
    expect.set_options(timeout=5_000)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # see the module docstring
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000
            )
            try:
                yield chromium
            finally:
                chromium.close()


@pytest.fixture(scope="package")
def browser_server(django_db_setup, tmp_path_factory) -> Iterator[BrowserServer]:
    """The daphne server of the browser tests (on the test database), not started yet."""
    from django.conf import settings
    from django.db import connection

    env = {k: v for k, v in os.environ.items() if k not in APP_ENV}
    env.update(
        DJANGO_SETTINGS_MODULE="project.settings",
        PYTHONUNBUFFERED="1",
        DATABASE_URL=database_url(connection.settings_dict),
        DEBUG="1",  # serves the static files (client.js, the admin's select2)
        SECRET_KEY=settings.SECRET_KEY,  # sessions made in this process verify there
        ALLOWED_HOSTS=f"127.0.0.1,localhost,{APP_HOST}",
        DELIVERY_WORKER="0",  # (tests/server.py, start_server, says why)
    )
    server = BrowserServer(env, tmp_path_factory.mktemp("browser-daphne") / "daphne.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live(browser_server: BrowserServer) -> Iterator[BrowserServer]:
    """A fresh daphne process for this test (the same port every time); the test fails if
    daphne logs a traceback during it.

    Fresh, because each test ends by flushing the database: a server that outlived the flush
    would remember notification ids (its hub's next id) that the emptied store gives out again.
    """
    start = browser_server.log_size()
    browser_server.start()
    try:
        yield browser_server
    finally:
        browser_server.stop()
    new_log = browser_server.log(start)
    assert "Traceback" not in new_log, f"daphne logged a traceback during this test:\n{new_log}"


@pytest.fixture
def open_page(browser, live) -> Iterator[Callable[..., Any]]:
    """Factory: ``open_page(user, path="/", viewport=DESKTOP, context=None)`` opens a page in a new
    browser context (one person's browser) signed in as ``user`` (or signed out with ``None``);
    pass ``context=page.context`` for another tab of the same browser."""
    contexts = []

    def open_(user=None, path: str = "/", *, viewport=DESKTOP, context=None, goto: bool = True):
        if context is None:
            context = browser.new_context(base_url=live.url, viewport=viewport)
            context.set_default_timeout(5_000)
            context.add_init_script(CLIENT_OPTIONS)
            contexts.append(context)
            if user is not None:
                context.add_cookies([{"name": "sessionid", "value": session_cookie(user), "url": live.url}])
        page = context.new_page()
        if goto:
            page.goto(path)
        return page

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def api_send(live, staff) -> Callable[..., dict]:
    """``api_send(title=..., users=[...] | topic=... | broadcast=True)``: POST /api/notifications/ as staff;
    returns the first stored notification."""
    token = token_for(staff)

    def send(**payload) -> dict:
        response = http_request(live, "POST", "/api/notifications/", token=token, json_body=payload)
        assert response.status == 201, response.text
        return response.json()["notifications"][0]

    return send


def run_in_thread(function: Callable, *args, **kwargs):
    """Run Django code that pushes (``async_to_sync``) away from Playwright's running loop."""
    from django.db import connections

    def call():
        try:
            return function(*args, **kwargs)
        finally:
            connections.close_all()  # a thread's connection would outlive the test database

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result(timeout=30)
