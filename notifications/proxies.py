"""The real client address of a request or WebSocket scope.

``X-Forwarded-For`` (and ``X-Real-IP``) are honoured only when the direct peer is a
trusted proxy (``TRUSTED_PROXIES``: addresses or networks). The header is read from
the right: each hop that is itself a trusted proxy is skipped, and the first address
that is not is the client. A forged header from an untrusted peer is ignored.
"""

import ipaddress
from functools import lru_cache

from . import conf


@lru_cache(maxsize=16)
def _networks(proxies: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in proxies if p.strip())


def _trusted(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _networks(tuple(conf.settings.TRUSTED_PROXIES)))


def _valid(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def client_ip(peer: str | None, forwarded_for: str | None, real_ip: str | None = None) -> str | None:
    """The client's address given the direct peer and the proxy headers' values."""
    if not peer or not _trusted(peer):
        return peer
    hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _valid(hop):
            return peer
        if not _trusted(hop):
            return hop
    if real_ip and _valid(real_ip.strip()):
        return real_ip.strip()
    return hops[0] if hops else peer


def scope_headers(scope) -> dict[str, str]:
    """An ASGI scope's headers as a dict of lower-case names (the last value of a repeated header wins,
    except X-Forwarded-For, whose values are joined)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name == "x-forwarded-for" and name in headers:
            value = f"{headers[name]}, {value}"
        headers[name] = value
    return headers


def scope_client_ip(scope) -> str | None:
    headers = scope_headers(scope)
    peer = (scope.get("client") or [None])[0]
    return client_ip(peer, headers.get("x-forwarded-for"), headers.get("x-real-ip"))


def request_client_ip(request) -> str | None:
    """The client address of a Django request."""
    meta = request.META
    return client_ip(meta.get("REMOTE_ADDR"), meta.get("HTTP_X_FORWARDED_FOR"), meta.get("HTTP_X_REAL_IP"))


class ForwardedProtoMiddleware:
    """Drop ``X-Forwarded-Proto`` unless the direct peer is a trusted proxy.

    Django's ``SECURE_PROXY_SSL_HEADER`` believes the header from anyone; this middleware,
    first in ``MIDDLEWARE`` (settings add both only when ``TRUSTED_PROXIES`` is set), makes
    it believe ``TRUSTED_PROXIES`` only. Without the header Django falls back to the server's
    own scheme (uvicorn's, which it took from a trusted proxy itself).
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if not _trusted(request.META.get("REMOTE_ADDR") or ""):
            request.META.pop("HTTP_X_FORWARDED_PROTO", None)
        return self.get_response(request)
