"""The REST API under ``/api/`` (django-ninja; OpenAPI schema at ``/api/openapi.json``).

Every error is JSON ``{"error": {"code", "message", "fields"?}}`` with its HTTP status.
Authentication: ``Authorization: Bearer <token>`` or the Django session (writes need CSRF).
"""

import json
import logging
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from ninja import NinjaAPI, Query, Schema, Status
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.parser import Parser
from ninja.security.http import HttpBearer
from ninja.utils import check_csrf
from pydantic import ConfigDict, Field, StrictBool, StrictInt, StrictStr, WithJsonSchema, create_model
from pydantic import ValidationError as PydanticValidationError

from . import conf, preferences, rate_limits, selectors, services, webpush
from .auth import (
    TOO_MANY_FAILURES,
    AuthFailure,
    bearer_from_header,
    counted,
    may_send,
    ticket_issue,
    token_authenticate,
)
from .http import error_body
from .models import Notification, Topic
from .protocol import is_storable_text, notification_payload
from .proxies import request_client_ip

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPES = ("application/json",)
# Primary keys are signed 64-bit integers; larger ids cannot exist (and overflow SQLite).
MAX_ID = 2**63 - 1


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, fields: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields


def error_response(status: int, code: str, message: str, fields: dict | None = None) -> JsonResponse:
    return JsonResponse(error_body(code, message, fields), status=status)


class ApiAuth(HttpBearer):
    """Bearer token, or else the Django session (with a CSRF check on writes)."""

    def __call__(self, request: HttpRequest):
        header = request.headers.get("Authorization")
        if header:
            try:
                return token_authenticate(bearer_from_header(header))
            except AuthFailure as failure:
                answer = counted(failure, request_client_ip(request) or "unknown")
                raise ApiError(429 if answer is TOO_MANY_FAILURES else 401, answer.code, answer.message) from None
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        if check_csrf(request) is not None:
            raise ApiError(403, "csrf_failed", "CSRF check failed: send the X-CSRFToken header with session auth.")
        return user

    def authenticate(self, request, token):  # pragma: no cover - __call__ does the work
        return None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class UnstorableText(ValueError):
    """A string in the body holds NUL or a lone surrogate (JSON escapes allow both; PostgreSQL stores neither)."""


def _check_strings(value) -> None:
    if isinstance(value, str):
        if not is_storable_text(value):
            raise UnstorableText
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


class StrictJsonParser(Parser):
    """Standard JSON only: ``NaN`` and ``Infinity`` are refused like any other bad JSON, and
    strings holding NUL or lone surrogates are refused as invalid."""

    def parse_body(self, request: HttpRequest):
        body = json.loads(request.body, parse_constant=_reject_constant)
        _check_strings(body)
        return body


api = NinjaAPI(
    title="Notifications API",
    version="1",
    urls_namespace="api",
    auth=ApiAuth(),
    openapi_url="/openapi.json",
    docs_url="/docs",
    parser=StrictJsonParser(),
)


@api.exception_handler(ApiError)
def _api_error(request, exc: ApiError):
    return error_response(exc.status, exc.code, exc.message, exc.fields)


@api.exception_handler(AuthenticationError)
def _unauthenticated(request, exc):
    return error_response(401, "unauthenticated", "Authentication required: a Bearer token or a session.")


def _field_name(loc) -> str | None:
    """The client's name for an error location: ("body", "payload", "users", 0, "str") -> "users.0".

    Drops where the value came from (body param, query, path) and pydantic's union member
    tags; ``None`` when the error is about the whole body.
    """
    parts = list(loc[2:] if loc[:1] == ("body",) else loc[1:])
    if not parts:
        return None
    return ".".join([str(parts[0])] + [str(part) for part in parts[1:] if isinstance(part, int)])


NOT_VALID = "The request is not valid."


def _error_fields(errors, where: tuple = ()) -> dict[str, str] | None:
    """``{field: message}`` of pydantic errors (their locations under ``where``); None when an
    error is about the whole value (it is not an object)."""
    fields: dict[str, str] = {}
    for e in errors:
        name = _field_name((*where, *e.get("loc", ())))
        if name is None:
            return None
        fields.setdefault(name, e.get("msg", "invalid"))
    return fields


