"""Which external channels deliver a notification to a user, and until when quiet hours hold them.

The one place that decides (docs/delivery.md, "Preferences"): the channels of the notification's
audience rule, joined (set union) with those of its level rule.

- Audience rule: scope ``own`` for a personal notification, ``topic`` (key: the topic's slug)
  for a topic's, ``broadcast`` for a broadcast. The user's own rule, else (topics only) the
  staff default of the topic, else ``NOTIFICATIONS["DELIVERY_DEFAULTS"]``.
- Level rule: the user's rule of scope ``level`` for the notification's level, else nothing.

The socket and the inbox are not channels here: they always deliver. Every read of preferences
is in this module; writes go through ``services.preferences_set`` and ``services.topic_default_set``.
"""

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.db import connection
from django.db.models import Q

from . import conf, selectors
from .models import Audience, DeliverySettings, Notification, Preference, PreferenceScope

CHANNELS = ("email", "digest", "push")
# Channels that quiet hours hold until they end (digests are batched already).
HELD_CHANNELS = frozenset({"email", "push"})


def rule_channels(rule: Preference) -> set[str]:
    """The channels a rule turns on."""
    return {channel for channel in CHANNELS if getattr(rule, channel)}


def app_default_channels() -> set[str]:
    """The channels of ``NOTIFICATIONS["DELIVERY_DEFAULTS"]`` (missing keys are off)."""
    defaults = conf.settings.DELIVERY_DEFAULTS or {}
    return {channel for channel in CHANNELS if defaults.get(channel)}


def audience_rule(notification: Notification) -> tuple[str, str]:
    """The (scope, key) of the rule that decides for the notification's audience."""
    if notification.audience == Audience.USER:
        return PreferenceScope.OWN, ""
    if notification.audience == Audience.TOPIC:
        return PreferenceScope.TOPIC, notification.topic.slug if notification.topic is not None else ""
    return PreferenceScope.BROADCAST, ""


def default_channels(notification: Notification) -> set[str]:
    """The channels of a user with no rule of their own for ``notification``'s audience: the staff
    default of its topic, else the app's (before any level rule)."""
    return audience_default_channels(*audience_rule(notification))


def audience_default_channels(scope: str, key: str) -> set[str]:
    """``default_channels`` of the audience (scope, key) of a rule."""
    if scope == PreferenceScope.TOPIC:
        rule = Preference.objects.filter(user__isnull=True, scope=scope, key=key).first()
        if rule is not None:
            return rule_channels(rule)
    return app_default_channels()


def may_deliver(notifications: Iterable[Notification], channels: set[str]) -> bool:
    """Whether any user may get one of ``channels`` for any of ``notifications`` (of one send): a
    default turns one on, or some user has a rule for their audience or level that does. One
    indexed lookup; False means planning would find nobody, so a send need not store a job."""
    kinds: dict[tuple[str, str], Notification] = {}
    levels: set[str] = set()
    for notification in notifications:  # a send to many users: one kind, one level
        kinds.setdefault(audience_rule(notification), notification)
        levels.add(notification.level)
    if any(default_channels(notification) & channels for notification in kinds.values()):
        return True
    # Written out (the ORM took 3 ms of CPU per send to build it), as one probe of a partial index
    # per channel and audience (models.Preference): written as one OR of ANDs, PostgreSQL folds it
    # into "(email OR digest) AND (pairs)" and scans the table when many rules have email on.
    audiences = [*kinds, *((PreferenceScope.LEVEL, level) for level in sorted(levels))]
    qn = connection.ops.quote_name
    table, scope_column, key_column = qn(Preference._meta.db_table), qn("scope"), qn("key")
    probes: list[str] = []
    params: list[bool | str] = []
    for channel in sorted(channels):
        for scope, key in audiences:
            probes.append(f"EXISTS (SELECT 1 FROM {table} WHERE {qn(channel)} = %s "  # noqa: S608 - quoted names only
                          f"AND {scope_column} = %s AND {key_column} = %s)")
            params += [True, scope, key]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {' OR '.join(probes)}", params)
        return bool(cursor.fetchone()[0])


