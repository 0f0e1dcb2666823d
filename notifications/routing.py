"""WebSocket URL routes of the notifications app (``notifications.asgi`` puts them in the host's ASGI router)."""

import asyncio
import contextlib
import json

from django.urls import path, re_path

from .consumers import NotificationConsumer

# The one WebSocket endpoint (notifications.asgi routes it; the page connects to it).
WS_PATH = "/ws/notifications/"
UNKNOWN_PATH_BODY = json.dumps({"error": {
    "code": "not_found", "message": "No WebSocket endpoint at this path; connect to /ws/notifications/."}}).encode()
# Seconds a refused handshake waits for the server to report the connection lost (see below).
DENIAL_LINGER = 1.0


async def unknown_path(scope, receive, send) -> None:
    """Refuse a handshake to a path no route serves (Channels' router would raise, an HTTP 500):
    HTTP 404 with a JSON body where the server has the ``websocket.http.response`` extension
    (uvicorn), else a plain refusal, which the server answers with HTTP 403 (daphne)."""
    await receive()  # websocket.connect
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send({"type": "websocket.http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "websocket.http.response.body", "body": UNKNOWN_PATH_BODY})
        # uvicorn 0.54's websockets-sansio counts the handshake as done only when the connection is
        # lost (its second websocket.disconnect), and logs an ERROR for an application that returns
        # before (uvicorn pull request #3138): wait for that, a bounded time on other servers.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DENIAL_LINGER):
                for _ in range(2):
                    await receive()
    else:
        await send({"type": "websocket.close"})


websocket_urlpatterns = [
    path(WS_PATH.lstrip("/"), NotificationConsumer.as_asgi()),
    # Last: every other path. An ASGI app, not the Django view django-stubs expect in a route.
    re_path(r"", unknown_path),  # type: ignore[arg-type]
]
