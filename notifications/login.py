"""Password logins (the site's login page and the admin's), throttled per client address and username.

Failed passwords are counted per (client address, username), as django-axes does by default:
more than ``AUTH_FAILURES_PER_MINUTE`` for one pair in a minute, and that pair's next attempts
get 429 until the minute passes, even with the right password (else the throttle would still
answer which guess was right). Another user behind the same address (a NAT, a proxy) is not
affected, and nobody can lock a user out from an address the attacker does not share.
Every failed ``authenticate()`` of a request counts (Django's ``user_login_failed`` signal).
"""

import hashlib
from functools import wraps

from django.contrib.auth import views as auth_views
from django.contrib.auth.signals import user_login_failed
from django.dispatch import receiver
from django.http import HttpResponse
from django.utils.decorators import method_decorator

from . import conf, rate_limits
from .proxies import request_client_ip

TOO_MANY_PASSWORDS = "Too many failed logins for this user from your address; wait a minute."


def _pair(request, username: str) -> str:
    address = request_client_ip(request) or "unknown"
    return hashlib.sha256(f"{address}\n{username.strip().casefold()}".encode()).hexdigest()


def _limit() -> int:
    return conf.settings.AUTH_FAILURES_PER_MINUTE


@receiver(user_login_failed, dispatch_uid="notifications.login_failed")
def _count_failure(sender, credentials, request=None, **kwargs):
    if request is not None:
        rate_limits.hit("login", _pair(request, str(credentials.get("username", ""))), limit=_limit())


def throttle_login(view):
    """Answer 429 to a login POST whose (address, username) pair is over the limit, before the password is checked."""

    @wraps(view)
    def throttled(request, *args, **kwargs):
        if request.method == "POST" and rate_limits.blocked(
            "login", _pair(request, request.POST.get("username", "")), limit=_limit()
        ):
            return HttpResponse(TOO_MANY_PASSWORDS, status=429, content_type="text/plain")
        return view(request, *args, **kwargs)

    return throttled


@method_decorator(throttle_login, name="dispatch")
class ThrottledLoginView(auth_views.LoginView):
    """Django's LoginView, throttled, on the app's own sign-in page: the template is the app's
    (``notifications/login.html``), not ``registration/login.html``, which would shadow the host's.
    A host with its own page passes ``template_name`` to ``as_view()``."""

    template_name = "notifications/login.html"
