"""WebSocket URL routes of the notifications app; include them in the project's ASGI router."""

from django.urls import path

from .consumers import NotificationConsumer

websocket_urlpatterns = [
    path("ws/notifications/", NotificationConsumer.as_asgi()),
]
