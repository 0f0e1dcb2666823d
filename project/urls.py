from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path

from notifications import health, metrics
from notifications.api import api
from notifications.login import ThrottledLoginView
from notifications.views import index

urlpatterns = [
    path("", index, name="index"),
    path("admin/", admin.site.urls),
    path("accounts/login/", ThrottledLoginView.as_view(), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/", api.urls),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
]
# With DEBUG=1, serve static files under plain `daphne` too (runserver does it on its own);
# with DEBUG=0 this adds nothing: serve STATIC_ROOT from the proxy.
urlpatterns += staticfiles_urlpatterns()
