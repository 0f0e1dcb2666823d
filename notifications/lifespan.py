"""ASGI lifespan: log the app's system-check warnings at startup (a one-process configuration, a
key of ``NOTIFICATIONS`` the app does not know, origin rules that refuse the site) and start the
process's delivery worker (``DELIVERY_WORKER``); on shutdown, stop the worker (it finishes the
message it is sending), leave the stream groups and presence, and close the database threads'
connections, before the process exits.

uvicorn sends lifespan events (Daphne does not; there, a dead process's presence entries
expire after PRESENCE_TTL and its stream membership after the channel layer's group
expiry; messages sent to it meanwhile are simply never read).
"""

import asyncio
import logging

from . import db, delivery, metrics
from .checks import startup_warnings
from .hub import shutdown_hubs

logger = logging.getLogger(__name__)


async def lifespan(scope, receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            for warning in startup_warnings():
                logger.warning("%s (%s) %s", warning.msg, warning.id, warning.hint)
            delivery.start_worker()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            try:
                await shutdown_hubs()
            except Exception as exc:  # shutting down anyway; say why the cleanup was partial
                logger.warning("hub shutdown incomplete: %s: %s", type(exc).__name__, exc)
            await asyncio.to_thread(delivery.stop_worker)
            await asyncio.to_thread(db.shutdown)
            metrics.process_exit()
            await send({"type": "lifespan.shutdown.complete"})
            return
