"""Real server processes for end-to-end tests (daphne, uvicorn, a private redis-server; free
loopback ports and waiting for one to answer), and small HTTP and WebSocket clients for them.

No fixtures here (importing fixtures into test modules trips linters); ``tests/test_server.py``
wraps these helpers in fixtures. Another test module can do the same, or the fixtures can
move to ``conftest.py`` once a second module needs them.

The server runs ``project.asgi:application`` exactly as in production (``daphne -b -p``),
against the pytest-django test database and the real Redis, so everything a test sees
went through HTTP, the WebSocket handshake, the channel layer and msgpack.
"""

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

BASE_DIR = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WS_PATH = "/ws/notifications/"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
RECV_TIMEOUT = 5.0
# Environment variables of the app that must not leak from the developer's shell into the
# server: the tests assert the documented defaults, or set the values they need. Every
# ``env.<type>("NAME")`` read in project/settings.py, and every ``"NAME": env.<type>`` of its
# ENVIRONMENT_SETTINGS table, found when this module is imported.
_SETTINGS_TEXT = (BASE_DIR / "project" / "settings.py").read_text()
_SETTINGS_ENV = [*re.findall(r'env\.\w+\(\s*"([A-Z][A-Z0-9_]*)"', _SETTINGS_TEXT),
                 *re.findall(r'"([A-Z][A-Z0-9_]*)": env\.\w+\b', _SETTINGS_TEXT)]
APP_ENV = tuple(sorted({"DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL", "SECRET_KEY", *_SETTINGS_ENV}))


# Starting and stopping daphne

# A traceback, or a line logged at ERROR or CRITICAL (settings.LOGGING's format starts
# "%(asctime)s %(levelname)s"): something failed inside the server.
SERVER_TROUBLE = re.compile(r"^Traceback|^\d{4}-\d\d-\d\d [\d:,.]+ (ERROR|CRITICAL) ", re.MULTILINE)


def server_trouble(log: str, known: tuple[str, ...] = ()) -> list[str]:
    """The lines of ``log`` that show a failure inside the server, except those containing
    one of the ``known`` strings."""
    lines = [m.group(0) + log[m.end():].split("\n", 1)[0] for m in SERVER_TROUBLE.finditer(log)]
    return [line for line in lines if not any(k in line for k in known)]


def database_url(settings_dict: dict) -> str:
    """A ``DATABASE_URL`` for another process to reach the same (test) database."""
    engine, name = settings_dict["ENGINE"], str(settings_dict["NAME"])
    if engine == "django.db.backends.sqlite3":
        if name == ":memory:" or name.startswith("file:") or "mode=memory" in name:
            raise RuntimeError(f"an in-memory SQLite database ({name}) cannot be shared with a server process")
        return f"sqlite:///{Path(name).resolve()}"  # an absolute path gives sqlite:////abs/path
    if engine in ("django.db.backends.postgresql", "django.db.backends.postgresql_psycopg2"):
        user = quote(settings_dict.get("USER") or "", safe="")
        password = quote(settings_dict.get("PASSWORD") or "", safe="")
        credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = quote(settings_dict.get("HOST") or "", safe="")  # a socket directory is percent-encoded
        port = f":{settings_dict['PORT']}" if settings_dict.get("PORT") else ""
        return f"postgres://{credentials}{host}{port}/{quote(name, safe='')}"
    raise RuntimeError(f"no DATABASE_URL form for {engine}")


def free_port(host: str = HOST) -> int:
    """A free TCP port on ``host`` (IPv4, or IPv6 for an address with a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_answers(port: int, host: str = HOST, *, uds: str | None = None) -> bool:
    """Whether something accepts connections on ``host``:``port`` (or on the Unix socket ``uds``)."""
    try:
        if uds:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(uds)
        else:
            with socket.create_connection((host, port), timeout=0.5):
                pass
        return True
    except OSError:
        return False


def wait_for_port(process: subprocess.Popen, port: int, timeout: float, *, host: str = HOST,
                  interval: float = 0.1) -> bool:
    """Wait (bounded) until ``port`` answers (True); False if ``process`` exits or ``timeout``
    seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if port_answers(port, host):
            return True
        time.sleep(interval)
    return False


