"""Acceptance test of the reusable app (issue 15, docs/install.md): a site made by
``django-admin startproject`` adds live notifications with the five documented lines, and
nothing else.

The host is a real one: a fresh ``mysite`` in a temporary directory, its own settings (DEBUG on,
``ALLOWED_HOSTS = []``, SQLite, no ``CHANNEL_LAYERS``, no ``NOTIFICATIONS``), the app importable
as an installed package (``site-packages/notifications`` links to this repository's app, and this
repository's ``project/`` is not on the path), every environment variable of this project's
settings removed. It is migrated, given two users with API tokens (the app's
``create_api_token``) and served by uvicorn; everything a test sees goes through HTTP and the
WebSocket handshake. A test fails if the server logs a traceback, a uvicorn ``ERROR:`` line or a
Django ``Internal Server Error`` while it runs. (The app's own ERROR lines cannot be told apart:
without ``LOGGING`` in the host, Python's last-resort handler prints them as bare messages.)
"""

import contextlib
import json
import os
import re
import select
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from notifications.protocol import SUBPROTOCOL
from tests.server import (
    APP_ENV,
    BASE_DIR,
    HOST,
    WS_PATH,
    LiveServer,
    Response,
    executable,
    free_port,
    http_async,
    http_request,
    recv_json,
    stop_process,
    wait_for_port,
    ws_connect,
)

pytestmark = [pytest.mark.server]

PREFIX = "/notifications/"  # where the host mounts notifications.urls (docs/install.md)
API = f"{PREFIX}api/"
COMMAND_TIMEOUT = 60.0
START_TIMEOUT = 30.0
ADMIN_PASSWORD = "host-admin-pw-1"
# What this repository's project reads from the environment (tests.server.APP_ENV lists its
# settings' env.<type>("NAME") reads), and what else would make the host run on anything but its
# own settings: none of it reaches the host.
STRIPPED_ENV = frozenset({
    *APP_ENV, "DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "CHANNELS_PREFIX",
    "REDIS_PREFIX", "DJANGO_SETTINGS_MODULE", "PROMETHEUS_MULTIPROC_DIR",
})
# Failures inside the server: a traceback, uvicorn's "ERROR:" lines, Django's request errors
# (the host has no LOGGING: Django's default console handler with DEBUG on).
SERVER_TROUBLE = re.compile(r"^(Traceback|ERROR:|Internal Server Error:).*$", re.MULTILINE)

# The five lines of docs/install.md, applied to startproject's files as written there.
SETTINGS_LINES = ('INSTALLED_APPS = ["daphne", *INSTALLED_APPS, "channels", "ninja", "notifications"]\n'
                  'ASGI_APPLICATION = "mysite.asgi.application"\n')
URLS_LINE = 'urlpatterns += [path("notifications/", include("notifications.urls"))]\n'
ASGI_LINES = (
    "from notifications.asgi import notifications_application\n"
    "application = notifications_application(get_asgi_application())\n"
)


# The host project


@dataclass
class HostSite:
    """A fresh ``startproject`` site with the app installed as a package."""

    root: Path  # the directory of manage.py
    site_packages: Path
    env: dict[str, str] = field(repr=False)
    python: str = executable("python")

    def run(self, *args: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        """Run a command of the host (cwd: its directory; its environment only)."""
        result = subprocess.run(
            args, cwd=self.root, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
        )
        if check:
            output = f"{result.stdout}\n{result.stderr}"
            assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{output}"
        return result

    def manage(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(self.python, "manage.py", *args, **kwargs)


@dataclass
class HostUsers:
    admin_token: str
    user_token: str
    user_id: int


def host_environment(site_packages: Path) -> dict[str, str]:
    """This process's environment without this project's variables; the path is site-packages only."""
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV and not k.startswith("PYTHON")}
    env.update({
        "PYTHONPATH": str(site_packages),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # nothing written into this repository through the link
    })
    return env


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text().rstrip("\n") + "\n\n" + text)


