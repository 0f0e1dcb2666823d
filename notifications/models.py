"""Tables of the notification service: fields, constraints, indexes; no behaviour.

A notification has exactly one audience: one user (``recipient``), one topic, or
everyone (``broadcast``). A topic or broadcast notification is one row however many
users see it. Per-user read state lives beside it:

- ``InboxState.read_watermark``: every visible notification with ``id <= watermark``
  is read ("mark all read" moves it);
- ``Receipt``: one row per (user, notification) the user marked read or dismissed
  above the watermark.
"""

import functools
import secrets
import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q


class Level(models.TextChoices):
    INFO = "info"
    SUCCESS = "success"
    WARNING = "warning"
    ERROR = "error"


class Audience(models.TextChoices):
    USER = "user"
    TOPIC = "topic"
    BROADCAST = "broadcast"


class Topic(models.Model):
    slug = models.SlugField(max_length=80, unique=True)
    title = models.CharField(max_length=200)
    private = models.BooleanField(default=False, help_text="Only members may follow a private topic.")
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="member_topics")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Follow(models.Model):
    """A period during which a user follows a topic: they see its notifications created in it.

    Unfollowing ends the period (``ended_at``) instead of deleting it, so what the user
    already received stays in their inbox; following again starts a new period.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="follows")
    topic = models.ForeignKey(Topic, on_delete=models.CASCADE, related_name="follows")
    created_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "topic"], condition=Q(ended_at__isnull=True), name="follow_one_active_per_topic"
            )
        ]

    def __str__(self) -> str:
        return f"{self.user_id} follows {self.topic_id}"


class Store(models.Model):
    """This store's identity (one row): ``epoch`` changes only if the database is replaced, so a
    client's cursor from another store is never taken for a position in this one."""

    epoch = models.CharField(max_length=32)

    def __str__(self) -> str:
        return f"store {self.epoch}"


class Stream(models.Model):
    """The numbering of one audience's notifications: ``head`` is the last offset given out.

    One stream per audience: ``u.<user id>`` (a user's personal notifications), ``t.<topic id>``
    (a topic's) and ``b`` (broadcasts). ``notification_send`` increments the audience's row in
    the sending transaction, which holds that row's lock until commit: offsets are gap-free and
    committed in offset order within a stream, so (stream, offset) is a cursor into it. Sends to
    different audiences never wait for each other.
    """

    key = models.CharField(max_length=40, unique=True)
    head = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.key}@{self.head}"


def ensure_store() -> str:
    """The store's epoch, creating the row if it is missing (a migration creates it; a flushed
    test database loses it, and then the store starts over with a new epoch)."""
    epoch = Store.objects.filter(pk=1).values_list("epoch", flat=True).first()
    if epoch is None:
        epoch = Store.objects.get_or_create(pk=1, defaults={"epoch": secrets.token_hex(8)})[0].epoch
    return epoch


class Notification(models.Model):
    id = models.BigAutoField(primary_key=True)
    audience = models.CharField(max_length=10, choices=Audience.choices)
    # The position in its audience's stream (``Stream``; ``notifications.streams``): gap-free and
    # committed in order within the stream; ids are not (they come from a sequence).
    offset = models.BigIntegerField()
    # Indexed by the composite (recipient, -id) and (topic, -id) indexes below.
    recipient = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="notifications",
        db_index=False,
    )
    topic = models.ForeignKey(
        Topic, null=True, blank=True, on_delete=models.CASCADE, related_name="notifications", db_index=False
    )
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True, max_length=10_000)
    level = models.CharField(max_length=10, choices=Level.choices, default=Level.INFO)
    data = models.JSONField(default=dict, blank=True)
    link = models.CharField(max_length=2000, blank=True, help_text="An http(s) URL or a path starting with /.")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.CheckConstraint(
                name="notification_one_audience",
                condition=(
                    Q(audience="user", recipient__isnull=False, topic__isnull=True)
                    | Q(audience="topic", recipient__isnull=True, topic__isnull=False)
                    | Q(audience="broadcast", recipient__isnull=True, topic__isnull=True)
                ),
            ),
            # One notification per position of each stream; also the replay's index.
            models.UniqueConstraint(fields=["recipient", "offset"], condition=Q(audience="user"),
                                    name="notif_user_stream_offset"),
            models.UniqueConstraint(fields=["topic", "offset"], condition=Q(audience="topic"),
                                    name="notif_topic_stream_offset"),
            models.UniqueConstraint(fields=["offset"], condition=Q(audience="broadcast"),
                                    name="notif_broadcast_stream_offset"),
        ]
        indexes = [
            # The inbox and the unread count walk each audience newest first.
            models.Index(fields=["recipient", "-id"], name="notif_recipient_id"),
            models.Index(fields=["topic", "-id"], name="notif_topic_id"),
            models.Index(fields=["-id"], condition=Q(audience="broadcast"), name="notif_broadcast_id"),
        ]

    def __str__(self) -> str:
        return self.title


