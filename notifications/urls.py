"""The app's URLs, for the host's URLconf under any prefix (docs/install.md)::

    path("notifications/", include("notifications.urls")),

They mount the page (``""``), the REST API with its OpenAPI schema and Swagger UI (``api/``) and,
inside the API, the WebSocket ticket endpoint. The API answers in JSON whatever happens under its
prefix, with no middleware for the host to add: each of its views is wrapped in ``api_view``
(body limits, JSON bodies only, Django's 405 and any unexpected exception as JSON errors), and
any other path under it is a JSON 404 (``api_not_found``, also the name by which the API's root
is found: ``api_root()``).
"""

import functools
import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponsePermanentRedirect
from django.urls import NoReverseMatch, Resolver404, URLPattern, path, re_path, resolve, reverse
from django.views.decorators.csrf import csrf_exempt

from . import conf, views
from .api import JSON_CONTENT_TYPES, api, error_response

logger = logging.getLogger(__name__)

API_ROOT_NAME = "notifications-api"


def api_root() -> str:
    """The path of the API's root in this site's URLconf (``/api/`` in this project)."""
    return _api_root(settings.ROOT_URLCONF)


@functools.lru_cache(maxsize=8)
def _api_root(urlconf: str) -> str:
    try:
        return reverse(API_ROOT_NAME, urlconf=urlconf, kwargs={"rest": ""})
    except NoReverseMatch:  # the URLconf does not include notifications.urls (a bare API): the default
        return "/api/"


def refusal(request: HttpRequest):
    """The JSON error for a request the API refuses before its view runs, or ``None``."""
    limit = conf.settings.API_MAX_BODY_BYTES
    try:
        length = int(request.headers.get("Content-Length") or 0)
    except ValueError:
        return error_response(400, "bad_request", "Content-Length is not a number.")
    try:
        too_large = length > limit or len(request.body) > limit
    except RequestDataTooBig:
        too_large = True
    if too_large:
        return error_response(413, "body_too_large", f"Request bodies are limited to {limit} bytes.")
    if request.body and (request.content_type or "") not in JSON_CONTENT_TYPES:
        return error_response(415, "unsupported_media_type", "Send the body as application/json.")
    return None


def api_view(view):
    """One of the API's views, answering every refusal and failure in JSON."""

    @functools.wraps(view)  # (keeps django-ninja's csrf_exempt: the API checks CSRF itself)
    def wrapped(request: HttpRequest, *args, **kwargs):
        refused = refusal(request)
        if refused is not None:
            return refused
        try:
            response = view(request, *args, **kwargs)
        except Exception:
            logger.exception("API view failed: %s %s", request.method, request.path)
            return error_response(500, "server_error", "The server failed to handle this request.")
        if response.status_code == 405 and not response.get("Content-Type", "").startswith("application/json"):
            answer = error_response(405, "method_not_allowed", f"Method {request.method} is not allowed here.")
            answer["Allow"] = response.get("Allow", "")
            return answer
        return response

    return wrapped


@csrf_exempt  # as the API's own views: the API checks CSRF itself, for session writes only
def api_not_found(request: HttpRequest, rest: str = ""):
    """Any path under the API that no endpoint serves. A write to a path without its final '/'
    lands here too, as a 404, not Django's redirect (a client would replay the write as a GET)."""
    refused = refusal(request)
    if refused is not None:
        return refused
    if not request.path.endswith("/"):
        if request.method in ("GET", "HEAD") and _is_endpoint(request.path_info + "/"):
            return HttpResponsePermanentRedirect(request.get_full_path(force_append_slash=True))  # (as APPEND_SLASH)
        return error_response(404, "not_found", "No such API endpoint (API paths end with '/').")
    return error_response(404, "not_found", "No such API endpoint.")


def _is_endpoint(path_info: str) -> bool:
    try:
        return resolve(path_info).url_name != API_ROOT_NAME
    except Resolver404:
        return False


def _guarded(urls):
    """django-ninja's URL patterns with every view wrapped in ``api_view``."""
    patterns, app_name, namespace = urls
    for pattern in patterns:
        if isinstance(pattern, URLPattern):
            pattern.callback = api_view(pattern.callback)
    return patterns, app_name, namespace


urlpatterns = [
    path("", views.index, name="notifications-page"),
    path("unsubscribe/<str:token>/", views.unsubscribe, name="notifications-unsubscribe"),
    path("api/", _guarded(api.urls)),
    re_path(r"^api/(?P<rest>[\s\S]*)$", api_not_found, name=API_ROOT_NAME),  # any character, newlines too
]
