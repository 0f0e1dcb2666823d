"""Delivery preferences: the rule (notifications.preferences), quiet hours, the REST API, the admin."""

from datetime import UTC, datetime, time

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from notifications import preferences, selectors, services
from notifications.models import DeliverySettings, Preference, Topic

pytestmark = [pytest.mark.django_db]

PREFS = "/api/preferences/"
NOT_VALID = "The request is not valid."


def defaults_url(slug: str) -> str:
    return f"/api/topics/{slug}/defaults/"


@pytest.fixture
def deploys():
    return Topic.objects.create(slug="deploys", title="Deploys")


@pytest.fixture
def secret(alice):
    return Topic.objects.create(slug="secret", title="Secret", private=True)


def personal(user, level="info"):
    return services.notification_send(title="To you", users=[user], level=level)[0]


def topical(topic, level="info"):
    return services.notification_send(title="In a topic", topic=topic, level=level)[0]


def broadcast(level="info"):
    return services.notification_send(title="To all", broadcast=True, level=level)[0]


def rule(user, scope, key="", **channels):
    return Preference.objects.create(user=user, scope=scope, key=key, **channels)


def put(client, token, body):
    return client.put(PREFS, body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}")


# The rule


def test_without_any_rule_no_external_channel_delivers(alice, deploys):
    for notification in (personal(alice), topical(deploys), broadcast()):
        assert preferences.channels_for(alice, notification) == set()


