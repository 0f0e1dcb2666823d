"""A host's URLconf that mounts the app under a prefix of its own (tests/test_app_urls.py)."""

from django.urls import include, path

urlpatterns = [path("notify/", include("notifications.urls"))]
