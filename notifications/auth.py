"""Authentication: API tokens, WebSocket tickets, and the WebSocket handshake.

The handshake accepts, in this order:

1. ``Authorization: Bearer <token>`` (native clients; no Origin needed);
2. ``?ticket=<ticket>`` from ``POST /api/ws-ticket/`` (single use, short-lived);
3. the Django session cookie, only when ``Origin`` is allowed (cross-site WebSocket
   hijacking protection).

Tokens in the query string are refused: URLs end up in access logs. Raw tokens and
tickets are never stored (only SHA-256 hashes) and never logged.
"""

import functools
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import cast
from urllib.parse import parse_qs, urlsplit

from channels.auth import get_user
from channels.sessions import CookieMiddleware, InstanceSessionWrapper, SessionMiddleware
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser, Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections, transaction
from django.db.models import ManyToManyField
from django.http.request import validate_host
from django.utils import timezone

from . import conf, db, protocol, push, rate_limits
from .db import database_sync_to_async
from .models import ApiToken, Follow, Topic, WsTicket
from .outage_log import OutageLog
from .proxies import scope_client_ip
from .rows import Columns

TOKEN_PREFIX = "ntf"  # noqa: S105 - the public part of every token, not a secret
TICKET_PREFIX = "tkt"
LAST_USED_RESOLUTION = timedelta(minutes=1)
QUERY_TOKEN_PARAMS = ("token", "access_token", "bearer", "api_key", "authorization")


@dataclass
class AuthFailure(Exception):
    """Why a handshake or API request was refused: an error code, a close code and a message."""

    code: str
    message: str
    close_code: int = protocol.CLOSE_UNAUTHENTICATED
    retry_after: float | None = None  # seconds, for a 4013: come back then


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


# Failures that spend an attacker's guesses: counted per client address. Only failures are
# throttled: a valid token or ticket is always accepted, whatever its address did before (it
# cannot be guessed, and many users may share one address behind a NAT or a proxy).
COUNTED_FAILURES = {"invalid_token", "invalid_ticket", "token_expired", "token_revoked", "invalid_authorization"}
TOO_MANY_FAILURES = AuthFailure(
    "too_many_failures", "Too many failed attempts from your address; wait a minute.", protocol.CLOSE_RATE_LIMITED
)


# The database cannot be reached: the client should come back later (4013), not give up.
STORE_UNAVAILABLE = AuthFailure(
    "unavailable", "The server cannot check credentials right now; try again later.", protocol.CLOSE_TRY_AGAIN_LATER
)
unavailable = OutageLog(logging.getLogger(__name__))


def failure_seen(address: str) -> bool:
    """Count a failed token or ticket from ``address``; False once the address is over the limit
    (the failure is then answered ``too_many_failures``: 429, or close 4029)."""
    return rate_limits.hit("auth", address, limit=conf.settings.AUTH_FAILURES_PER_MINUTE)


def counted(failure: AuthFailure, address: str) -> AuthFailure:
    """The failure to answer: ``TOO_MANY_FAILURES`` for a counted failure over the address's limit."""
    if failure.code in COUNTED_FAILURES and not failure_seen(address):
        return TOO_MANY_FAILURES
    return failure


def token_create(*, user, name: str = "", expires_at=None) -> tuple[ApiToken, str]:
    """Create a token; return it and the raw token (shown once, never stored)."""
    token, raw = token_build(user=user, name=name, expires_at=expires_at)
    token.save()
    return token, raw


def token_build(*, user, name: str = "", expires_at=None) -> tuple[ApiToken, str]:
    """An unsaved token and its raw value (for ``bulk_create``)."""
    prefix = secrets.token_hex(6)
    raw = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    return ApiToken(user=user, name=name, prefix=prefix, key_hash=_hash(raw), expires_at=expires_at), raw


def token_authenticate(raw: str):
    """Return the active user of a raw token, or raise ``AuthFailure``."""
    return token_lookup(raw).user


def token_lookup(raw: str) -> ApiToken:
    """Return the valid token (with its active ``user``) for a raw token, or raise ``AuthFailure``."""
    return token_and_topics(raw, with_topics=False)[0]


