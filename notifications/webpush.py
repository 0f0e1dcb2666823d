"""Web Push (RFC 8030, VAPID RFC 8292, aes128gcm RFC 8291) through pywebpush: the ``push`` channel.

``delivery.send_due("push")`` hands the claimed rows to ``send_pushes``, which sends each to
every ``PushSubscription`` of its user not in ``row.sent_to`` (one ``requests.Session`` per
call), and marks the row:

- 2xx: reached (its id joins ``sent_to``; ``last_success_at`` is set);
- 404 or 410: the subscription is gone and is deleted (not a failure of the row);
- 429, 5xx, a connection error or a timeout: the row is retried (``Retry-After`` honoured), and
  the retry skips the subscriptions in ``sent_to``;
- another 4xx (400, 403, 413): that subscription failed for good (named in the row's error);
  the row fails for good when no subscription was reached and none can be retried.

With ``DeliverySettings.push_only_offline`` (the default) a row is skipped while a socket of
its user is open (presence). The message is a compact JSON object (``payload``), decrypted by
the service worker ``notifications/static/notifications/sw.js``.

pywebpush and py-vapid are the app's optional ``[webpush]`` extra: imported when used.
"""

import base64
import functools
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone

from . import conf, delivery, mail
from .models import Delivery, DeliveryChannel, DeliverySettings, Notification, PushSubscription

logger = logging.getLogger(__name__)

# The plaintext's limit: aes128gcm adds 86 bytes of header, a padding byte and a 16-byte tag,
# and push services take at most 4096 bytes.
MAX_PAYLOAD_BYTES = 3800
INSTALL_HINT = "pip install 'django-live-notifications[webpush]' (pywebpush and py-vapid)"
GONE = (404, 410)


def enabled() -> bool:
    """Whether this site delivers Web Push: a VAPID key and ``push`` in ``DELIVERY_CHANNELS``."""
    return DeliveryChannel.PUSH in delivery.enabled_channels()


# VAPID keys


def b64url(data: bytes) -> str:
    """Unpadded base64url, as Web Push writes keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=4)
def _vapid(private_key: str):
    """The ``py_vapid.Vapid`` of a private key: PEM, or base64url of the raw 32-byte key or of DER.
    ``ValueError`` when it is none of them, or not a P-256 key."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from py_vapid import Vapid

    text = private_key.strip()
    try:
        if text.startswith("-----BEGIN"):
            vapid = Vapid(load_pem_private_key(text.encode(), password=None))
        else:
            vapid = Vapid.from_string(private_key=text)
    except Exception as exc:
        raise ValueError(f"not a PEM or base64url private key ({type(exc).__name__}: {exc})") from None
    key = vapid.private_key
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 (prime256v1) elliptic-curve key")
    return vapid


def vapid_key():
    """The parsed ``VAPID_PRIVATE_KEY`` (parsed once; ``ValueError`` when it does not parse)."""
    return _vapid(conf.settings.VAPID_PRIVATE_KEY)


def public_key_of(private_key: str) -> str:
    """The base64url uncompressed point (65 bytes) of a private key in any ``VAPID_PRIVATE_KEY`` form."""
    from cryptography.hazmat.primitives import serialization

    point = _vapid(private_key).public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b64url(point)


def public_key() -> str:
    """The key browsers subscribe with (``applicationServerKey``): ``VAPID_PUBLIC_KEY``, else
    derived from ``VAPID_PRIVATE_KEY``; "" without a private key."""
    if not conf.settings.VAPID_PRIVATE_KEY:
        return ""
    return conf.settings.VAPID_PUBLIC_KEY or public_key_of(conf.settings.VAPID_PRIVATE_KEY)


def generate_keys() -> tuple[str, str]:
    """A new pair: ``(private, public)``, the raw private key and the public point, base64url."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private = b64url(key.private_numbers().private_value.to_bytes(32, "big"))
    return private, public_key_of(private)


def _subject() -> str:
    return conf.settings.VAPID_SUBJECT or mail.site_url()


# Reads


def subscriptions_of(user) -> QuerySet[PushSubscription]:
    """The user's subscriptions, oldest first."""
    return PushSubscription.objects.filter(user_id=user.pk).order_by("created_at", "pk")


# The message


def payload(notification: Notification) -> str:
    """The JSON the service worker shows: compact, under ``MAX_PAYLOAD_BYTES`` (the body is cut)."""
    message: dict[str, Any] = {
        "id": notification.pk,
        "title": notification.title,
        "body": notification.body,
        "level": notification.level,
        "link": mail.absolute(notification.link) if notification.link else mail.inbox_url(),
        "tag": f"notification-{notification.pk}",
        "created_at": notification.created_at.isoformat(),
    }

    def encoded() -> bytes:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()

    text = encoded()
    if len(text) > MAX_PAYLOAD_BYTES:  # the longest start of the body that fits (binary search)
        body, fits, too_long = notification.body, 0, len(notification.body)
        while too_long - fits > 1:
            middle = (fits + too_long) // 2
            message["body"] = body[:middle] + "…"
            fits, too_long = (middle, too_long) if len(encoded()) <= MAX_PAYLOAD_BYTES else (fits, middle)
        message["body"] = body[:fits] + "…" if fits else ""
        text = encoded()
    if len(text) > MAX_PAYLOAD_BYTES:  # a very long link (or title): the inbox, and a shorter title
        message["link"] = mail.inbox_url()
        message["title"] = notification.title[:100]
        text = encoded()
    return text.decode()


