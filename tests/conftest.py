"""Shared fixtures: users and tokens, the channel layer (in-memory and real Redis), WebSocket clients.

Tests that need Redis or PostgreSQL skip on a developer machine without them, and
fail when ``CI=true``.
"""

import os
import subprocess
import time
import uuid
from urllib.parse import urlsplit

import pytest
import redis
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Permission

from project.layers import redis_channel_layer
from tests.support import PASSWORD

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
    "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
]
WS_PATH = "/ws/notifications/"


def missing_service(message: str):
    """Fail in CI, skip elsewhere: a missing Redis or PostgreSQL never hides a test in CI."""
    if CI:
        pytest.fail(f"{message} (CI=true: required)")
    pytest.skip(message)


def _redis_answers() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_redis() -> str:
    """The real Redis server's URL; start the local server if it is down."""
    if _redis_answers():
        return REDIS_URL
    if urlsplit(REDIS_URL).hostname in ("127.0.0.1", "localhost"):
        os.makedirs("/var/lib/redis", exist_ok=True)
        os.makedirs("/var/log/redis", exist_ok=True)
        try:
            subprocess.run(REDIS_START, check=False, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        for _ in range(50):
            if _redis_answers():
                return REDIS_URL
            time.sleep(0.1)
    missing_service(f"Redis is not answering at {REDIS_URL}")


def require_postgres():
    from django.db import connection

    if connection.vendor != "postgresql":
        missing_service("this test needs PostgreSQL: set DATABASE_URL=postgres://...")


def redis_layer_settings(prefix: str | None = None) -> dict:
    return {"default": redis_channel_layer(REDIS_URL, prefix or f"test-{uuid.uuid4().hex[:8]}")}


MEMORY_LAYER = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    """pytest-django's test databases; before they are dropped, the connections that the
    database threads of notifications/db.py hold are closed (PostgreSQL refuses to drop a
    database that sessions still use)."""
    from notifications import db

    yield
    db.shutdown()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return ensure_redis()


@pytest.fixture
def second_redis(tmp_path):
    """A second, private Redis (``redis-server`` on a free loopback port, no persistence): another
    shard beside the test Redis. ``.url``; ``.stop()`` and ``.start()`` restart it empty; stopped
    at teardown. ``RedisServer`` (tests/server.py)."""
    import shutil

    from tests.server import RedisServer

    if shutil.which("redis-server") is None:
        missing_service("redis-server is not installed (a second Redis shard runs a private one)")
    server = RedisServer(tmp_path / "second-redis.log").start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def layer(request, settings) -> str:
    """Run the test on the in-memory layer and on the real Redis layer (msgpack)."""
    if request.param == "redis":
        request.getfixturevalue("redis_url")
        settings.CHANNEL_LAYERS = redis_layer_settings()
    else:
        settings.CHANNEL_LAYERS = MEMORY_LAYER
    return request.param


@pytest.fixture
def make_user(django_user_model):
    def make(username: str, *, staff: bool = False, **fields):
        user = django_user_model.objects.create_user(username=username, password=PASSWORD, **fields)
        if staff:
            user.is_staff = True
            user.save(update_fields=["is_staff"])
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label="notifications", codename="add_notification")
            )
        return user

    return make


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


@pytest.fixture
def carol(make_user):
    """A user with an email address (alice and bob have none)."""
    return make_user("carol", email="carol@example.com")


@pytest.fixture
def locmem_email(settings):
    """Emails kept in ``django.core.mail.outbox``; links in them under https://notify.example."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "SITE_URL": "https://notify.example"}


@pytest.fixture
def staff(make_user):
    return make_user("staff", staff=True)


def token_for(user) -> str:
    from notifications.auth import token_create

    return token_create(user=user)[1]


@pytest.fixture
def alice_token(alice) -> str:
    return token_for(alice)


@pytest.fixture
def bob_token(bob) -> str:
    return token_for(bob)


@pytest.fixture
def staff_token(staff) -> str:
    return token_for(staff)


def since(cursor: dict[str, int]) -> str:
    """A cursor as the URL writes it: ``u.1:17,b:3``."""
    return ",".join(f"{stream}:{offset}" for stream, offset in cursor.items())


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


@pytest.fixture
async def ws():
    """Factory: ``await ws(token)`` opens a connected WebsocketCommunicator (closed at teardown).

    With ``hello=True`` (the default) it also reads and returns the hello frame:
    ``comm, hello = await ws(token)``.
    """
    from project.asgi import application

    opened: list[WebsocketCommunicator] = []

    async def open_ws(token=None, *, headers=(), path=WS_PATH, subprotocols=None, hello=True,
                      client=("127.0.0.1", 50000), scheme="ws"):
        all_headers = list(headers) + (bearer(token) if token else [])
        comm = WebsocketCommunicator(application, path, headers=all_headers, subprotocols=subprotocols)
        comm.scope["client"] = client
        comm.scope["scheme"] = scheme
        opened.append(comm)
        connected, _ = await comm.connect(timeout=5)
        assert connected
        if not hello:
            return comm
        frame = await comm.receive_json_from(timeout=5)
        assert frame["type"] == "hello", frame
        return comm, frame

    yield open_ws
    for comm in opened:
        try:
            await comm.disconnect(timeout=2)
        except Exception:  # noqa: S110 - already closed by the server
            pass


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Tests create many users: a fast hasher (production keeps Django's default)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def no_delivery_thread(settings):
    """Tests run the delivery worker's rounds themselves (``delivery.run_until_idle``), not a thread."""
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_WORKER": False}


@pytest.fixture(autouse=True)
def private_cache(settings):
    """Each test counts throttled attempts from zero, in a cache of its own."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                   "LOCATION": uuid.uuid4().hex}}


@pytest.fixture(autouse=True)
def close_thread_connections():
    """Close the database connection of the thread that runs ORM code for async code in this
    process (``sync_to_async``'s one thread: consumers, the in-process hub): with CONN_MAX_AGE it
    would stay open, and PostgreSQL refuses to drop a test database that still has a session."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=10)