def token_and_topics(raw: str, *, with_topics: bool = True) -> tuple[ApiToken, dict[int, str]]:
    """The valid token (with its active ``user``) for a raw token and the topics the user follows
    ({topic id: slug}; empty without ``with_topics``), or raise ``AuthFailure``.

    One written-out statement reads all three: a handshake's lookup costs 0.4 ms of CPU instead
    of 3 ms through the ORM (docs/performance.md). Nothing is cached: a revoked token or a
    deactivated user is refused at the next handshake or request."""
    parts = raw.split("_", 2) if isinstance(raw, str) else []
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise AuthFailure("invalid_token", "The token is not valid.")
    token, followed = _token_row(parts[1], with_topics)
    if token is None or not hmac.compare_digest(token.key_hash, _hash(raw)):
        raise AuthFailure("invalid_token", "The token is not valid.")
    now = timezone.now()
    if token.revoked_at is not None:
        raise AuthFailure("token_revoked", "The token was revoked.", protocol.CLOSE_FORBIDDEN)
    if token.expires_at is not None and token.expires_at <= now:
        raise AuthFailure("token_expired", "The token has expired.")
    if not token.user.is_active:
        raise AuthFailure("user_inactive", "The user is inactive.", protocol.CLOSE_FORBIDDEN)
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token, followed


@functools.cache
def _token_statement(with_topics: bool) -> tuple[str, Columns, Columns]:
    """The token and its user by prefix; with the followed topics, one row per topic (or one row
    with NULLs when the user follows none)."""
    user_model = get_user_model()
    token, user = Columns(ApiToken, "t"), Columns(user_model, "u")
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    sql = (f"SELECT {token.sql}, {user.sql}{', f.topic_id, tp.slug' if with_topics else ''} "  # noqa: S608 - only quoted names and placeholders are interpolated
           f"FROM {quote(ApiToken._meta.db_table)} t "
           f"JOIN {quote(user_model._meta.db_table)} u ON u.{quote(user_model._meta.pk.column)} = t.user_id ")
    if with_topics:
        sql += (f"LEFT JOIN {quote(Follow._meta.db_table)} f ON f.user_id = t.user_id AND f.ended_at IS NULL "
                f"LEFT JOIN {quote(Topic._meta.db_table)} tp ON tp.id = f.topic_id ")
    return sql + "WHERE t.prefix = %s", token, user


def _token_row(prefix: str, with_topics: bool) -> tuple[ApiToken | None, dict[int, str]]:
    sql, token_columns, user_columns = _token_statement(with_topics)
    connection = connections[DEFAULT_DB_ALIAS]  # this thread's connection (``django.db.connection`` is a proxy)
    with connection.cursor() as cursor:
        cursor.execute(sql, [prefix])
        rows = cursor.fetchall()
    if not rows:
        return None, {}
    first, split = rows[0], len(token_columns)
    token = cast(ApiToken, token_columns.build(first[:split], connection))
    token.user = user_columns.build(first[split : split + len(user_columns)], connection)  # type: ignore[assignment]
    followed = {row[-2]: row[-1] for row in rows if row[-2] is not None} if with_topics else {}
    return token, followed


SEND_PERMISSION = ("notifications", "add_notification")
MODEL_BACKEND = "django.contrib.auth.backends.ModelBackend"


def may_send(user) -> bool:
    """Whether ``user`` may send notifications: active staff with the ``add_notification``
    permission. ``user.has_perm`` loads every permission of the user and of their groups (two
    ORM queries, a third of an API send's CPU); with Django's default backend the same answer
    comes from one written-out statement. Other backends are asked as Django asks them."""
    if not (user.is_active and user.is_staff):
        return False
    if user.is_superuser:
        return True
    if list(settings.AUTHENTICATION_BACKENDS) != [MODEL_BACKEND] or not hasattr(user, "user_permissions"):
        return user.has_perm(".".join(SEND_PERMISSION))
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(_permission_statement(), [*SEND_PERMISSION, user.pk, user.pk])
        return cursor.fetchone() is not None


