"""ASGI entry point: HTTP (Django) and WebSocket (Channels) on one port.

Run with ``daphne project.asgi:application`` (or ``manage.py runserver`` in development).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()  # set up Django before importing consumers

from notifications.asgi import notifications_application  # noqa: E402

# HTTP to Django (oversize bodies refused before Django reads them), WebSocket to the app's
# routes behind its authentication, and the app's lifespan (docs/install.md).
application = notifications_application(django_asgi_app)
