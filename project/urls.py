from django.contrib import admin
from django.urls import include, path

from notifications import health, metrics
from notifications.login import ThrottledLoginView, throttle_login

urlpatterns = [
    # The page at /, the REST API at /api/ (a host picks any prefix: docs/install.md).
    path("", include("notifications.urls")),
    # The admin's login, throttled like the site's own (notifications.login); before admin.site.urls.
    path("admin/login/", throttle_login(admin.site.login)),
    path("admin/", admin.site.urls),
    path("accounts/login/", ThrottledLoginView.as_view(), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
]