def install_app(root: Path) -> None:
    """Apply docs/install.md's five lines to startproject's settings.py, urls.py and asgi.py."""
    package = root / "mysite"
    append(package / "settings.py", SETTINGS_LINES)
    urls = package / "urls.py"
    source = urls.read_text()
    assert source.count("from django.urls import path\n") == 1, source
    urls.write_text(source.replace("from django.urls import path\n", "from django.urls import include, path\n"))
    append(urls, URLS_LINE)
    asgi = package / "asgi.py"
    source = asgi.read_text()
    # startproject's own line stays: get_asgi_application() runs (Django is set up) before the import.
    assert "application = get_asgi_application()" in source, source
    append(asgi, ASGI_LINES)


@pytest.fixture(scope="module")
def host_site(tmp_path_factory) -> HostSite:
    """``django-admin startproject mysite`` plus the five lines; the app linked into site-packages."""
    base = tmp_path_factory.mktemp("host")
    site_packages = base / "site-packages"
    site_packages.mkdir()
    (site_packages / "notifications").symlink_to(BASE_DIR / "notifications", target_is_directory=True)
    env = host_environment(site_packages)
    subprocess.run(
        [executable("django-admin"), "startproject", "mysite"], cwd=base, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True,
    )
    root = base / "mysite"
    install_app(root)
    return HostSite(root=root, site_packages=site_packages, env=env)