@api.exception_handler(NinjaValidationError)
def _invalid(request, exc: NinjaValidationError):
    if any(e.get("type") == "json_invalid" for e in exc.errors):
        return error_response(400, "bad_json", "The body is not valid JSON.")
    fields = _error_fields(exc.errors)
    if fields is None:
        return error_response(400, "invalid", "The body must be a JSON object.")
    return error_response(400, "invalid", NOT_VALID, fields)


def _django_error(exc: DjangoValidationError) -> tuple[str, dict[str, str] | None]:
    """The message and fields of a service's ``ValidationError``."""
    if hasattr(exc, "error_dict"):
        return NOT_VALID, {name: " ".join(messages) for name, messages in exc.message_dict.items()}
    return " ".join(exc.messages), None


@api.exception_handler(DjangoValidationError)
def _django_invalid(request, exc: DjangoValidationError):
    return error_response(400, "invalid", *_django_error(exc))


@api.exception_handler(services.IdempotencyConflict)
def _idempotency_conflict(request, exc):
    return error_response(409, "idempotency_conflict", str(exc))


@api.exception_handler(OperationalError)
@api.exception_handler(InterfaceError)
def _database_unavailable(request, exc):
    logger.error("database unavailable for %s %s: %s", request.method, request.path, type(exc).__name__)
    response = error_response(503, "unavailable", "The database is unavailable; try again shortly.")
    response["Retry-After"] = "2"
    return response


@api.exception_handler(Http404)
def _not_found(request, exc):
    return error_response(404, "not_found", "Not found.")


@api.exception_handler(Notification.DoesNotExist)
def _notification_not_found(request, exc):
    return error_response(404, "not_found", str(exc) or "Not found.")


@api.exception_handler(services.TooManyTopics)
def _too_many_topics(request, exc):
    return error_response(409, "too_many_topics", str(exc))


@api.exception_handler(PermissionDenied)
def _forbidden(request, exc):
    return error_response(403, "forbidden", str(exc) or "You may not do this.")


HTTP_ERROR_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found"}


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    # django-ninja reports an unparsable body as HttpError(400) raised from the parser's error.
    if exc.status_code == 400 and isinstance(exc.__cause__, UnstorableText):
        return error_response(400, "invalid", "Strings may not contain NUL (\\u0000) or lone surrogates.")
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
        return error_response(400, "bad_json", "The body is not valid JSON.")
    return error_response(exc.status_code, HTTP_ERROR_CODES.get(exc.status_code, "error"), str(exc))


# Schemas


class Strict(Schema):
    model_config = ConfigDict(extra="forbid")


class NotificationIn(Strict):
    title: str = Field(min_length=1, max_length=services.TITLE_MAX)
    body: str = Field("", max_length=services.BODY_MAX)
    level: Literal["info", "success", "warning", "error"] = "info"
    data: dict[str, Any] | None = None
    link: str | None = Field(None, max_length=2000)
    users: list[StrictInt | StrictStr] | None = Field(
        None, max_length=services.USERS_MAX, description="Usernames or user ids."
    )
    topic: str | None = Field(None, description="A topic slug.")
    broadcast: StrictBool = False


class BatchItemIn(NotificationIn):
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200,
        description="A retry of the batch with the same key and content replays this item (200) instead of "
        "sending it again; the same key with other content is a 409 for this item.",
    )


# Items are validated one by one (an invalid item is that item's 400) with NotificationIn's own
# fields, on a plain pydantic model: ninja's Schema validates each object twice, through its
# Django-object wrapper, which would cost more than storing the item.
BatchItem = create_model(
    "BatchItem",
    __config__=ConfigDict(extra="forbid"),
    **{name: (info.annotation, info) for name, info in BatchItemIn.model_fields.items()},  # type: ignore[call-overload]
)


class BatchIn(Strict):
    # Each item is validated on its own (an invalid item is that item's 400, not the request's),
    # so the list holds any JSON value; the schema documents the item's shape.
    items: list[Annotated[Any, WithJsonSchema(BatchItemIn.model_json_schema())]] = Field(
        min_length=1, max_length=services.BATCH_MAX, description=f"1 to {services.BATCH_MAX} sends."
    )


