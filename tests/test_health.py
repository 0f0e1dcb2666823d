"""Liveness and readiness endpoints."""

import logging

import pytest
from django.db import OperationalError

from notifications import health

from .conftest import MEMORY_LAYER

# Nothing listens on port 1 of this machine.
UNREACHABLE_REDIS = {"default": {
    "BACKEND": "channels_redis.core.RedisChannelLayer",
    "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]},
}}


def test_healthz_is_200_json_without_database_access(client):
    response = client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_healthz_refuses_other_methods(client):
    assert client.post("/healthz").status_code == 405


@pytest.fixture(autouse=True)
def no_earlier_failures():
    """Each test starts with no outage on record (readyz logs a failure once per outage)."""
    health.failures.seen.clear()


@pytest.fixture
def anonymous(settings):
    """Requests come from an address not allowed to read /metrics (the test client's is loopback)."""
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "METRICS_ALLOWED_IPS": ["127.0.0.1"],
                              "METRICS_TOKEN": "metrics-secret"}
    return {"REMOTE_ADDR": "203.0.113.9"}


@pytest.mark.django_db(transaction=True)
def test_readyz_checks_database_and_channel_layer(layer, client, anonymous):
    response = client.get("/readyz", **anonymous)
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "channel_layer": "ok"}}


@pytest.mark.django_db(transaction=True)
def test_readyz_names_the_failed_dependency(client, settings, anonymous):
    settings.CHANNEL_LAYERS = UNREACHABLE_REDIS
    response = client.get("/readyz", **anonymous)
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "checks": {"database": "ok", "channel_layer": "error"}}


@pytest.mark.django_db(transaction=True)
def test_readyz_anonymous_503_names_no_host_port_or_database(client, settings, anonymous, monkeypatch):
    """What psycopg and redis say when they fail names the servers; the anonymous answer does not."""
    name = settings.DATABASES["default"]["NAME"]

    async def database_down():
        raise OperationalError(f'connection to server at "db.internal" (10.1.2.3), port 6543 failed: '
                               f'FATAL: database "{name}" does not exist')

    monkeypatch.setattr(health, "_check_database", database_down)
    settings.CHANNEL_LAYERS = UNREACHABLE_REDIS
    response = client.get("/readyz", **anonymous)
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "checks": {"database": "error", "channel_layer": "error"}}
    text = response.content.decode()
    for detail in ("db.internal", "10.1.2.3", "6543", str(name), "127.0.0.1", ":1", "redis", "Error"):
        assert detail not in text


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("credential", ["address", "token"])
def test_readyz_details_are_for_clients_allowed_to_read_metrics(client, settings, anonymous, credential):
    settings.CHANNEL_LAYERS = UNREACHABLE_REDIS
    if credential == "address":
        response = client.get("/readyz", REMOTE_ADDR="127.0.0.1")
    else:
        response = client.get("/readyz", HTTP_AUTHORIZATION="Bearer metrics-secret", **anonymous)
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    body = response.json()
    assert response.status_code == 503
    assert body["checks"] == {"database": "ok", "channel_layer": "error"}
    assert set(body["details"]) == {"database", "channel_layer"}
    assert body["details"]["database"].startswith("ok (")
    assert body["details"]["channel_layer"].startswith("error: ")
    assert "127.0.0.1" in body["details"]["channel_layer"] or ":1" in body["details"]["channel_layer"]


@pytest.mark.django_db(transaction=True)
def test_readyz_logs_the_details_once_per_outage(client, settings, anonymous, caplog):
    caplog.set_level(logging.INFO, logger="notifications.health")
    settings.CHANNEL_LAYERS = UNREACHABLE_REDIS
    for _ in range(3):
        assert client.get("/readyz", **anonymous).status_code == 503
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    assert client.get("/readyz", **anonymous).status_code == 200
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "notifications.health"]
    assert [level for level, _ in lines] == ["WARNING", "WARNING"], lines
    assert lines[0][1].startswith("readyz: channel_layer: ") and "127.0.0.1" in lines[0][1], lines
    assert lines[1][1] == "readyz: channel_layer: working again"