def executable(name: str) -> str:
    """A console script of this environment (beside its python), or else on PATH."""
    beside_python = Path(sys.executable).with_name(name)
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed in this environment")
    return found


def daphne_executable() -> str:
    return executable("daphne")


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, a bounded wait, then SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class LiveServer:
    """A running daphne process; ``log_path`` holds its stdout and stderr."""

    port: int
    process: subprocess.Popen
    log_path: Path
    env: dict = field(repr=False, default_factory=dict)
    # Byte ranges of the log written during tests that hit a known server bug (xfailed).

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def origin(self) -> str:
        return self.http_url

    def ws_url(self, path: str = WS_PATH, **query: str) -> str:
        return f"ws://{HOST}:{self.port}{path}" + (f"?{urlencode(query)}" if query else "")

    def log(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def stop(self) -> None:
        stop_process(self.process)

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout)


def start_server(name: str, command, env: dict[str, str], log_path: Path, *, port: int | None = None,
                 attempts: int = 3) -> LiveServer:
    """Start ``command(port)`` (an ASGI server serving this project) and wait (bounded) until
    the port answers. ``port`` restarts a server on a known port (one attempt); otherwise a
    free port is picked, and another one tried if it was taken before the server bound it."""
    full_env = {k: v for k, v in os.environ.items() if k not in APP_ENV}
    # No delivery worker unless the test asks (DELIVERY_WORKER="1"): a server that outlives its test
    # would claim the emails another test's own workers are to send, on the same test database.
    full_env.update({"DJANGO_SETTINGS_MODULE": "project.settings", "PYTHONUNBUFFERED": "1",
                     "DELIVERY_WORKER": "0"}, **env)
    failures = []
    for _ in range(1 if port is not None else attempts):
        chosen = port if port is not None else free_port()
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command(chosen), cwd=BASE_DIR, env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = LiveServer(port=chosen, process=process, log_path=log_path, env=full_env)
        if wait_for_port(process, chosen, START_TIMEOUT):
            return server
        server.stop()
        failures.append(f"port {chosen}: exit code {process.returncode}")
        if process.returncode is None or "address already in use" not in server.log().lower():
            break
    log_text = log_path.read_text(errors="replace")
    raise RuntimeError(f"{name} did not start within {START_TIMEOUT:.0f} s ({'; '.join(failures)}):\n{log_text}")


def start_daphne(env: dict[str, str], log_path: Path, *, attempts: int = 3) -> LiveServer:
    """Start daphne on a free port (as ``daphne -b -p`` in production)."""
    return start_server(
        "daphne", lambda port: [daphne_executable(), "-b", HOST, "-p", str(port), "project.asgi:application"],
        env, log_path, attempts=attempts,
    )


# HTTP


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    def cookies(self) -> dict[str, str]:
        jar = SimpleCookie()
        for value in self.headers.get_all("Set-Cookie") or []:
            jar.load(value)
        return {name: morsel.value for name, morsel in jar.items()}


