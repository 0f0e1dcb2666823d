"""Fuzzing the REST API from its own OpenAPI schema (``/api/openapi.json``) with schemathesis.

Every operation in the schema gets generated requests, both valid ones and invalid ones
(wrong types, missing or extra fields, out-of-range values), sent in-process to the Django
WSGI handler with a staff Bearer token. No response may be a server error, and every
response must match the schema: a documented status code, a documented content type, and
a body that validates against the documented model.

Examples per operation and generation mode: a quarter of the Hypothesis profile's
``max_examples`` (tests/fuzz/conftest.py). Figures: ``pytest -s``, and bench/results/fuzz-latest.json.
"""

from collections import Counter

import pytest
import schemathesis
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.db import close_old_connections
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from notifications.models import Topic

from .figures import record

# Transactional: sends commit, so their pushes run too.
pytestmark = [pytest.mark.django_db(transaction=True)]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def examples_per_operation() -> int:
    """A quarter of the profile's ``max_examples`` for each operation and generation mode
    (50 under the ``ci`` profile: 10 operations x 2 modes x 50 = 1,000 requests)."""
    return max(1, hypothesis_settings().max_examples // 4)


def _fuzz(operation, mode: GenerationMode, headers: dict, statuses: Counter) -> int:
    """Send ``max_examples`` generated requests to one operation; return how many were sent."""
    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(parent=hypothesis_settings(), max_examples=examples_per_operation(), database=None)
    def run(case):
        nonlocal sent
        response = case.call_and_validate(headers=headers, checks=CHECKS)
        sent += 1
        statuses[response.status_code] += 1

    run()
    return sent


@pytest.fixture
def api_schema(settings):
    settings.ALLOWED_HOSTS = ["localhost"]  # the host schemathesis' WSGI client sends
    # Like Django's test client: keep the database connection between requests (reconnecting
    # to PostgreSQL for each request would make this test several times slower).
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/openapi.json", WSGIHandler())
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


def test_every_api_operation_answers_generated_requests_as_its_schema_says(api_schema, staff, staff_token, alice,
                                                                           settings):
    # Lifted so that throttling does not hide the other answers (the limits have their own tests).
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "TICKETS_PER_MINUTE": 10**6,
                              "AUTH_FAILURES_PER_MINUTE": 10**6}
    Topic.objects.create(slug="deploys", title="Deploys")
    Topic.objects.create(slug="secret", title="Secret", private=True)
    headers = {"Authorization": f"Bearer {staff_token}"}
    statuses: Counter = Counter()
    examples: Counter = Counter()
    failures: dict[str, str] = {}

    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in MODES:
            name = f"{operation.method.upper()} {operation.path} ({mode.value})"
            try:
                examples[name] = _fuzz(operation, mode, headers, statuses)
            # Every operation is tried; all failures are reported at the end (schemathesis raises
            # its failures as a BaseExceptionGroup).
            except (Exception, BaseExceptionGroup) as failure:
                failures[name] = f"{type(failure).__name__}: {failure}"[:3000]

    record("rest_api", {
        "operations": len({name.rsplit(" (", 1)[0] for name in examples}),
        "examples_run": sum(examples.values()),
        "examples_by_operation": dict(examples),
        "status_codes": {str(code): n for code, n in sorted(statuses.items())},
        "checks": [check.__name__ for check in CHECKS],
        "examples_per_operation_and_mode": examples_per_operation(),
        "failures": len(failures),
    })
    assert not failures, "\n\n".join(f"{name}:\n{text}" for name, text in failures.items())


# Found while fuzzing, kept as plain tests


@pytest.mark.parametrize("body", [
    '{"title": "a\\u0000b", "broadcast": true}',
    '{"title": "t", "users": ["\\udc00"]}',
    '{"title": "t", "topic": "\\u0000"}',
    '{"title": "t", "broadcast": true, "data": {"k": ["\\u0000"]}}',
    '{"title": "t", "broadcast": true, "data": {"\\ud800": 1}}',
])
def test_strings_with_nul_or_lone_surrogates_are_invalid_not_a_server_error(client, staff_token, body):
    response = client.post("/api/notifications/", body, content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {staff_token}")
    assert (response.status_code, response.json()) == (400, {"error": {
        "code": "invalid", "message": "Strings may not contain NUL (\\u0000) or lone surrogates.",
    }})


def test_a_topic_slug_with_nul_is_not_found(client, staff_token):
    response = client.post("/api/topics/a%00b/follow/", content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {staff_token}")
    assert (response.status_code, response.json()["error"]["code"]) == (404, "not_found")
