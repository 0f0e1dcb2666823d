"""ASGI entry point: HTTP (Django) and WebSocket (Channels) on one port.

Run with ``daphne project.asgi:application`` (or ``manage.py runserver`` in development).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()  # set up Django before importing consumers

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from notifications.auth import WebSocketAuthMiddlewareStack  # noqa: E402
from notifications.http import BodyLimitMiddleware  # noqa: E402
from notifications.lifespan import lifespan  # noqa: E402
from notifications.routing import websocket_urlpatterns  # noqa: E402

# No AllowedHostsOriginValidator here: it refuses native clients that send no Origin.
# Origin is checked where it matters, for cookie-authenticated handshakes (notifications.auth).
application = ProtocolTypeRouter(
    {
        "http": BodyLimitMiddleware(django_asgi_app),  # oversize bodies refused before Django reads them
        "websocket": WebSocketAuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
        "lifespan": lifespan,
    }
)