class NotificationOut(Schema):
    id: int
    audience: str
    title: str
    body: str
    level: str
    data: dict[str, Any]
    link: str | None
    topic: str | None
    actor: str | None
    created_at: str
    read: bool


class SentOut(Schema):
    notifications: list[NotificationOut]


class InboxOut(Schema):
    results: list[NotificationOut]
    next_before: int | None = Field(description="Pass as ?before= to get the next page; null at the end.")


class InboxQuery(Schema):
    unread: bool = False
    before: int | None = Field(None, ge=1, le=MAX_ID)
    limit: int = Field(50, ge=1, le=selectors.INBOX_PAGE_MAX)


class UnreadOut(Schema):
    unread_count: int


class ReadOut(UnreadOut):
    id: int


class TopicOut(Schema):
    slug: str
    title: str
    private: bool
    following: bool


class TopicsOut(Schema):
    results: list[TopicOut]


class FollowOut(Schema):
    topic: str
    following: bool


class TicketOut(Schema):
    ticket: str
    expires_in: int
    url: str


class ErrorBody(Schema):
    code: str
    message: str
    fields: dict[str, str] | None = None


class ErrorOut(Schema):
    error: ErrorBody


class BatchItemOut(Schema):
    index: int = Field(description="The item's position in `items`.")
    status: Literal[200, 201, 400, 409] = Field(
        description="201 stored; 200 replayed (an earlier send with this idempotency key and content, not sent "
        "again); 400 invalid; 409 the idempotency key was used for different content."
    )
    notifications: list[NotificationOut] | None = Field(None, description="With 200 and 201.")
    error: ErrorBody | None = Field(None, description="With 400 and 409.")


class BatchOut(Schema):
    results: list[BatchItemOut] = Field(description="One per item, in item order.")


ERRORS = {
    400: ErrorOut, 401: ErrorOut, 403: ErrorOut, 404: ErrorOut, 413: ErrorOut, 415: ErrorOut, 429: ErrorOut,
    503: ErrorOut,
}


# Endpoints


def _impossible_ids(ids: list[int]) -> None:
    impossible = [i for i in ids if not 1 <= i <= MAX_ID]
    if impossible:
        raise ApiError(400, "invalid", NOT_VALID, {"users": f"Unknown or inactive user ids: {impossible[:20]}"})


def _users_by_name(names: Iterable[str]) -> dict[str, int]:
    """``{username: id}`` of the active users among ``names``: one query (none without names)."""
    User = get_user_model()
    return dict(
        User.objects.filter(**{f"{User.USERNAME_FIELD}__in": names}, is_active=True).values_list(
            User.USERNAME_FIELD, "pk"
        )
    )


def _refuse_unknown_names(names: list[str], by_name: dict[str, int]) -> None:
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ApiError(400, "invalid", NOT_VALID, {"users": f"Unknown users: {unknown[:20]}"})


def _resolve_audience_users(values: list[int | str]) -> list:
    ids = [v for v in values if isinstance(v, int)]
    names = [v for v in values if isinstance(v, str)]
    _impossible_ids(ids)
    by_name = _users_by_name(names)
    _refuse_unknown_names(names, by_name)
    return ids + list(by_name.values())


def _require_sender(user) -> None:
    if not may_send(user):
        raise ApiError(403, "forbidden", "Only staff with the 'add notification' permission may send.")


@api.post(
    "/notifications/",
    response={200: SentOut, 201: SentOut, 409: ErrorOut, **ERRORS},
    summary="Send a notification (staff)",
    description="With an `Idempotency-Key` header, a retry of the same request returns the first result "
    "(200) instead of sending again; the same key with a different body is a 409.",
)
def send_notification(request, payload: NotificationIn):
    user = request.auth
    _require_sender(user)
    audience: dict[str, Any] = {}
    if payload.users is not None:
        audience["users"] = _resolve_audience_users(payload.users)
    if payload.topic is not None:
        audience["topic"] = payload.topic
    if payload.broadcast:
        audience["broadcast"] = True
    rows = services.notification_send(
        title=payload.title,
        body=payload.body,
        level=payload.level,
        data=payload.data,
        link=payload.link,
        actor=user,
        idempotency_key=request.headers.get("Idempotency-Key"),
        **audience,
    )
    body = {"notifications": [notification_payload(n, is_read=False) for n in rows]}
    return Status(200 if rows.replayed else 201, body)