def channels_for_users(user_ids: Iterable[int], notification: Notification) -> dict[int, set[str]]:
    """``{user id: channels}`` for many users at once: one query for every rule that may apply."""
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        return {}
    scope, key = audience_rule(notification)
    wanted = Q(user_id__in=ids) & (Q(scope=scope, key=key) | Q(scope=PreferenceScope.LEVEL, key=notification.level))
    if scope == PreferenceScope.TOPIC:
        wanted |= Q(user__isnull=True, scope=scope, key=key)
    audience: dict[int, set[str]] = {}
    level: dict[int, set[str]] = {}
    fallback = app_default_channels()
    for rule in Preference.objects.filter(wanted):
        if rule.user_id is None:
            fallback = rule_channels(rule)  # the staff default beats the app's
        elif rule.scope == PreferenceScope.LEVEL:
            level[rule.user_id] = rule_channels(rule)
        else:
            audience[rule.user_id] = rule_channels(rule)
    return {uid: audience.get(uid, fallback) | level.get(uid, set()) for uid in ids}


def channels_for(user, notification: Notification) -> set[str]:
    """The external channels (a subset of ``CHANNELS``) that deliver ``notification`` to ``user``.

    Quiet hours do not remove a channel, they delay it: ``held_until(user, now)`` says until when.
    """
    return channels_for_users([user.pk], notification)[user.pk]


def quiet_end(settings: DeliverySettings | None, now: datetime) -> datetime | None:
    """The end (aware, UTC) of the quiet period ``now`` falls in, in the settings' time zone;
    None outside quiet hours or without them. A period may cross midnight (22:00 to 07:00)."""
    if settings is None or settings.quiet_start is None or settings.quiet_end is None:
        return None
    start, end = settings.quiet_start, settings.quiet_end
    if start == end:
        return None
    zone = ZoneInfo(settings.timezone)
    local = now.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    day: date = local.date()
    if start < end:
        if not start <= clock < end:
            return None
    elif clock >= start:  # crossing midnight, before it: the period ends tomorrow
        day += timedelta(days=1)
    elif clock >= end:
        return None
    # A wall-clock end that a DST change skips (02:30 on a spring-forward day) is read with the
    # offset before the change, which lands just after the gap.
    return datetime.combine(day, end.replace(tzinfo=None), tzinfo=zone).astimezone(UTC)


def held_until(user, now: datetime) -> datetime | None:
    """Until when quiet hours hold ``email`` and ``push`` for ``user`` (None: not held now)."""
    return held_until_for_users([user.pk], now)[user.pk]


def held_until_for_users(user_ids: Iterable[int], now: datetime) -> dict[int, datetime | None]:
    """``held_until`` of many users at once, in one query."""
    ids = list(dict.fromkeys(user_ids))
    found = {s.user_id: s for s in DeliverySettings.objects.filter(user_id__in=ids)}
    return {uid: quiet_end(found.get(uid), now) for uid in ids}


# Reads for the API and the admin


def rules_of(user) -> list[Preference]:
    """The user's own rules, in a stable order."""
    return list(Preference.objects.filter(user=user).order_by("scope", "key"))


def delivery_settings_of(user) -> DeliverySettings:
    """The user's delivery settings (the defaults, unsaved, when they never set any)."""
    return DeliverySettings.objects.filter(user_id=user.pk).first() or DeliverySettings(user_id=user.pk)


def staff_defaults(slugs: Iterable[str]) -> dict[str, Preference]:
    """``{slug: staff default}`` of the topics among ``slugs`` that have one."""
    rows = Preference.objects.filter(user__isnull=True, scope=PreferenceScope.TOPIC, key__in=list(slugs))
    return {rule.key: rule for rule in rows}


def topic_defaults_for(user) -> list[dict]:
    """The effective defaults of the topics ``user`` follows: the staff default, else the app's."""
    slugs = sorted(selectors.followed_topics(user).values())
    by_slug = staff_defaults(slugs)
    app = app_default_channels()
    result = []
    for slug in slugs:
        rule = by_slug.get(slug)
        channels = rule_channels(rule) if rule is not None else app
        result.append({"topic": slug, "source": "staff" if rule is not None else "app",
                       **{channel: channel in channels for channel in CHANNELS}})
    return result