# Sending


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class _Outcome:
    """What the sends of one row did."""

    def __init__(self, sent_to: Iterable[int]):
        self.sent_to = list(sent_to)
        self.reached: list[int] = []
        self.retry: list[str] = []
        self.retry_after: float | None = None
        self.permanent: list[str] = []


def _send_one(webpush, session, subscription: PushSubscription, data: str, vapid, outcome: _Outcome) -> bool:
    """Send to one subscription and note the outcome; False when the subscription is gone (deleted)."""
    import requests
    from pywebpush import WebPushException

    info = {"endpoint": subscription.endpoint, "keys": {"p256dh": subscription.p256dh, "auth": subscription.auth}}
    name = f"subscription {subscription.pk}"
    try:
        webpush(
            subscription_info=info, data=data, vapid_private_key=vapid,
            vapid_claims={"sub": _subject()},  # a fresh dict each time: pywebpush writes aud and exp into it
            content_encoding="aes128gcm", ttl=conf.settings.WEBPUSH_TTL, timeout=conf.settings.WEBPUSH_TIMEOUT,
            requests_session=session,
        )
    except WebPushException as exc:
        response = exc.response
        status = getattr(response, "status_code", None)
        if status is None:
            outcome.retry.append(f"{name}: {exc.message}")
        elif status in GONE:
            PushSubscription.objects.filter(pk=subscription.pk).delete()
            return False
        elif status == 429 or status >= 500 or status < 400:
            outcome.retry.append(f"{name}: HTTP {status} {response.reason}")
            wait = _retry_after(response.headers.get("Retry-After"))
            if wait is not None:
                outcome.retry_after = max(outcome.retry_after or 0.0, wait)
        else:
            outcome.permanent.append(f"{name}: HTTP {status} {response.reason}: {response.text[:200]}")
    except requests.RequestException as exc:  # connection refused or reset, a timeout, a TLS error
        outcome.retry.append(f"{name}: {type(exc).__name__}: {exc}")
    except Exception as exc:  # a VAPID claim refused (VAPID_SUBJECT), keys that do not load...
        outcome.retry.append(f"{name}: {type(exc).__name__}: {exc}")
    else:
        outcome.reached.append(subscription.pk)
        outcome.sent_to.append(subscription.pk)
    return True


def _mark(row: Delivery, token: str, outcome: _Outcome) -> None:
    sent_to = sorted(set(outcome.sent_to))
    if outcome.retry:
        reason = "; ".join(outcome.retry + outcome.permanent)
        delivery.mark_failed(row, token, reason, retry_after=outcome.retry_after, sent_to=sent_to)
    elif outcome.permanent and not sent_to:
        delivery.mark_failed(row, token, "; ".join(outcome.permanent), permanent=True, sent_to=sent_to)
    elif sent_to:
        delivery.mark_sent(row, token, error="; ".join(outcome.permanent), sent_to=sent_to)
    else:
        delivery.mark_skipped(row, token, "no push subscription")


def _online_users() -> set[int]:
    from .presence import get_presence

    try:
        return {connection.user_id for connection in get_presence().online()}
    except Exception as exc:  # presence unknown: push rather than lose the message
        logger.warning("push: presence unavailable, pushing as if no socket were open: %s: %s",
                       type(exc).__name__, exc)
        return set()


def send_pushes(rows: list[Delivery], token: str) -> None:
    """Send claimed ``push`` deliveries to their users' browsers, marking each as it goes."""
    try:
        import requests
        from pywebpush import webpush
    except ImportError as exc:
        delivery.fail_all(rows, token, f"Web Push is not installed ({exc}): {INSTALL_HINT}")
        return
    try:
        vapid = vapid_key()
    except ValueError as exc:
        delivery.fail_all(rows, token, f"VAPID_PRIVATE_KEY does not parse: {exc}")
        return
    user_ids = sorted({row.user_id for row in rows})
    by_user: dict[int, list[PushSubscription]] = defaultdict(list)
    for subscription in PushSubscription.objects.filter(user_id__in=user_ids).order_by("created_at", "pk"):
        by_user[subscription.user_id].append(subscription)
    always = set(DeliverySettings.objects.filter(user_id__in=user_ids, push_only_offline=False)
                 .values_list("user_id", flat=True))
    online = _online_users() if set(user_ids) - always else set()  # one look at presence per call
    gone: set[int] = set()
    reached: set[int] = set()
    with requests.Session() as session:
        for row in rows:
            if row.user_id in online and row.user_id not in always:
                delivery.mark_skipped(row, token, "a socket of the user was open")
                continue
            outcome = _Outcome(row.sent_to or [])
            data = payload(row.notification)
            for subscription in by_user[row.user_id]:
                if subscription.pk in gone or subscription.pk in outcome.sent_to:
                    continue
                if not _send_one(webpush, session, subscription, data, vapid, outcome):
                    gone.add(subscription.pk)
            _mark(row, token, outcome)
            reached.update(outcome.reached)
    # One statement per claim (and per 500 browsers), not per push; a crash before it loses only these times.
    now = timezone.now()
    for chunk in delivery.chunks(sorted(reached)):
        PushSubscription.objects.filter(pk__in=chunk).update(last_success_at=now)