# One status for the request, 200, and one per item: the request succeeded (every item was
# processed and answered) even when some items were refused. 207 Multi-Status is WebDAV's, with an
# XML body; with 200 a client reads each item's status either way, and a non-200 always means the
# whole batch was refused or failed (400, 403, 503) and nothing of it was stored.
BATCH_STATUS = {"stored": 201, "replayed": 200, "invalid": 400, "conflict": 409}


@api.post(
    "/notifications/batch/",
    response={200: BatchOut, **ERRORS},
    summary="Send many notifications (staff)",
    description=f"1 to {services.BATCH_MAX} items, each the body of `POST /api/notifications/` plus an optional "
    "`idempotency_key`. 200 with one result per item, in order: 201 stored, 200 replayed (same key and content "
    "as an earlier send: nothing sent again), 400 invalid (with `error`), 409 key used for other content. A bad "
    "item never stops the others. The batch is one transaction, pushed after commit: a 503 stored nothing.",
)
def send_notification_batch(request, payload: BatchIn):
    user = request.auth
    _require_sender(user)
    results: list[dict[str, Any] | None] = [None] * len(payload.items)
    valid: list[tuple[int, Any]] = []
    for index, item in enumerate(payload.items):
        try:
            valid.append((index, BatchItem.model_validate(item)))
        except PydanticValidationError as exc:
            fields = _error_fields(exc.errors(include_url=False), ("body", "item"))
            if fields is None:
                results[index] = _item_error(index, 400, "invalid", "An item must be a JSON object.")
            else:
                results[index] = _item_error(index, 400, "invalid", NOT_VALID, fields)
    by_name = _users_by_name({v for _, item in valid for v in item.users or () if isinstance(v, str)})
    sends: list[tuple[int, dict[str, Any]]] = []
    for index, item in valid:
        send: dict[str, Any] = {"title": item.title, "body": item.body, "level": item.level, "data": item.data,
                                "link": item.link}
        if item.idempotency_key is not None:
            send["idempotency_key"] = item.idempotency_key
        try:
            if item.users is not None:
                ids = [v for v in item.users if isinstance(v, int)]
                names = [v for v in item.users if isinstance(v, str)]
                _impossible_ids(ids)
                _refuse_unknown_names(names, by_name)
                send["users"] = ids + [by_name[n] for n in names]
        except ApiError as exc:
            results[index] = _item_error(index, exc.status, exc.code, exc.message, exc.fields)
            continue
        if item.topic is not None:
            send["topic"] = item.topic
        if item.broadcast:
            send["broadcast"] = True
        sends.append((index, send))
    if sends:
        outcomes = services.notification_send_batch([send for _, send in sends], actor=user)
        for (index, _), outcome in zip(sends, outcomes, strict=True):
            results[index] = _item_result(index, outcome)
    # Built here from JSON-safe values: rendered without validating 1000 payloads against BatchOut again.
    return api.create_response(request, {"results": results}, status=200)


def _item_error(index: int, status: int, code: str, message: str, fields: dict | None = None) -> dict[str, Any]:
    return {"index": index, "status": status, **error_body(code, message, fields)}


def _item_result(index: int, outcome: services.ItemResult) -> dict[str, Any]:
    status = BATCH_STATUS[outcome.outcome]
    if isinstance(outcome.error, DjangoValidationError):
        return _item_error(index, status, "invalid", *_django_error(outcome.error))
    if outcome.error is not None:
        return _item_error(index, status, "idempotency_conflict", str(outcome.error))
    return {"index": index, "status": status,
            "notifications": [notification_payload(n, is_read=False) for n in outcome.notifications]}