def test_the_app_default_applies_when_no_rule_decides(alice, deploys, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_DEFAULTS": {"digest": True}}
    assert preferences.channels_for(alice, topical(deploys)) == {"digest"}


def test_each_audience_has_its_own_rule(alice, deploys):
    rule(alice, "own", email=True)
    rule(alice, "topic", "deploys", push=True)
    rule(alice, "broadcast", digest=True)
    assert preferences.channels_for(alice, personal(alice)) == {"email"}
    assert preferences.channels_for(alice, topical(deploys)) == {"push"}
    assert preferences.channels_for(alice, broadcast()) == {"digest"}


def test_staff_default_beats_app_default_and_user_rule_beats_staff_default(alice, bob, deploys, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_DEFAULTS": {"email": True}}
    services.topic_default_set(topic=deploys, email=False, digest=True, push=False)
    rule(alice, "topic", "deploys", push=True)
    notification = topical(deploys)
    assert preferences.channels_for(alice, notification) == {"push"}
    assert preferences.channels_for(bob, notification) == {"digest"}
    assert preferences.channels_for(bob, personal(bob)) == {"email"}  # a staff default is a topic's only


def test_the_level_rule_joins_the_audience_rule(alice, deploys):
    rule(alice, "level", "error", email=True)
    rule(alice, "topic", "deploys")  # "no email from deploys"
    assert preferences.channels_for(alice, topical(deploys, "info")) == set()
    assert preferences.channels_for(alice, topical(deploys, "error")) == {"email"}
    assert preferences.channels_for(alice, personal(alice, "error")) == {"email"}


def test_a_muted_topic_still_reaches_the_inbox(alice, deploys, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_DEFAULTS": {"email": True}}
    services.topic_follow(user=alice, topic=deploys)
    rule(alice, "topic", "deploys")
    notification = topical(deploys)
    assert "email" not in preferences.channels_for(alice, notification)
    assert notification.pk in [n.pk for n in selectors.inbox_for(alice)]


def test_many_users_are_decided_in_one_query(alice, bob, staff, deploys, django_assert_num_queries):
    services.topic_default_set(topic=deploys, email=True, digest=False, push=False)
    rule(alice, "topic", "deploys", push=True)
    rule(bob, "level", "warning", digest=True)
    notification = topical(deploys, "warning")
    with django_assert_num_queries(1):
        found = preferences.channels_for_users([alice.pk, bob.pk, staff.pk], notification)
    assert found == {alice.pk: {"push"}, bob.pk: {"email", "digest"}, staff.pk: {"email"}}


# Quiet hours


def quiet(user, start, end, zone="UTC"):
    return DeliverySettings.objects.create(user=user, timezone=zone, quiet_start=start, quiet_end=end)


def at(*parts) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def test_inside_quiet_hours_email_and_push_wait_until_they_end(alice):
    quiet(alice, time(12), time(14))
    assert preferences.held_until(alice, at(2025, 3, 1, 13, 0)) == at(2025, 3, 1, 14, 0)


def test_outside_quiet_hours_nothing_waits(alice, bob):
    quiet(alice, time(12), time(14))
    assert preferences.held_until(alice, at(2025, 3, 1, 14, 0)) is None
    assert preferences.held_until(alice, at(2025, 3, 1, 11, 59)) is None
    assert preferences.held_until(bob, at(2025, 3, 1, 13, 0)) is None  # no settings


def test_quiet_hours_crossing_midnight(alice):
    quiet(alice, time(22), time(7))
    assert preferences.held_until(alice, at(2025, 3, 1, 23, 30)) == at(2025, 3, 2, 7, 0)
    assert preferences.held_until(alice, at(2025, 3, 2, 6, 0)) == at(2025, 3, 2, 7, 0)
    assert preferences.held_until(alice, at(2025, 3, 2, 12, 0)) is None


def test_quiet_hours_are_in_the_users_time_zone(alice):
    quiet(alice, time(22), time(7), "Europe/Paris")  # UTC+1 in winter
    assert preferences.held_until(alice, at(2025, 1, 10, 21, 30)) == at(2025, 1, 11, 6, 0)
    assert preferences.held_until(alice, at(2025, 1, 10, 20, 30)) is None


def test_quiet_hours_on_a_dst_day(alice):
    quiet(alice, time(1), time(3), "America/New_York")  # 2025-03-09: 02:00 EST jumps to 03:00 EDT
    assert preferences.held_until(alice, at(2025, 3, 9, 6, 30)) == at(2025, 3, 9, 7, 0)  # 01:30 EST to 03:00 EDT


def test_held_until_for_many_users_in_one_query(alice, bob, django_assert_num_queries):
    quiet(alice, time(22), time(7))
    with django_assert_num_queries(1):
        found = preferences.held_until_for_users([alice.pk, bob.pk], at(2025, 3, 1, 23, 0))
    assert found == {alice.pk: at(2025, 3, 2, 7, 0), bob.pk: None}


# The REST API


def test_get_preferences_lists_rules_settings_and_followed_topics_defaults(client, alice, alice_token, deploys):
    services.topic_follow(user=alice, topic=deploys)
    services.topic_default_set(topic=deploys, email=True, digest=False, push=False)
    response = client.get(PREFS, HTTP_AUTHORIZATION=f"Bearer {alice_token}")
    assert (response.status_code, response.json()) == (200, {
        "rules": [],
        "settings": {"timezone": "UTC", "quiet_start": None, "quiet_end": None, "digest": "daily",
                     "push_only_offline": True},
        "app_defaults": {"email": False, "digest": False, "push": False},
        "topic_defaults": [{"topic": "deploys", "source": "staff", "email": True, "digest": False, "push": False}],
    })


def test_put_preferences_replaces_rules_and_settings(client, alice, alice_token, deploys):
    rule(alice, "broadcast", email=True)
    body = {
        "rules": [{"scope": "topic", "key": "deploys", "push": True},
                  {"scope": "level", "key": "error", "email": True}],
        "settings": {"timezone": "Europe/Paris", "quiet_start": "22:00", "quiet_end": "07:00", "digest": "daily"},
    }
    response = put(client, alice_token, body)
    assert (response.status_code, response.json()) == (200, {
        "rules": [
            {"scope": "level", "key": "error", "email": True, "digest": False, "push": False},
            {"scope": "topic", "key": "deploys", "email": False, "digest": False, "push": True},
        ],
        "settings": {"timezone": "Europe/Paris", "quiet_start": "22:00", "quiet_end": "07:00", "digest": "daily",
                     "push_only_offline": True},
        "app_defaults": {"email": False, "digest": False, "push": False},
        "topic_defaults": [],
    })
    assert preferences.channels_for(alice, broadcast()) == set()
    assert preferences.channels_for(alice, topical(deploys, "error")) == {"email", "push"}


@pytest.mark.parametrize(("body", "field"), [
    ({"rules": [{"scope": "everything"}]}, "rules.0.scope"),
    ({"rules": [{"scope": "level", "key": "fatal"}]}, "rules.0.key"),
    ({"rules": [{"scope": "topic", "key": "nope"}]}, "rules.0.key"),
    ({"rules": [{"scope": "own", "sms": True}]}, "rules.0.sms"),
    ({"rules": [{"scope": "own", "email": "yes"}]}, "rules.0.email"),
    ({"rules": [{"scope": "own"}, {"scope": "own"}]}, "rules.1.key"),
    ({"rules": [], "settings": {"timezone": "Mars/Olympus"}}, "settings.timezone"),
    ({"rules": [], "settings": {"quiet_start": "22:00"}}, "settings.quiet_end"),
    ({"rules": [], "settings": {"quiet_start": "25:00", "quiet_end": "07:00"}}, "settings.quiet_start"),
    ({"rules": [], "settings": {"digest": "weekly"}}, "settings.digest"),
    ({"rules": [], "settings": {"colour": "red"}}, "settings.colour"),
    ({"rules": [], "colour": "red"}, "colour"),
])
def test_bad_input_is_a_400_naming_the_field_and_stores_nothing(client, alice, alice_token, deploys, body, field):
    rule(alice, "own", email=True)
    good_rule = {"scope": "topic", "key": "deploys", "push": True}
    body = {**body, "rules": [good_rule, *body["rules"]]}
    field = field.replace("rules.1", "rules.2").replace("rules.0", "rules.1")
    response = put(client, alice_token, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["message"], list(error["fields"])) == ("invalid", NOT_VALID, [field])
    assert list(Preference.objects.filter(user=alice).values_list("scope", "email")) == [("own", True)]
    assert not DeliverySettings.objects.exists()


def test_a_private_topic_the_user_cannot_see_is_refused(client, alice, alice_token, secret):
    response = put(client, alice_token, {"rules": [{"scope": "topic", "key": "secret", "email": True}]})
    assert (response.status_code, response.json()) == (400, {"error": {
        "code": "invalid", "message": NOT_VALID, "fields": {"rules.0.key": "Unknown topic 'secret'."}}})
    secret.members.add(alice)
    assert put(client, alice_token, {"rules": [{"scope": "topic", "key": "secret"}]}).status_code == 200


def test_preferences_need_authentication(client):
    assert client.get(PREFS).json()["error"]["code"] == "unauthenticated"


def test_non_staff_cannot_set_topic_defaults(client, alice_token, staff_token, deploys):
    for token in (alice_token, staff_token):  # staff may send, but not change topics
        response = client.put(defaults_url("deploys"), {"email": True}, content_type="application/json",
                              HTTP_AUTHORIZATION=f"Bearer {token}")
        assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
    assert not Preference.objects.exists()


def test_staff_with_change_topic_sets_topic_defaults(client, staff, staff_token, deploys):
    staff.user_permissions.add(Permission.objects.get(content_type__app_label="notifications",
                                                      codename="change_topic"))
    response = client.put(defaults_url("deploys"), {"digest": True}, content_type="application/json",
                          HTTP_AUTHORIZATION=f"Bearer {staff_token}")
    assert (response.status_code, response.json()) == (
        200, {"topic": "deploys", "email": False, "digest": True, "push": False})
    missing = client.put(defaults_url("nope"), {}, content_type="application/json",
                         HTTP_AUTHORIZATION=f"Bearer {staff_token}")
    assert missing.status_code == 404
    extra = client.put(defaults_url("deploys"), {"sms": True}, content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {staff_token}")
    assert (extra.status_code, list(extra.json()["error"]["fields"])) == (400, ["sms"])


# The admin


@pytest.fixture
def root_client(django_user_model):
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", "pw-for-tests-1"))
    return client


def test_admin_pages_render(root_client, alice, deploys):
    preference = rule(alice, "topic", "deploys", email=True)
    staff_default = services.topic_default_set(topic=deploys, email=True, digest=False, push=False)
    settings_row = quiet(alice, time(22), time(7), "Europe/Paris")
    for url in (
        "/admin/notifications/preference/",
        "/admin/notifications/preference/?kind=staff&scope__exact=topic&email__exact=1",
        f"/admin/notifications/preference/{preference.pk}/change/",
        f"/admin/notifications/preference/{staff_default.pk}/change/",
        "/admin/notifications/preference/add/",
        "/admin/notifications/deliverysettings/",
        f"/admin/notifications/deliverysettings/{settings_row.pk}/change/",
    ):
        assert root_client.get(url).status_code == 200, url


def test_admin_refuses_a_staff_default_that_is_not_a_topics(root_client):
    response = root_client.post("/admin/notifications/preference/add/", {"scope": "own", "key": ""})
    assert response.status_code == 200 and "user" in response.context["adminform"].form.errors
    assert not Preference.objects.exists()


def test_a_topics_rules_follow_its_rename_and_go_with_its_deletion(alice):
    topic = Topic.objects.create(slug="deploys", title="Deploys")
    services.topic_default_set(topic=topic, email=True, digest=False, push=False)
    Preference.objects.create(user=alice, scope="topic", key="deploys", email=False, digest=True, push=False)
    topic.slug = "releases"
    topic.save()
    assert sorted(Preference.objects.values_list("key", flat=True)) == ["releases", "releases"]
    topic.delete()
    assert not Preference.objects.exists()
    again = Topic.objects.create(slug="releases", title="A new topic of that slug")
    assert not Preference.objects.filter(key=again.slug).exists()


def test_the_app_default_is_reported_for_rows_no_rule_decides(client, alice, alice_token, settings):
    settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "DELIVERY_DEFAULTS": {"email": True}}
    response = client.get(PREFS, HTTP_AUTHORIZATION=f"Bearer {alice_token}")
    assert response.json()["app_defaults"] == {"email": True, "digest": False, "push": False}
