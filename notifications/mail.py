"""Email: one message per notification (the ``email`` channel) and digests, rendered from
templates a host can override, each with a signed one-click unsubscribe link (RFC 8058).

Templates (``notifications/email/`` in any template folder; a host's own come first):

- ``notification_subject.txt``, ``notification.txt``, ``notification.html``: one notification;
- ``digest_subject.txt``, ``digest.txt``, ``digest.html``: a digest.

Their context: ``user``, ``site_url``, ``inbox_url``, ``unsubscribe_url``, ``reason`` (why the
user gets it), and ``notification`` with its ``link_url`` (absolute), or ``notifications``
(each with ``link_url``) and ``more`` (how many more a digest left out).

The unsubscribe link is ``<SITE_URL><page>/unsubscribe/<token>/``: the token is signed with
Django's ``signing`` (salted, so no other signed value of the site passes for one), names the
user and the kind of email, and does not expire. GET shows a page with one button; POST (the
button, or a mail client's one-click ``List-Unsubscribe=One-Click``) turns that kind off:
``services.email_unsubscribe``.
"""

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

from django.conf import settings as django_settings
from django.core import signing
from django.core.mail import EmailMultiAlternatives, get_connection
from django.template.loader import render_to_string
from django.urls import reverse

from . import conf, delivery, preferences
from .models import Delivery, Notification

logger = logging.getLogger(__name__)

UNSUBSCRIBE_SALT = "notifications.unsubscribe"
DEBUG_SITE_URL = "http://localhost:8000"


def site_url() -> str:
    """``SITE_URL`` without its final '/' (with DEBUG and none set, http://localhost:8000)."""
    url = conf.settings.SITE_URL or (DEBUG_SITE_URL if django_settings.DEBUG else "")
    return url.rstrip("/")


def absolute(path_or_url: str) -> str:
    """An absolute URL: a path is joined to ``site_url()``; an http(s) URL is kept."""
    return urljoin(site_url() + "/", path_or_url)


def _domain() -> str:
    return urlsplit(site_url()).hostname or "localhost"


# Unsubscribe tokens


def unsubscribe_token(user_id: int, channel: str, notification: Notification | None = None) -> str:
    """A signed token that turns off ``channel`` (``email``: for this notification's audience and
    level; ``digest``: digests) for the user."""
    payload: dict[str, Any] = {"u": user_id, "c": channel}
    if notification is not None:
        scope, key = preferences.audience_rule(notification)
        payload |= {"s": scope, "k": key, "l": notification.level}
    return signing.dumps(payload, salt=UNSUBSCRIBE_SALT, compress=True)


def read_unsubscribe_token(token: str) -> dict[str, Any]:
    """The token's payload; ``signing.BadSignature`` for anything this site did not sign."""
    payload = signing.loads(token, salt=UNSUBSCRIBE_SALT)
    if not isinstance(payload, dict) or not isinstance(payload.get("u"), int) or payload.get("c") not in (
            "email", "digest"):
        raise signing.BadSignature("Not an unsubscribe token.")
    return payload


def unsubscribe_url(token: str) -> str:
    return absolute(reverse("notifications-unsubscribe", kwargs={"token": token}))


def inbox_url() -> str:
    return absolute(reverse("notifications-page"))


def describe(notification: Notification) -> str:
    """What kind of notification it is, for "why you get this email"."""
    return describe_audience(*preferences.audience_rule(notification))


def describe_audience(scope: str, key: str) -> str:
    """The audience (scope, key) of a rule in words: "the topic “deploys”", "broadcasts"..."""
    if scope == "topic":
        return f"the topic “{key}”"
    return "broadcasts" if scope == "broadcast" else "notifications sent to you"