@api.get("/notifications/", response={200: InboxOut, **ERRORS}, summary="Your inbox, newest first")
def list_notifications(request, query: Query[InboxQuery]):
    page = selectors.inbox_for(request.auth, unread_only=query.unread, before=query.before, limit=query.limit)
    return {
        "results": [notification_payload(n, is_read=n.is_read) for n in page],  # type: ignore[attr-defined]
        "next_before": page[-1].id if len(page) == query.limit else None,
    }


@api.get("/notifications/unread-count/", response={200: UnreadOut, **ERRORS})
def unread_count(request):
    return {"unread_count": selectors.unread_count_for(request.auth)}


@api.post("/notifications/read-all/", response={200: UnreadOut, **ERRORS}, summary="Mark all read")
def read_all(request):
    return {"unread_count": services.notification_mark_all_read(user=request.auth)}


def _require_possible_id(notification_id: int) -> None:
    """Ids outside the primary key range cannot exist: 404 without asking the database."""
    if not 1 <= notification_id <= MAX_ID:
        raise ApiError(404, "not_found", f"No notification with id(s) [{notification_id}] in your inbox.")


@api.post("/notifications/{int:notification_id}/read/", response={200: ReadOut, **ERRORS}, summary="Mark read")
def read_one(request, notification_id: int):
    _require_possible_id(notification_id)
    count = services.notification_mark_read(user=request.auth, ids=[notification_id])
    return {"id": notification_id, "unread_count": count}


@api.delete("/notifications/{int:notification_id}/", response={200: ReadOut, **ERRORS}, summary="Dismiss")
def dismiss(request, notification_id: int):
    _require_possible_id(notification_id)
    count = services.notification_dismiss(user=request.auth, notification_id=notification_id)
    return {"id": notification_id, "unread_count": count}


@api.get("/topics/", response={200: TopicsOut, **ERRORS}, summary="Topics you may follow")
def list_topics(request):
    return {"results": list(selectors.topics_for(request.auth))}


def _topic(slug: str) -> Topic:
    if not is_storable_text(slug):  # "%00" in the path: PostgreSQL cannot compare it
        raise Http404
    return get_object_or_404(Topic, slug=slug)


@api.post("/topics/{slug}/follow/", response={200: FollowOut, 409: ErrorOut, **ERRORS}, summary="Follow a topic")
def follow(request, slug: str):
    services.topic_follow(user=request.auth, topic=_topic(slug))
    return {"topic": slug, "following": True}


@api.delete("/topics/{slug}/follow/", response={200: FollowOut, **ERRORS}, summary="Unfollow a topic")
def unfollow(request, slug: str):
    services.topic_unfollow(user=request.auth, topic=_topic(slug))
    return {"topic": slug, "following": False}


@api.post("/ws-ticket/", response={201: TicketOut, **ERRORS}, summary="A one-time WebSocket ticket")
def ws_ticket(request):
    limit = conf.settings.TICKETS_PER_MINUTE
    if not rate_limits.hit("ticket", str(request.auth.pk), limit=limit):
        raise ApiError(429, "too_many_tickets", f"At most {limit} tickets per minute; reuse the connection.")
    ticket, ttl = ticket_issue(user=request.auth)
    return Status(201, {"ticket": ticket, "expires_in": ttl, "url": f"/ws/notifications/?ticket={ticket}"})


# Delivery preferences (docs/delivery.md, "Preferences")


class RuleIn(Strict):
    scope: StrictStr = Field(description="`own` (sent to you by name), `topic`, `broadcast` or `level`.")
    key: StrictStr = Field("", max_length=80, description="The topic's slug (`topic`), the level (`level`: info, "
                           "success, warning, error), or empty (`own`, `broadcast`).")
    email: StrictBool = False
    digest: StrictBool = False
    push: StrictBool = False


class DeliverySettingsIn(Strict):
    timezone: StrictStr = Field("UTC", max_length=64, description="An IANA time zone, e.g. `Europe/Paris`.")
    quiet_start: StrictStr | None = Field(None, description="`HH:MM` (24 hours), with `quiet_end`.")
    quiet_end: StrictStr | None = Field(None, description="`HH:MM`; before `quiet_start` when they cross midnight.")
    digest: Literal["off", "hourly", "daily"] = Field("daily", description="How often the digest is emailed.")
    push_only_offline: StrictBool = Field(True, description="Web Push only while no socket of yours is open.")


