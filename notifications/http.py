"""HTTP protections around the Django application: request body limits enforced before a body
is read, and a Content-Security-Policy on the service's HTML pages.

``BodyLimitMiddleware`` is ASGI middleware (``notifications.asgi.notifications_application``
wraps the host's Django HTTP app in it): Django's ``ASGIHandler`` reads a whole body, to a
temporary file, before any Django middleware runs, so a limit checked there comes after the
upload. The limits:

- under the REST API (``/api/`` here; wherever the host includes ``notifications.urls``):
  ``NOTIFICATIONS["API_MAX_BODY_BYTES"]`` (256 KiB), the API's own;
- elsewhere (the login form, the admin): ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (Django's 2.5 MiB),
  the size Django itself refuses for a non-file body. The service takes no file uploads, so
  nothing larger is legitimate; ``None`` turns the limit off there, as it does in Django.

A ``Content-Length`` over the limit is refused at once (413); a body without one (chunked) is
read up to the limit and refused as soon as it passes it, without calling Django. Both
refusals close the connection, so the client cannot go on sending the rest.
"""

import json

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin

from . import conf

# Only this origin, and no inline scripts or styles: the pages' scripts and styles are static files
# (Django's admin in 5.2 too, but for a <style> block in the change list of a ModelAdmin without
# actions; none here). connect-src 'self' covers the page's same-origin WebSocket (ws: and wss:,
# CSP Level 3). img-src adds data: for the icons inlined in Swagger UI's stylesheet.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "frame-ancestors 'none'",
    "form-action 'self'",
])


def body_limit(path: str) -> int | None:
    """The largest request body accepted at ``path``, in bytes (``None``: no limit)."""
    from .urls import api_root  # (imports the API, which imports this module)

    if path.startswith(api_root()):
        return conf.settings.API_MAX_BODY_BYTES
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE


def error_body(code: str, message: str, fields: dict | None = None) -> dict:
    """The JSON body of every API error: ``{"error": {"code", "message", "fields"?}}``."""
    error: dict = {"code": code, "message": message}
    if fields:
        error["fields"] = fields
    return {"error": error}


async def _refuse(send, status: int, code: str, message: str) -> None:
    """Answer ``status`` with the API's JSON error, and close the connection after it."""
    body = json.dumps(error_body(code, message)).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"connection", b"close"),
        ],
    })
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Refuse request bodies over ``body_limit(path)`` before the application reads them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = body_limit(scope["path"])
        if limit is None:
            return await self.app(scope, receive, send)
        lengths, chunked = set(), False
        for name, value in scope["headers"]:
            name = name.lower()
            if name == b"content-length":
                lengths.add(value.strip())
            elif name == b"transfer-encoding":
                chunked = True
        too_large = f"Request bodies are limited to {limit} bytes."
        if lengths and not chunked:
            if len(lengths) > 1 or not all(value.isdigit() for value in lengths):
                return await _refuse(send, 400, "bad_request", "Content-Length is not a number.")
            if int(lengths.pop()) > limit:
                return await _refuse(send, 413, "body_too_large", too_large)
            return await self.app(scope, receive, send)  # the server delivers no more than it said

        # No Content-Length (a chunked body, or none at all): read at most the limit, then stop.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > limit:
                return await _refuse(send, 413, "body_too_large", too_large)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # then http.disconnect, from the server
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    """Send ``CONTENT_SECURITY_POLICY`` with every HTML response that has no policy of its own.

    Not on Django's own error pages with ``DEBUG=1``: they are inline scripts and styles."""

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if "Content-Security-Policy" in response or not response.get("Content-Type", "").startswith("text/html"):
            return response
        if settings.DEBUG and response.status_code >= 400:
            return response
        response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response