def _message(user, subject: str, text: str, html: str, token: str, message_id: str) -> EmailMultiAlternatives:
    link = unsubscribe_url(token)
    headers = {
        "List-Unsubscribe": f"<{link}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        # The same id however often it is tried: a mailbox shows one message for repeats.
        "Message-ID": f"<{message_id}@{_domain()}>",
        "Auto-Submitted": "auto-generated",
    }
    from_email = conf.settings.EMAIL_FROM or django_settings.DEFAULT_FROM_EMAIL
    message = EmailMultiAlternatives(" ".join(subject.split()), text, from_email, [user.email], headers=headers)
    message.attach_alternative(html, "text/html")
    return message


def _with_link(notification: Notification) -> Notification:
    notification.link_url = absolute(notification.link) if notification.link else inbox_url()  # type: ignore[attr-defined]
    return notification


def notification_email(user, notification: Notification) -> EmailMultiAlternatives:
    """The email of one notification to one user."""
    token = unsubscribe_token(user.pk, "email", notification)
    context = {"user": user, "notification": _with_link(notification), "site_url": site_url(),
               "inbox_url": inbox_url(), "unsubscribe_url": unsubscribe_url(token),
               "reason": f"your email preferences for {describe(notification)}"}
    return _message(
        user,
        render_to_string("notifications/email/notification_subject.txt", context),
        render_to_string("notifications/email/notification.txt", context),
        render_to_string("notifications/email/notification.html", context),
        token, f"notification-{notification.pk}.user-{user.pk}",
    )


def digest_email(user, notifications: Sequence[Notification], more: int, frequency: str) -> EmailMultiAlternatives:
    """The digest of ``notifications`` (unread, oldest first) to one user; ``more`` left out."""
    token = unsubscribe_token(user.pk, "digest")
    context = {"user": user, "notifications": [_with_link(n) for n in notifications], "more": more,
               "count": len(notifications) + more, "frequency": frequency, "site_url": site_url(),
               "inbox_url": inbox_url(), "unsubscribe_url": unsubscribe_url(token),
               "reason": f"your {frequency} digest"}
    first, last = notifications[0].pk, notifications[-1].pk
    return _message(
        user,
        render_to_string("notifications/email/digest_subject.txt", context),
        render_to_string("notifications/email/digest.txt", context),
        render_to_string("notifications/email/digest.html", context),
        token, f"digest-{user.pk}.{first}-{last}",
    )


NO_ADDRESS = "the user has no email address"


class ConnectionFailed(Exception):
    """The email backend's connection could not be opened."""


class Mailer:
    """One connection of Django's email backend for a run of sends, opened at the first message
    and again after a failed send (the connection may be broken); ``close`` at the end."""

    def __init__(self) -> None:
        self.connection: Any = None  # a Django email backend

    def send(self, message) -> None:
        """Send one message; ``ConnectionFailed`` when no connection opens, else what the backend raises."""
        if self.connection is None:
            try:
                self.connection = get_connection()
                self.connection.open()
            except Exception as exc:
                self.connection = None
                raise ConnectionFailed(f"email backend unavailable: {type(exc).__name__}: {exc}") from exc
        try:
            sent = self.connection.send_messages([message])
        except Exception:
            self.close()
            raise
        if not sent:
            raise RuntimeError("the email backend sent nothing")

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception as exc:  # the messages are marked; a failed QUIT changes nothing
                logger.warning("email: closing the connection failed: %s: %s", type(exc).__name__, exc)


def send_emails(rows: list[Delivery], token: str) -> None:
    """Send claimed ``email`` deliveries over one connection (``Mailer``), marking each as it goes;
    when no connection opens, this row and the rest are tried again later."""
    mailer = Mailer()
    try:
        for index, row in enumerate(rows):
            if not row.user.email:
                delivery.mark_skipped(row, token, NO_ADDRESS)
                continue
            try:
                mailer.send(notification_email(row.user, row.notification))
            except ConnectionFailed as exc:
                delivery.fail_all(rows[index:], token, str(exc))
                return
            except Exception as exc:
                delivery.mark_failed(row, token, f"{type(exc).__name__}: {exc}")
                continue
            delivery.mark_sent(row, token)
    finally:
        mailer.close()