class PreferencesIn(Strict):
    # Rules and settings are checked by services.preferences_set, which names each bad field
    # (``rules.<index>.<field>``, ``settings.<field>``); the schema documents their shapes.
    rules: list[Annotated[Any, WithJsonSchema(RuleIn.model_json_schema())]] = Field(
        max_length=services.RULES_MAX, description="Every rule you want (the others are removed)."
    )
    settings: Annotated[Any, WithJsonSchema(DeliverySettingsIn.model_json_schema())] = Field(
        None, description="Your delivery settings; missing keys (or the whole object) at their defaults."
    )


class ChannelsOut(Schema):
    """The external channels a rule or default turns on."""

    email: bool
    digest: bool
    push: bool


class RuleOut(ChannelsOut):
    scope: str
    key: str


class DeliverySettingsOut(Schema):
    timezone: str
    quiet_start: str | None
    quiet_end: str | None
    digest: str
    push_only_offline: bool


class TopicDefaultOut(ChannelsOut):
    topic: str
    source: Literal["staff", "app"] = Field(description="`staff`: the topic's default; `app`: DELIVERY_DEFAULTS.")


class PreferencesOut(Schema):
    rules: list[RuleOut]
    settings: DeliverySettingsOut
    app_defaults: ChannelsOut = Field(
        description="The channels of a notification no rule of yours and no topic default decides "
                    "(DELIVERY_DEFAULTS): what \"own\" and \"broadcast\" deliver without a rule."
    )
    topic_defaults: list[TopicDefaultOut] = Field(
        description="For each topic you follow, the channels that apply when you have no rule for it."
    )


class TopicDefaultIn(Strict):
    email: StrictBool = False
    digest: StrictBool = False
    push: StrictBool = False


class TopicDefaultSetOut(ChannelsOut):
    topic: str


def _clock_text(value) -> str | None:
    return value.strftime("%H:%M") if value is not None else None


def _preferences_body(user) -> dict[str, Any]:
    delivery = preferences.delivery_settings_of(user)
    return {
        "rules": preferences.rules_of(user),  # (RuleOut reads the rows' fields)
        "settings": {"timezone": delivery.timezone, "quiet_start": _clock_text(delivery.quiet_start),
                     "quiet_end": _clock_text(delivery.quiet_end), "digest": delivery.digest,
                     "push_only_offline": delivery.push_only_offline},
        "app_defaults": {channel: channel in preferences.app_default_channels() for channel in preferences.CHANNELS},
        "topic_defaults": preferences.topic_defaults_for(user),
    }


@api.get("/preferences/", response={200: PreferencesOut, **ERRORS}, summary="Your delivery preferences")
def get_preferences(request):
    return _preferences_body(request.auth)


@api.put(
    "/preferences/",
    response={200: PreferencesOut, **ERRORS},
    summary="Replace your delivery preferences",
    description="Replaces every rule and the delivery settings. A bad rule or setting is a 400 naming the field "
    "(`rules.<index>.<field>`, `settings.<field>`); nothing is stored.",
)
def put_preferences(request, payload: PreferencesIn):
    settings = {} if payload.settings is None else payload.settings
    services.preferences_set(user=request.auth, rules=payload.rules, settings=settings)
    return _preferences_body(request.auth)


@api.put(
    "/topics/{slug}/defaults/",
    response={200: TopicDefaultSetOut, **ERRORS},
    summary="Set a topic's default channels (staff)",
    description="The channels of the topic's followers who have no rule of their own for it. Needs the "
    "'change topic' permission.",
)
def put_topic_defaults(request, slug: str, payload: TopicDefaultIn):
    if not request.auth.has_perm("notifications.change_topic"):
        raise ApiError(403, "forbidden", "Only staff with the 'change topic' permission may set topic defaults.")
    topic = _topic(slug)
    rule = services.topic_default_set(topic=topic, email=payload.email, digest=payload.digest, push=payload.push)
    return {"topic": topic.slug, "email": rule.email, "digest": rule.digest, "push": rule.push}


