"""Django's login view, throttled per client address (failed passwords count like bad tokens)."""

from django.contrib.auth import views as auth_views
from django.http import HttpResponse

from .auth import TOO_MANY_FAILURES, failure_seen, failures_blocked
from .net import request_client_ip


class ThrottledLoginView(auth_views.LoginView):
    def post(self, request, *args, **kwargs):
        address = request_client_ip(request) or "unknown"
        if failures_blocked(address):
            return HttpResponse(TOO_MANY_FAILURES.message, status=429, content_type="text/plain")
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        failure_seen(request_client_ip(self.request) or "unknown")
        return super().form_invalid(form)
