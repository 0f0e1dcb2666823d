from django.contrib import admin
from django.urls import include, path

from notifications import health, metrics
from notifications.api import api
from notifications.login import ThrottledLoginView, throttle_login
from notifications.views import index

urlpatterns = [
    path("", index, name="index"),
    # The admin's login, throttled like the site's own (notifications.login); before admin.site.urls.
    path("admin/login/", throttle_login(admin.site.login)),
    path("admin/", admin.site.urls),
    path("accounts/login/", ThrottledLoginView.as_view(), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/", api.urls),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
]
