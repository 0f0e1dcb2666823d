"""Liveness and readiness endpoints."""

import pytest

from .conftest import MEMORY_LAYER


def test_healthz_is_200_json_without_database_access(client):
    response = client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_healthz_refuses_other_methods(client):
    assert client.post("/healthz").status_code == 405


@pytest.mark.django_db(transaction=True)
def test_readyz_checks_database_and_channel_layer(layer, client):
    response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "channel_layer"}
    assert all(value.startswith("ok (") for value in body["checks"].values())


@pytest.mark.django_db(transaction=True)
def test_readyz_names_the_failed_dependency(client, settings):
    settings.CHANNEL_LAYERS = {"default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]},  # nothing listens on port 1
    }}
    response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "unavailable"
    assert body["checks"]["database"].startswith("ok (")
    assert body["checks"]["channel_layer"].startswith("error: ")
    settings.CHANNEL_LAYERS = MEMORY_LAYER