@functools.cache
def _permission_statement() -> str:
    """ModelBackend's rule for one permission: granted to the user, or to one of their groups."""
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    user_permissions = cast(ManyToManyField, get_user_model()._meta.get_field("user_permissions"))
    user_groups = cast(ManyToManyField, get_user_model()._meta.get_field("groups"))
    group_permissions = cast(ManyToManyField, Group._meta.get_field("permissions"))
    return (
        f"SELECT 1 FROM {quote(Permission._meta.db_table)} p "  # noqa: S608 - only quoted names and placeholders are interpolated
        f"JOIN {quote(ContentType._meta.db_table)} ct ON ct.id = p.content_type_id "
        "WHERE ct.app_label = %s AND p.codename = %s AND ("
        f"EXISTS (SELECT 1 FROM {quote(user_permissions.m2m_db_table())} up "
        f"WHERE up.{quote(user_permissions.m2m_reverse_name())} = p.id "
        f"AND up.{quote(user_permissions.m2m_column_name())} = %s) OR "
        f"EXISTS (SELECT 1 FROM {quote(user_groups.m2m_db_table())} ug "
        f"JOIN {quote(group_permissions.m2m_db_table())} gp "
        f"ON gp.{quote(group_permissions.m2m_column_name())} = ug.{quote(user_groups.m2m_reverse_name())} "
        f"WHERE gp.{quote(group_permissions.m2m_reverse_name())} = p.id "
        f"AND ug.{quote(user_groups.m2m_column_name())} = %s))"
    )


def token_revoke(token: ApiToken) -> None:
    """Revoke a token and close every live connection opened with it (after commit)."""
    with transaction.atomic():
        ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
        transaction.on_commit(lambda: push.connections_close(
            [token.user_id], code=protocol.CLOSE_FORBIDDEN, reason="token revoked", token_id=token.pk
        ))


def ticket_issue(*, user) -> tuple[str, int]:
    """Issue a single-use WebSocket ticket; return it and its lifetime in seconds."""
    ttl = conf.settings.WS_TICKET_TTL
    now = timezone.now()
    WsTicket.objects.filter(expires_at__lt=now).delete()
    raw = f"{TICKET_PREFIX}_{secrets.token_urlsafe(32)}"
    WsTicket.objects.create(key_hash=_hash(raw), user=user, expires_at=now + timedelta(seconds=ttl))
    return raw, ttl


def ticket_consume(raw: str):
    """Return the user of a valid ticket and spend it, or raise ``AuthFailure``."""
    ticket = WsTicket.objects.select_related("user").filter(key_hash=_hash(raw)).first()
    # delete() returning 1 means this call spent the ticket: a concurrent reuse gets 0.
    spent = ticket is not None and WsTicket.objects.filter(pk=ticket.pk).delete()[0] == 1
    if ticket is None or not spent or ticket.expires_at <= timezone.now():
        raise AuthFailure("invalid_ticket", "The ticket is unknown, used or expired.")
    if not ticket.user.is_active:
        raise AuthFailure("user_inactive", "The user is inactive.", protocol.CLOSE_FORBIDDEN)
    return ticket.user


# ``push.connections_close(session=ALL_SESSIONS)``: every session-authenticated connection of the user.
ALL_SESSIONS = "*"

# The hosts Django's HttpRequest.get_host() allows when DEBUG is on and ALLOWED_HOSTS is empty.
DEBUG_ALLOWED_HOSTS = [".localhost", "127.0.0.1", "[::1]"]


def session_digest(session_key: str) -> str:
    """Names one session in a close message without the session key itself (a credential)."""
    return hashlib.sha256(f"notifications.session:{session_key}".encode()).hexdigest()[:32]


def origin_allowed(origin: str | None, host: str | None, scheme: str = "ws") -> bool:
    """Whether a browser Origin may use cookie authentication: an exact entry of
    ``WS_ALLOWED_ORIGINS``, or the same origin as the site itself (the Origin's scheme matches
    the handshake's, ``https`` for ``wss`` and ``http`` for ``ws``; its host and port equal the
    handshake's Host header; and that host is in ``ALLOWED_HOSTS``, or, with ``DEBUG`` and an empty
    ``ALLOWED_HOSTS``, a localhost name, as for Django's HTTP requests). Another port or scheme on
    the same host is another origin: it is refused."""
    if not origin:
        return False
    allowed_origins = conf.settings.WS_ALLOWED_ORIGINS
    if origin in allowed_origins or "*" in allowed_origins:
        return True
    parsed = urlsplit(origin)
    expected_scheme = "https" if scheme in ("wss", "https") else "http"
    if parsed.scheme != expected_scheme or not parsed.hostname or not host:
        return False
    if parsed.netloc.lower() != host.lower():
        return False
    hostname = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:
        allowed_hosts = DEBUG_ALLOWED_HOSTS
    return validate_host(hostname, allowed_hosts)


