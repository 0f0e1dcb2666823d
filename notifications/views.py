"""The signed-in notifications page: a bell, the inbox, toasts, topics and the connection status.

The page is a template (``notifications/index.html``, in the app's ``templates/``) and two static
files: ``client.js`` (the protocol client, reusable on any site) and ``page.js`` (this page's
interface).
"""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render, resolve_url
from django.views.decorators.csrf import ensure_csrf_cookie

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
