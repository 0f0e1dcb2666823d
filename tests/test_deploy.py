"""Production security settings: ``manage.py check --deploy`` is clean with the documented
variables (README, "Configuration"), and ``X-Forwarded-Proto`` is believed from trusted proxies only."""

import json
import os
import secrets
import subprocess
import sys

import pytest

from .server import APP_ENV, BASE_DIR

PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": secrets.token_urlsafe(50),
    "ALLOWED_HOSTS": "notify.example.com",
    "REDIS_URL": "redis://127.0.0.1:6379/0",  # not contacted by the checks; without it notifications.W001 warns
    "HTTPS": "1",
    "SITE_URL": "https://notify.example.com",  # without it notifications.W008 warns (links in emails)
}


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run manage.py in a fresh process with only ``env`` of the application's variables."""
    inherited = {name: value for name, value in os.environ.items() if name not in APP_ENV}
    return subprocess.run(  # noqa: S603 - our own manage.py with fixed arguments
        [sys.executable, "manage.py", *args], cwd=BASE_DIR, env={**inherited, **env},
        capture_output=True, text=True, timeout=120,
    )


def test_check_deploy_reports_nothing_with_the_documented_production_variables():
    result = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize(("change", "warnings"), [
    ({"HTTPS": "0"}, ["security.W004", "security.W008", "security.W012", "security.W016"]),
    ({"SECURE_HSTS_INCLUDE_SUBDOMAINS": "0", "SECURE_HSTS_PRELOAD": "0"}, ["security.W005", "security.W021"]),
    ({"SECRET_KEY": "short"}, ["security.W009"]),
    ({"REDIS_URL": ""}, ["notifications.W001"]),
], ids=["no-https", "hsts-opt-outs", "weak-secret-key", "in-memory-layer"])
def test_check_deploy_fails_when_a_protection_is_missing(change, warnings):
    result = manage("check", "--deploy", "--fail-level", "WARNING", **{**PRODUCTION, **change})
    assert result.returncode != 0
    for warning in warnings:
        assert warning in result.stderr, result.stderr


def _settings(**env: str) -> dict:
    code = ("import json; from django.conf import settings as s; print(json.dumps({"
            "'proxy_header': s.SECURE_PROXY_SSL_HEADER, 'first_middleware': s.MIDDLEWARE[0], "
            "'secure_cookies': [s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE], 'redirect': s.SECURE_SSL_REDIRECT, "
            "'hsts': s.SECURE_HSTS_SECONDS, 'csrf_origins': s.CSRF_TRUSTED_ORIGINS}))")
    result = manage("shell", "-c", code, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_proxy_scheme_header_is_used_only_when_trusted_proxies_are_configured():
    direct = _settings(**PRODUCTION)
    assert direct["proxy_header"] is None
    assert direct["first_middleware"] == "django.middleware.security.SecurityMiddleware"
    assert (direct["secure_cookies"], direct["redirect"], direct["hsts"]) == ([True, True], True, 31536000)
    proxied = _settings(**PRODUCTION, TRUSTED_PROXIES="127.0.0.1", CSRF_TRUSTED_ORIGINS="https://app.example.com")
    assert proxied["proxy_header"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert proxied["first_middleware"] == "notifications.proxies.ForwardedProtoMiddleware"
    assert proxied["csrf_origins"] == ["https://app.example.com"]
    development = _settings(DEBUG="1")
    assert (development["secure_cookies"], development["redirect"], development["hsts"]) == ([False, False], False, 0)


@pytest.fixture
def behind_proxy(settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "TRUSTED_PROXIES": ["10.0.0.0/8"]}
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.MIDDLEWARE = ["notifications.proxies.ForwardedProtoMiddleware", *settings.MIDDLEWARE]
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 3600
    settings.ALLOWED_HOSTS = ["notify.example.com"]


def test_forwarded_proto_is_believed_from_a_trusted_proxy_only(client, behind_proxy):
    via_proxy = client.get("/accounts/login/", REMOTE_ADDR="10.1.2.3", HTTP_X_FORWARDED_PROTO="https",
                           HTTP_HOST="notify.example.com")
    assert via_proxy.status_code == 200
    assert via_proxy["Strict-Transport-Security"] == "max-age=3600"
    forged = client.get("/accounts/login/", REMOTE_ADDR="203.0.113.9", HTTP_X_FORWARDED_PROTO="https",
                        HTTP_HOST="notify.example.com")
    assert (forged.status_code, forged["Location"]) == (301, "https://notify.example.com/accounts/login/")
    plain = client.get("/accounts/login/", REMOTE_ADDR="10.1.2.3", HTTP_X_FORWARDED_PROTO="http",
                       HTTP_HOST="notify.example.com")
    assert plain.status_code == 301


def test_health_checks_answer_plain_http_without_a_redirect(client, behind_proxy):
    assert client.get("/healthz", REMOTE_ADDR="10.1.2.3", HTTP_HOST="notify.example.com").status_code == 200