class Receipt(models.Model):
    """One user's read/dismissed state for one notification (created lazily)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="receipts")
    read_at = models.DateTimeField(null=True, blank=True)
    dismissed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "notification"], name="receipt_unique_user_notification")
        ]

    def __str__(self) -> str:
        return f"{self.user_id}:{self.notification_id}"


class InboxState(models.Model):
    """Per-user inbox watermark: notifications with id <= read_watermark are read."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, primary_key=True, related_name="inbox_state"
    )
    read_watermark = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.user_id}@{self.read_watermark}"


class ApiToken(models.Model):
    """An API token. Only its SHA-256 hash is stored; the raw token is shown once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True, help_text="Visible part, to tell tokens apart.")
    key_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"ntf_{self.prefix}_…"


class WsTicket(models.Model):
    """A single-use, short-lived WebSocket ticket (only its hash is stored)."""

    key_hash = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "WebSocket ticket"

    def __str__(self) -> str:
        return f"ticket for {self.user_id}"


class IdempotencyKey(models.Model):
    """A send that may be retried: the same key and request return the first result."""

    scope = models.CharField(max_length=40, help_text="Whose key: 'user:<id>' of the sender, or empty.")
    key = models.CharField(max_length=200)
    request_hash = models.CharField(max_length=64)
    notification_ids = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["scope", "key"], name="idempotency_unique_scope_key")]

    def __str__(self) -> str:
        return f"{self.scope}:{self.key}"


class PreferenceScope(models.TextChoices):
    OWN = "own"
    TOPIC = "topic"
    BROADCAST = "broadcast"
    LEVEL = "level"


class Preference(models.Model):
    """One rule: which external channels deliver the notifications of one audience or level.

    ``key`` is the topic's slug (``topic``), the level's name (``level``), or empty (``own``,
    ``broadcast``). A row without a user is a staff default, only for a topic. The rule that
    applies is decided in one place: ``notifications.preferences``.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="notification_preferences",
        help_text="Empty: the staff default of a topic.",
    )
    scope = models.CharField(max_length=10, choices=PreferenceScope.choices)
    key = models.CharField(max_length=80, blank=True, help_text="The topic's slug, the level's name, or empty.")
    email = models.BooleanField(default=False)
    digest = models.BooleanField(default=False)
    push = models.BooleanField(default=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "scope", "key"], condition=Q(user__isnull=False), name="preference_unique_user_rule"
            ),
            models.UniqueConstraint(
                fields=["scope", "key"], condition=Q(user__isnull=True), name="preference_unique_staff_default"
            ),
            models.CheckConstraint(
                name="preference_staff_default_is_topic", condition=Q(user__isnull=False) | Q(scope="topic")
            ),
            models.CheckConstraint(
                name="preference_key_matches_scope",
                condition=Q(scope__in=["own", "broadcast"], key="") | (Q(scope__in=["topic", "level"]) & ~Q(key="")),
            ),
        ]
        # For each channel, the rules that turn it on, by audience or level: a send's one lookup
        # (preferences.may_deliver) and the planner's candidates never read the rules that mute,
        # nor those of a channel the site has off.
        indexes = [models.Index(fields=["scope", "key"], name=f"preference_{channel}_on",
                                condition=Q(**{channel: True})) for channel in ("email", "digest", "push")]

    def __str__(self) -> str:
        whose = f"user {self.user_id}" if self.user_id is not None else "staff default"
        return f"{whose}: {self.scope} {self.key}".rstrip()


@functools.cache
def time_zone_names() -> frozenset[str]:
    """The IANA time zone names ``zoneinfo`` knows (read once: it walks the zone files)."""
    return frozenset(zoneinfo.available_timezones())


def validate_time_zone(name: str) -> None:
    """Refuse a name that is not an IANA time zone known to ``zoneinfo``."""
    if name not in time_zone_names():
        raise ValidationError(f"Unknown time zone {name!r}: give an IANA name such as 'Europe/Paris'.")


class DigestFrequency(models.TextChoices):
    OFF = "off"
    HOURLY = "hourly"
    DAILY = "daily"


