"""The signed-in notifications page: a bell, the inbox, toasts, topics and the connection status.

The page is a template (``notifications/index.html``, in the app's ``templates/``) and two static
files: ``client.js`` (the protocol client, reusable on any site) and ``page.js`` (this page's
interface).
"""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core import signing
from django.core.exceptions import ObjectDoesNotExist
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render, resolve_url
from django.views.decorators.csrf import csrf_exempt, ensure_csrf_cookie
from django.views.decorators.http import require_http_methods

from .http import CONTENT_SECURITY_POLICY
from .routing import WS_PATH


@login_required
@ensure_csrf_cookie  # client.js sends the csrftoken cookie as X-CSRFToken on REST writes
def index(request: HttpRequest) -> HttpResponse:
    """Render the notifications page for the signed-in user."""
    from .urls import api_root  # (the URLconf imports this module)

    client_config = {"url": WS_PATH, "apiUrl": api_root()}  # wherever the host mounted them
    context = {"client_config": client_config, "login_url": resolve_url(settings.LOGIN_URL)}
    response = render(request, "notifications/index.html", context)
    # The page's own policy, with or without the project's middleware (a host adds none).
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


@csrf_exempt  # the signed token is the credential; a mail client's one-click POST has no CSRF token (RFC 8058)
@require_http_methods(["GET", "POST"])
def unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    """The one-click unsubscribe link of every email (``mail``): GET asks, POST does it."""
    from . import mail, services

    try:
        payload = mail.read_unsubscribe_token(token)
        user = get_user_model().objects.get(pk=payload["u"])
    except (signing.BadSignature, ObjectDoesNotExist):
        response = render(request, "notifications/unsubscribe.html", {"invalid": True}, status=400)
        response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response
    kind = "digests" if payload["c"] == "digest" else f"emails about {_kind(payload)}"
    done = request.method == "POST"
    if done:
        services.email_unsubscribe(user=user, channel=payload["c"], scope=payload.get("s", ""),
                                   key=payload.get("k", ""), level=payload.get("l", ""))
    context = {"kind": kind, "done": done, "page_url": resolve_url("notifications-page")}
    response = render(request, "notifications/unsubscribe.html", context)
    response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


def _kind(payload: dict) -> str:
    from . import mail

    audience, level = mail.describe_audience(payload.get("s", ""), payload.get("k", "")), payload.get("l")
    return f"{audience} (and every {level} notification)" if level else audience
