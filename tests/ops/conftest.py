"""Fixtures of the operations tests: ``bin/serve`` processes on the test database and the real
Redis (one channel-layer prefix per test), stopped and cleaned up at teardown; users and tokens."""

import uuid

import pytest
import redis

from tests.conftest import token_for
from tests.server import database_url, server_trouble
from tests.support import session_cookie
from tests.test_server import stream  # noqa: F401  (the Stream row carried across database flushes)

from .serving import Served, start_serve


@pytest.fixture
def serve_env(redis_url, settings, stream) -> dict[str, str]:  # noqa: F811
    """The environment of a production-like server: DEBUG=0, the test database, the real Redis
    under a prefix of this test's own."""
    from django.db import connection

    return {
        "DATABASE_URL": database_url(connection.settings_dict),
        "REDIS_URL": redis_url,
        "CHANNELS_PREFIX": f"test-ops-{uuid.uuid4().hex[:8]}",
        "DEBUG": "0",
        "SECRET_KEY": settings.SECRET_KEY,  # sessions made in this process verify there
        "ALLOWED_HOSTS": "127.0.0.1,localhost,[::1]",
        "SERVE_GRACEFUL_TIMEOUT": "3",
    }


@pytest.fixture
def serve(serve_env, tmp_path, redis_url):
    """Factory: ``serve(name, workers=1, host=..., uds=..., args=(), **env)`` starts ``bin/serve``.

    Every server is stopped at teardown, its channel-layer keys deleted, and the test fails if
    one logged a traceback or an ERROR line."""
    started: list[Served] = []

    def start(name: str = "server", *, workers: int = 1, host: str = "127.0.0.1", uds: str | None = None,
              args: tuple[str, ...] = (), **env: str) -> Served:
        server = start_serve({**serve_env, **env}, tmp_path / f"{name}.log", workers=workers, host=host, uds=uds,
                             args=args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    client = redis.Redis.from_url(redis_url)
    prefixes = {server.env["CHANNELS_PREFIX"] for server in started}
    for prefix in prefixes:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    client.close()
    for server in started:
        trouble = server_trouble(server.log())
        assert not trouble, f"{server.log_path.name} logged errors:\n{server.log()}"


@pytest.fixture
def superuser(make_user):
    user = make_user("root", staff=True)
    user.is_superuser = True
    user.save(update_fields=["is_superuser"])
    return user


@pytest.fixture
def superuser_session(superuser) -> dict[str, str]:
    return {"sessionid": session_cookie(superuser)}


@pytest.fixture
def superuser_token(superuser) -> str:
    return token_for(superuser)