def bearer_from_header(value: str) -> str:
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise AuthFailure("invalid_authorization", "Use 'Authorization: Bearer <token>'.")
    return credentials.strip()


class WebSocketAuthMiddleware:
    """Resolve the handshake's credentials into ``scope["user"]``.

    It never refuses the handshake itself: it records ``scope["auth_error"]`` so the
    consumer can accept and close with a code and a reason the client can see.
    """

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        scope = dict(scope, auth_token_id=None, auth_followed=None)
        address = scope_client_ip(scope) or "unknown"
        if db.overloaded():  # before any database work: answered at once, not after the queue
            scope["user"], scope["auth_method"] = AnonymousUser(), None
            scope["auth_error"] = AuthFailure(protocol.OVERLOADED, "The server is busy; try again later.",
                                              protocol.CLOSE_TRY_AGAIN_LATER, db.retry_after())
            return await self.inner(scope, receive, send)
        try:
            try:
                scope["user"], scope["auth_method"] = await self.resolve(scope)
            except (OperationalError, InterfaceError) as exc:
                unavailable.failure("cannot check WebSocket credentials: database unavailable", exc)
                raise STORE_UNAVAILABLE from None
            scope["auth_error"] = None
        except AuthFailure as failure:
            answer = failure
            if failure.code in COUNTED_FAILURES:
                answer = await database_sync_to_async(counted)(failure, address)
            scope["user"], scope["auth_method"], scope["auth_error"] = AnonymousUser(), None, answer
        return await self.inner(scope, receive, send)

    async def resolve(self, scope):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if any(name in query for name in QUERY_TOKEN_PARAMS):
            raise AuthFailure(
                "token_in_query",
                "Tokens are not accepted in the URL; send 'Authorization: Bearer' or use a ticket.",
            )
        if "authorization" in headers:
            credentials = bearer_from_header(headers["authorization"])
            token, scope["auth_followed"] = await database_sync_to_async(token_and_topics)(credentials)
            scope["auth_token_id"] = token.pk  # (the followed topics came with it: no query in the consumer)
            return token.user, "bearer"
        if "ticket" in query:
            return await database_sync_to_async(ticket_consume)(query["ticket"][0]), "ticket"
        session = scope.get("session")
        if session is not None and session.session_key:
            if not origin_allowed(headers.get("origin"), headers.get("host"), scope.get("scheme") or "ws"):
                raise AuthFailure(
                    "origin_not_allowed",
                    "Cookie authentication needs an allowed Origin.",
                    protocol.CLOSE_FORBIDDEN,
                )
            user = await get_user(scope)
            if user.is_authenticated:
                scope["auth_session"] = session_digest(session.session_key)
                return user, "session"
        raise AuthFailure("unauthenticated", "Authentication required: a Bearer token, a ticket or a session.")


class ReadOnlySessionMiddleware(SessionMiddleware):
    """Channels' ``SessionMiddleware`` without its wrapper around ``send``.

    The wrapper saves a changed session and sets its cookie on the response; a WebSocket
    here only reads the session (to authenticate the handshake) and cannot set a cookie
    after it is accepted, so there is nothing to save. It still ran on every frame sent:
    about a quarter of the server's CPU per delivered notification (docs/performance.md)."""

    async def __call__(self, scope, receive, send):
        wrapper = InstanceSessionWrapper(scope, send)
        await wrapper.resolve_session()
        return await self.inner(wrapper.scope, receive, send)


def WebSocketAuthMiddlewareStack(inner):  # noqa: N802 - named like Channels' AuthMiddlewareStack
    return CookieMiddleware(ReadOnlySessionMiddleware(WebSocketAuthMiddleware(inner)))