class DeliverySettings(models.Model):
    """A user's time zone, quiet hours (email and push wait until they end) and digest frequency."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, primary_key=True, related_name="delivery_settings"
    )
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_time_zone])
    quiet_start = models.TimeField(null=True, blank=True)
    quiet_end = models.TimeField(null=True, blank=True)
    digest = models.CharField(max_length=10, choices=DigestFrequency.choices, default=DigestFrequency.DAILY,
                              help_text="How often the notifications that rules send to the digest are emailed.")
    # Push only when no socket of the user is open (presence), or always.
    push_only_offline = models.BooleanField(default=True)
    # send_digests: when the last digest went out, and until when a run holds this user's digest.
    last_digest_at = models.DateTimeField(null=True, blank=True)
    digest_claim_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "delivery settings"
        verbose_name_plural = "delivery settings"
        constraints = [
            models.CheckConstraint(
                name="delivery_quiet_hours_both_or_neither",
                condition=Q(quiet_start__isnull=True, quiet_end__isnull=True)
                | Q(quiet_start__isnull=False, quiet_end__isnull=False),
            )
        ]

    def __str__(self) -> str:
        return f"delivery settings of {self.user_id}"


class DeliveryChannel(models.TextChoices):
    EMAIL = "email"
    DIGEST = "digest"
    PUSH = "push"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"  # due at ``due_at`` (a claim moves it on by the lease)
    SENT = "sent"
    FAILED = "failed"  # given up: ``error`` says why
    SKIPPED = "skipped"  # not sent, and never will be: ``error`` says why (read before its digest, no address)


class DeliveryJob(models.Model):
    """The notifications of one send whose external deliveries are still to be planned.

    Written in the sending transaction (one row per send, whatever its audience's size), read
    by the delivery worker after commit: it writes the ``Delivery`` rows the preferences ask for
    and deletes the job in one transaction, so a crash plans a send again and never twice
    (``Delivery`` is unique per notification, user and channel).
    """

    notification_ids = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)
    # When a worker may take it (a claim moves it on by the lease; a crashed claim comes back).
    due_at = models.DateTimeField(db_index=True)
    claim = models.CharField(max_length=32, blank=True)

    class Meta:
        verbose_name = "delivery job"

    def __str__(self) -> str:
        return f"job {self.pk}: {len(self.notification_ids)} notification(s)"


class Delivery(models.Model):
    """One notification to one user on one external channel: what happened, when, and why not.

    A worker claims a due row by moving ``due_at`` past now by the lease and writing its
    ``claim`` (one conditional UPDATE, so two workers never hold the same row), sends, and marks
    it at once. ``attempts`` counts the claims; failures wait with exponential backoff.
    """

    notification = models.ForeignKey(Notification, on_delete=models.CASCADE, related_name="deliveries")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    channel = models.CharField(max_length=10, choices=DeliveryChannel.choices)
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    due_at = models.DateTimeField()
    claim = models.CharField(max_length=32, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    # Push: the ids of the subscriptions it reached already (a retry skips them).
    sent_to = models.JSONField(default=list, blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(fields=["notification", "user", "channel"], name="delivery_unique_per_channel")
        ]
        indexes = [
            models.Index(fields=["channel", "due_at"], condition=Q(status="pending"), name="delivery_due"),
            models.Index(fields=["user", "channel"], condition=Q(status="pending"), name="delivery_pending_user"),
        ]

    def __str__(self) -> str:
        return f"{self.channel} of {self.notification_id} to {self.user_id}: {self.status}"


class PushSubscription(models.Model):
    """One browser's Web Push subscription (``PushManager.subscribe()``'s JSON) for one user."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="push_subscriptions")
    endpoint = models.URLField(max_length=2000, unique=True)
    p256dh = models.CharField(max_length=100, help_text="The browser's public key (base64url).")
    auth = models.CharField(max_length=40, help_text="The browser's authentication secret (base64url).")
    user_agent = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_success_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "push subscription"

    def __str__(self) -> str:
        return f"push subscription {self.pk} of {self.user_id}"


class SocketReceipt(models.Model):
    """How far a user's sockets got in one stream: every notification of ``stream`` up to
    ``offset`` was handed to a socket of the user (live or replayed), the last of them by ``at``.

    The socket channel's delivery record: one row per user and stream, not per notification, so a
    broadcast stays one row however many read it live. Written by each server process's hub
    every ``SOCKET_RECEIPTS_INTERVAL`` (``notifications.socket_receipts``).
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    stream = models.CharField(max_length=40)
    offset = models.BigIntegerField()
    at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["stream", "user"], name="socket_receipt_unique_stream_user")]

    def __str__(self) -> str:
        return f"{self.user_id} read {self.stream} to {self.offset}"
