"""The signed-in notifications page: a bell, the inbox, toasts, topics and the connection status.

The page is a template (``notifications/index.html``, in the app's ``templates/``) and two static
files: ``client.js`` (the protocol client, reusable on any site) and ``page.js`` (this page's
interface).
"""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie


@login_required
@ensure_csrf_cookie  # client.js sends the csrftoken cookie as X-CSRFToken on REST writes
def index(request: HttpRequest) -> HttpResponse:
    """Render the notifications page for the signed-in user."""
    client_config = {"url": "/ws/notifications/", "apiUrl": "/api/"}
    return render(request, "notifications/index.html", {"client_config": client_config})