@pytest.fixture(scope="module")
def host_users(host_site) -> HostUsers:
    """The host's database migrated; a superuser and an ordinary user, each with an API token."""
    host_site.manage("migrate", "--noinput")
    host_site.manage("createsuperuser", "--noinput", "--username", "admin", "--email", "admin@example.test",
                     env={"DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD})
    admin_token = host_site.manage("create_api_token", "--staff", "admin").stdout.strip()
    user_token = host_site.manage("create_api_token", "--create-users", "alice").stdout.strip()
    user_id = host_site.manage(
        "shell", "--no-imports", "-c",
        "from django.contrib.auth import get_user_model; print(get_user_model().objects.get(username='alice').pk)",
    ).stdout.strip()
    return HostUsers(admin_token=admin_token, user_token=user_token, user_id=int(user_id))


def trouble(log: str) -> list[str]:
    """The lines of ``log`` that show a failure inside the server."""
    return [m.group(0) for m in SERVER_TROUBLE.finditer(log)]


@pytest.fixture(scope="module")
def host_server(host_site, host_users):
    """The host served by uvicorn (lifespan on, as in production); stopped at the end, and its
    shutdown must log no failure either."""
    log_path = host_site.root / "uvicorn.log"
    port = free_port()
    command = [executable("uvicorn"), "mysite.asgi:application", "--host", HOST, "--port", str(port),
               "--lifespan", "on", "--ws", "websockets-sansio"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=host_site.root, env=host_site.env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(port=port, process=process, log_path=log_path, env=host_site.env)
    if not wait_for_port(process, port, START_TIMEOUT):
        stop_process(process)
        pytest.fail(f"uvicorn did not start within {START_TIMEOUT:.0f} s (exit code {process.returncode}):\n"
                    f"{server.log()}")
    yield server
    offset = server.log_size()
    stop_process(process)
    shutdown = server.log_since(offset)
    if trouble(shutdown):
        pytest.fail(f"the server's shutdown logged failures:\n{shutdown[-4000:]}")


@pytest.fixture(autouse=True)
def clean_server_log(request):
    """Fail the test during which the server logged a traceback or an error."""
    if "host_server" not in request.fixturenames:
        yield
        return
    server: LiveServer = request.getfixturevalue("host_server")
    offset = server.log_size()
    yield
    written = server.log_since(offset)
    if trouble(written):
        pytest.fail(f"the server logged failures during this test:\n{written[-6000:]}")


@pytest.fixture(scope="module")
def admin_session(host_server) -> str:
    """The superuser's ``sessionid``, signed in through the admin's login form (with its CSRF token)."""
    page = http_request(host_server, "GET", "/admin/login/")
    assert page.status == 200, page.text[:500]
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert match, "no CSRF token in the admin's login form"
    response = http_request(
        host_server, "POST", "/admin/login/?next=/admin/",
        form={"username": "admin", "password": ADMIN_PASSWORD, "csrfmiddlewaretoken": match.group(1)},
        headers={"Cookie": f"csrftoken={page.cookies()['csrftoken']}"},
    )
    assert response.status == 302, f"admin login failed ({response.status}): {response.text[:500]}"
    return response.cookies()["sessionid"]


# Helpers


class _Assets(HTMLParser):
    """The URLs of a page's scripts and stylesheets."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "script" and values.get("src"):
            self.urls.append(values["src"])
        elif tag == "link" and "stylesheet" in (values.get("rel") or "").split() and values.get("href"):
            self.urls.append(values["href"])


def assets_of(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    return parser.urls


def media_type(response: Response) -> str:
    return (response.headers.get("Content-Type") or "").split(";")[0].strip()


def assert_json_error(response: Response, status: int, code: str) -> None:
    assert (response.status, media_type(response)) == (status, "application/json"), (
        f"{response.status} {response.headers.get('Content-Type')}: {response.text[:800]}"
    )
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"], body


def assert_assets_local(html: str) -> list[str]:
    """Every script and stylesheet of the page is a static file of this site (none from a CDN)."""
    urls = assets_of(html)
    assert urls, "the page references no script or stylesheet"
    remote = [url for url in urls if re.match(r"^(https?:)?//", url)]
    assert not remote, f"the page loads scripts or stylesheets from other sites: {remote}"
    assert all(url.startswith("/static/") for url in urls), urls
    return urls


def client_config(html: str) -> dict:
    match = re.search(r'<script id="notifications-config" type="application/json">(.*?)</script>', html, re.DOTALL)
    assert match, "no notifications-config on the page"
    return json.loads(match.group(1))


def post_oversize(server: LiveServer, path: str, token: str, size: int) -> Response:
    """POST a JSON body of ``size`` bytes; read the answer as soon as the server gives one (a
    server that refuses by Content-Length answers before the body is sent)."""
    body = json.dumps({"title": "x" * (size - 20)}).encode()
    conn = server.connection(10)
    try:
        conn.putrequest("POST", path)
        for name, value in (("Authorization", f"Bearer {token}"), ("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))):
            conn.putheader(name, value)
        conn.endheaders()
        readable, _, _ = select.select([conn.sock], [], [], 2.0)
        if not readable:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.send(body)
        response = conn.getresponse()
        return Response(response.status, response.headers, response.read().decode(errors="replace"))
    finally:
        conn.close()


# The host's own commands


def test_host_imports_the_app_as_an_installed_package_and_not_this_repository(host_site):
    found = host_site.run(host_site.python, "-c", "import notifications, sys; print(notifications.__file__)")
    assert found.stdout.strip() == str(host_site.site_packages / "notifications" / "__init__.py")
    missing = host_site.run(host_site.python, "-c", "import project", check=False)
    assert missing.returncode == 1 and "No module named 'project'" in missing.stderr, missing.stderr


def test_check_passes_on_the_fresh_host(host_site):
    result = host_site.manage("check")
    print(f"manage.py check on the fresh host:\n{result.stdout}{result.stderr}")  # (the report: -rP)
    assert "System check identified no issues" in result.stdout, result.stdout + result.stderr


# The REST API under the host's prefix


def test_inbox_answers_json_to_a_bearer_token(host_server, host_users):
    response = http_request(host_server, "GET", f"{API}notifications/", token=host_users.user_token)
    assert (response.status, media_type(response)) == (200, "application/json"), response.text[:800]
    assert response.json() == {"results": [], "next_before": None}


def test_staff_token_sends_a_notification_through_the_api(host_server, host_users):
    response = http_request(host_server, "POST", f"{API}notifications/", token=host_users.admin_token,
                            json_body={"title": "to the inbox", "users": [host_users.user_id]})
    assert (response.status, media_type(response)) == (201, "application/json"), response.text[:800]
    (sent,) = response.json()["notifications"]
    inbox = http_request(host_server, "GET", f"{API}notifications/", token=host_users.user_token).json()
    assert [n["id"] for n in inbox["results"]][:1] == [sent["id"]], inbox


def test_a_method_the_endpoint_does_not_take_is_a_json_405(host_server, host_users):
    response = http_request(host_server, "PUT", f"{API}notifications/", token=host_users.user_token,
                            json_body={"title": "hi"})
    assert_json_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers.get("Allow", ""), response.headers


def test_an_unknown_path_under_the_api_is_a_json_404(host_server, host_users):
    response = http_request(host_server, "GET", f"{API}nope/", token=host_users.user_token)
    assert_json_error(response, 404, "not_found")


def test_an_oversize_body_is_a_json_413(host_server, host_users):
    response = post_oversize(host_server, f"{API}notifications/", host_users.admin_token, 400 * 1024)
    assert_json_error(response, 413, "body_too_large")


def test_api_docs_load_only_local_static_files(host_server):
    response = http_request(host_server, "GET", f"{API}docs")
    assert response.status == 200, response.text[:800]
    assert response.headers.get("Content-Type", "").startswith("text/html"), response.headers
    assert_assets_local(response.text)  # (served as the host serves static files: runserver, WhiteNoise, a proxy)


# The WebSocket


async def test_websocket_says_hello_then_pushes_a_notification_sent_through_the_api(host_server, host_users):
    offset = host_server.log_size()
    ws = await ws_connect(host_server, token=host_users.user_token, subprotocols=[SUBPROTOCOL])
    try:
        hello = await recv_json(ws)
        assert hello["type"] == "hello" and hello["user"] == {"id": host_users.user_id, "username": "alice"}, (
            f"{hello}\nthe server's log:\n{host_server.log_since(offset)}"
        )
        sent = await http_async(host_server, "POST", f"{API}notifications/", token=host_users.admin_token,
                                json_body={"title": "hi", "users": [host_users.user_id]})
        assert sent.status == 201, sent.text[:800]
        (notification,) = sent.json()["notifications"]
        frame = await recv_json(ws)
        assert frame == {"type": "notification", **notification, "stream": frame.get("stream"),
                         "offset": frame.get("offset")}
        assert frame["title"] == "hi"
    finally:
        await ws.close()


# The page


def test_page_renders_with_the_client_config_of_the_hosts_prefix(host_server, admin_session):
    response = http_request(host_server, "GET", PREFIX, headers={"Cookie": f"sessionid={admin_session}"})
    assert response.status == 200, response.text[:1500]
    assert response.headers.get("Content-Type", "").startswith("text/html"), response.headers
    assert client_config(response.text) == {"url": WS_PATH, "apiUrl": API}


def test_page_static_files_are_local_and_found_by_the_hosts_static_files(host_server, host_site, admin_session):
    cookie = f"sessionid={admin_session}"
    response = http_request(host_server, "GET", PREFIX, headers={"Cookie": cookie})
    assert response.status == 200, response.text[:1500]
    for url in assert_assets_local(response.text):
        name = url.removeprefix("/static/")
        host_site.manage("findstatic", name)  # (fails the test unless a finder has it)


def test_an_anonymous_visit_to_the_page_goes_to_the_hosts_login_url(host_server):
    """The page is for signed-in users: it sends others to the host's own ``LOGIN_URL``
    (docs/install.md says how to give a site without a login page one)."""
    response = http_request(host_server, "GET", PREFIX)
    assert (response.status, response.headers["Location"]) == (302, f"/accounts/login/?next={PREFIX}")


# The admin (startproject mounts it at /admin/)


@pytest.mark.parametrize("path", [
    "/admin/notifications/notification/",
    "/admin/notifications/notification/send/",
    "/admin/notifications/notification/online/",
    "/admin/auth/user/",
])
def test_admin_page_answers(host_server, admin_session, path):
    response = http_request(host_server, "GET", path, headers={"Cookie": f"sessionid={admin_session}"})
    assert response.status == 200, response.text[:1500]
    assert "TemplateDoesNotExist" not in response.text
