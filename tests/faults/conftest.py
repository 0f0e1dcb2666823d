"""Fixtures of the fault tests: a ``World`` (test database, real Redis, users with tokens, a
staff sender) whose server processes are stopped, and whose Redis keys are deleted, at teardown."""

import resource
import shutil

import pytest

from tests.conftest import missing_service
from tests.server import database_url
from tests.test_server import stream  # noqa: F401  (the Stream row carried across database flushes)

from .scenarios import World, populate

USERS = 100  # client i belongs to user i % USERS: at most 10 connections per user (the per-user limit is 20)
OPEN_FILES = 8192  # the reconnect storm holds about 2 x 1000 sockets in this process and the server


@pytest.fixture(scope="session", autouse=True)
def enough_open_files():
    """Raise this process's soft limit on open files (server processes inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def world(stream, redis_url, tmp_path, settings):  # noqa: F811
    from django.db import connection

    members, staff_token = populate(USERS)
    world = World(
        db_url=database_url(connection.settings_dict),
        redis_url=redis_url,
        secret_key=settings.SECRET_KEY,
        log_dir=tmp_path,
        members=members,
        staff_token=staff_token,
    )
    try:
        yield world
    finally:
        world.stop_all()
        world.cleanup_redis()


@pytest.fixture
def redis_server_binary():
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not installed (the Redis restart test runs a private one)")