# Web Push subscriptions (docs/delivery.md, "Web Push")


class PushKeysIn(Strict):
    p256dh: StrictStr = Field(description="The browser's P-256 public key: base64url of the 65-byte uncompressed "
                              "point.")
    auth: StrictStr = Field(description="The browser's authentication secret: base64url of 16 bytes.")


class PushSubscriptionIn(Strict):
    # The fields are checked by services.push_subscription_add, which names each bad one
    # (``endpoint``, ``keys``, ``keys.p256dh``, ``keys.auth``); the schema documents their shapes.
    endpoint: Annotated[Any, WithJsonSchema({"type": "string", "maxLength": services.PUSH_ENDPOINT_MAX})] = Field(
        description="The push service's https:// URL for this browser."
    )
    keys: Annotated[Any, WithJsonSchema(PushKeysIn.model_json_schema())]
    expirationTime: float | None = Field(None, description="As the browser gives it (ignored).")


class PushEndpointIn(Strict):
    endpoint: StrictStr = Field(min_length=1, max_length=services.PUSH_ENDPOINT_MAX)


class PushSubscriptionOut(Schema):
    id: int
    endpoint: str
    created_at: str
    last_success_at: str | None = Field(description="When a push last reached it; null before the first.")


class PushOut(Schema):
    public_key: str | None = Field(description="The VAPID key to subscribe with (`applicationServerKey`, base64url); "
                                   "null when the site has none.")
    enabled: bool = Field(description="Whether the site sends Web Push (a VAPID key, and `push` a delivery channel).")
    subscriptions: list[PushSubscriptionOut] = Field(description="Your browsers' subscriptions, oldest first.")


def _push_subscription_body(row) -> dict[str, Any]:
    last = row.last_success_at
    return {"id": row.pk, "endpoint": row.endpoint, "created_at": row.created_at.isoformat(),
            "last_success_at": last.isoformat() if last else None}


@api.get("/push/", response={200: PushOut, **ERRORS}, summary="Web Push: the key to subscribe with, your browsers")
def get_push(request):
    key = None
    try:
        key = webpush.public_key() or None
    except (ValueError, ImportError):  # the key does not parse, or no py-vapid (notifications.E002, W007)
        logger.error("push: VAPID_PRIVATE_KEY cannot be used: `manage.py check` says why")
    return {"public_key": key, "enabled": key is not None and webpush.enabled(),
            "subscriptions": [_push_subscription_body(row) for row in webpush.subscriptions_of(request.auth)]}


@api.post(
    "/push/subscriptions/",
    response={200: PushSubscriptionOut, 201: PushSubscriptionOut, **ERRORS},
    summary="Web Push: add this browser",
    description="The body is the browser's `PushSubscription.toJSON()`. 201 stored (an endpoint another user had "
    "moves to you); 200 you had it already (its keys are updated). A bad field is a 400 naming it (`endpoint`, "
    "`keys.p256dh`, `keys.auth`). Beyond the most subscriptions a user keeps, your oldest is removed. 503 "
    "`push_disabled` for a valid subscription when the site sends no Web Push.",
)
def add_push_subscription(request, payload: PushSubscriptionIn):
    try:
        row, created = services.push_subscription_add(
            user=request.auth, subscription={"endpoint": payload.endpoint, "keys": payload.keys},
            user_agent=request.headers.get("User-Agent", ""),
        )
    except services.PushDisabled as exc:
        raise ApiError(503, "push_disabled", str(exc)) from None
    return Status(201 if created else 200, _push_subscription_body(row))


@api.delete(
    "/push/subscriptions/",
    response={204: None, **ERRORS},
    summary="Web Push: remove a browser",
    description="The body names the subscription: `{\"endpoint\": ...}`. 404 when you have none with that endpoint.",
)
def remove_push_subscription(request, payload: PushEndpointIn):
    if not services.push_subscription_remove(user=request.auth, endpoint=payload.endpoint):
        raise ApiError(404, "not_found", "You have no push subscription with this endpoint.")
    return Status(204, None)