def http_request(
    server: LiveServer,
    method: str,
    path: str,
    *,
    token: str | None = None,
    json_body: Any = None,
    form: dict | None = None,
    headers: dict | None = None,
    timeout: float = RECV_TIMEOUT,
) -> Response:
    """One HTTP request to the live server (blocking; use ``http_async`` from async tests)."""
    headers = dict(headers or {})
    body = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers["Content-Type"] = "application/json"
    elif form is not None:
        body = urlencode(form, doseq=True).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    conn = server.connection(timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return Response(response.status, response.headers, response.read().decode(errors="replace"))
    finally:
        conn.close()


async def http_async(server: LiveServer, method: str, path: str, **kwargs) -> Response:
    return await asyncio.to_thread(http_request, server, method, path, **kwargs)


def session_login(server: LiveServer, username: str, password: str) -> str:
    """Sign in through ``/accounts/login/`` as a browser does; return the ``sessionid`` cookie."""
    page = http_request(server, "GET", "/accounts/login/")
    assert page.status == 200, page.text[:500]
    csrf_cookie = page.cookies()["csrftoken"]
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert match, "no CSRF token in the login form"
    response = http_request(
        server,
        "POST",
        "/accounts/login/",
        form={"username": username, "password": password, "csrfmiddlewaretoken": match.group(1)},
        headers={"Cookie": f"csrftoken={csrf_cookie}"},
    )
    assert response.status == 302, f"login failed ({response.status}): {response.text[:500]}"
    return response.cookies()["sessionid"]


# WebSocket


async def ws_connect(
    server: LiveServer,
    *,
    token: str | None = None,
    path: str = WS_PATH,
    query: dict | None = None,
    cookies: dict[str, str] | None = None,
    origin: str | None = None,
    subprotocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> ClientConnection:
    """Open a WebSocket to the live server (the caller closes it)."""
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    if cookies:
        all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    url = f"ws://{HOST}:{server.port}{path}" + (f"?{urlencode(query)}" if query else "")
    return await connect(
        url,
        additional_headers=all_headers,
        origin=origin,
        subprotocols=subprotocols,
        open_timeout=RECV_TIMEOUT,
        close_timeout=2,
    )


async def recv_json(ws: ClientConnection, timeout: float = RECV_TIMEOUT) -> dict:
    """The next frame, decoded; fails the test after ``timeout`` seconds."""
    try:
        text = await asyncio.wait_for(ws.recv(), timeout)
    except TimeoutError:
        raise AssertionError(f"no frame within {timeout} s") from None
    assert isinstance(text, str), f"expected a text frame, got {text!r}"
    return json.loads(text)


async def send_json(ws: ClientConnection, frame: dict) -> None:
    await ws.send(json.dumps(frame))


async def expect_no_frame(ws: ClientConnection, timeout: float = 0.5) -> None:
    """Nothing arrives within ``timeout`` seconds (and the connection is still open)."""
    with contextlib.suppress(TimeoutError):
        frame = await asyncio.wait_for(ws.recv(), timeout)
        raise AssertionError(f"expected no frame, got {frame!r}")


async def expect_close(ws: ClientConnection, code: int | None, timeout: float = RECV_TIMEOUT) -> None:
    """The server closes the connection with ``code`` (any way at all if ``code`` is None),
    and sends no further frame first."""
    try:
        frame = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as closed:
        if code is not None:
            assert closed.rcvd is not None, f"connection dropped without a close frame: {closed}"
            assert closed.rcvd.code == code, f"closed with {closed.rcvd.code}, expected {code}"
        return
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection within {timeout} s") from None
    raise AssertionError(f"expected the connection to close ({code}), got a frame: {frame!r}")


# uvicorn (sends close 1012 on SIGTERM and runs the ASGI lifespan shutdown, unlike daphne)


def uvicorn_executable() -> str:
    return executable("uvicorn")


def start_uvicorn(env: dict[str, str], log_path: Path, *, port: int | None = None, attempts: int = 3,
                  extra_args: tuple[str, ...] = ()) -> LiveServer:
    """Start uvicorn (``--ws websockets-sansio --lifespan on``, as in production); uvicorn binds
    only after importing the app and running the lifespan startup."""
    return start_server(
        "uvicorn",
        lambda chosen: [uvicorn_executable(), "project.asgi:application", "--host", HOST, "--port", str(chosen),
                        "--ws", "websockets-sansio", "--lifespan", "on", "--no-access-log", *extra_args],
        env, log_path, port=port, attempts=attempts,
    )


# redis-server


class RedisServer:
    """A private redis-server on its own port (never the machine's shared one)."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.log_path = log_path
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [executable, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(self.log_path.parent)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                client = redis.Redis(host=HOST, port=self.port, socket_timeout=0.5)
                try:
                    if client.ping():
                        return self
                finally:
                    client.close()
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)  # SIGTERM, a bounded wait, then SIGKILL
