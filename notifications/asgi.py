"""The app's side of a host's ASGI application: WebSocket routes behind the handshake's
authentication, the body limit in front of the host's HTTP app, and the app's lifespan work
chained with the host's own.

In the host's ``asgi.py`` (docs/install.md)::

    from django.core.asgi import get_asgi_application

    django_asgi_app = get_asgi_application()  # first: sets Django up

    from notifications.asgi import notifications_application

    application = notifications_application(django_asgi_app)

A host that routes more itself takes the parts: ``websocket_application()`` for its own
``ProtocolTypeRouter`` or ``URLRouter``, ``BodyLimitMiddleware`` for its HTTP app, and
``lifespan_chain(host_lifespan)``.
"""

import asyncio
import logging

logger = logging.getLogger(__name__)

# Everything else is imported when called, not when this module is: ``from notifications.asgi
# import notifications_application`` may come before ``get_asgi_application()`` sets Django up.


async def notifications_lifespan(scope, receive, send):
    from .lifespan import lifespan

    await lifespan(scope, receive, send)


def websocket_application():
    """The app's WebSocket routes (``/ws/notifications/``) behind the handshake's authentication.

    No ``AllowedHostsOriginValidator`` around it: it refuses native clients that send no Origin.
    Origin is checked where it matters, for cookie-authenticated handshakes (``notifications.auth``)."""
    from channels.routing import URLRouter

    from .auth import WebSocketAuthMiddlewareStack
    from .routing import websocket_urlpatterns

    return WebSocketAuthMiddlewareStack(URLRouter(websocket_urlpatterns))


def notifications_application(http_app, *, lifespan=None, websocket=None):
    """The host's whole ASGI application: HTTP to ``http_app`` (its oversize bodies refused before
    Django reads them), WebSocket to ``websocket`` (default: ``websocket_application()``), and a
    lifespan that runs the app's start and stop work and the host's own ``lifespan`` app, if any."""
    from channels.routing import ProtocolTypeRouter

    from .http import BodyLimitMiddleware

    return StartsDeliveryWorker(ProtocolTypeRouter({
        "http": BodyLimitMiddleware(http_app),
        "websocket": websocket if websocket is not None else websocket_application(),
        "lifespan": lifespan_chain(lifespan),
    }))


class StartsDeliveryWorker:
    """Starts this process's delivery worker (``DELIVERY_WORKER``) with the first event it serves:
    the lifespan's startup under uvicorn, the first request under a server that sends no lifespan
    events (Daphne, ``runserver``). Not at import: importing the application starts nothing."""

    def __init__(self, app):
        self.app = app
        self.started = False

    async def __call__(self, scope, receive, send):
        if not self.started:
            from . import delivery

            self.started = delivery.start_worker() is not None or not delivery.worker_enabled()
        return await self.app(scope, receive, send)


def lifespan_chain(host_lifespan=None):
    """An ASGI lifespan app: the app's startup, then the host's; at shutdown the host's first
    (its code may still send notifications), then the app's (leave groups and presence, close the
    database threads). Without ``host_lifespan`` it is the app's own."""
    if host_lifespan is None:
        return notifications_lifespan

    async def chained(scope, receive, send):
        ours: asyncio.Queue = asyncio.Queue()
        theirs: asyncio.Queue = asyncio.Queue()
        ours_sent: asyncio.Queue = asyncio.Queue()
        theirs_sent: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(notifications_lifespan(scope, ours.get, ours_sent.put)),
                 asyncio.create_task(host_lifespan(scope, theirs.get, theirs_sent.put))]
        try:
            while True:
                message = await receive()
                order = [(ours, ours_sent, tasks[0]), (theirs, theirs_sent, tasks[1])]
                if message["type"] == "lifespan.shutdown":
                    order.reverse()
                answer = {"type": message["type"] + ".complete"}
                for inbox, outbox, task in order:
                    await inbox.put(message)
                    reply = await _reply(outbox, task, message["type"])
                    if reply["type"].endswith(".failed"):
                        answer = reply
                        break
                await send(answer)
                if message["type"] == "lifespan.shutdown" or answer["type"].endswith(".failed"):
                    return
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return chained


async def _reply(outbox: asyncio.Queue, task: asyncio.Task, event: str) -> dict:
    """What one lifespan app answered ``event`` with; ``.failed`` if it ended without answering."""
    reply = asyncio.ensure_future(outbox.get())
    await asyncio.wait([reply, task], return_when=asyncio.FIRST_COMPLETED)
    if reply.done():
        return reply.result()
    reply.cancel()
    error = task.exception() if not task.cancelled() else None
    logger.error("a lifespan app ended without answering %s: %r", event, error)
    return {"type": f"{event}.failed", "message": f"{type(error).__name__}: {error}" if error else "ended"}
