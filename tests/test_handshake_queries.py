"""The written-out statements on the path of every handshake (``notifications.rows``): the token,
its user and the followed topics in one statement, the epoch and stream heads in another. Each
must give what the ORM gives, on SQLite and on PostgreSQL (the CI database)."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from notifications import auth, selectors, streams
from notifications.models import ApiToken, Follow, Store, Stream, Topic, ensure_store

pytestmark = [pytest.mark.django_db]


def test_the_token_and_its_user_are_what_the_orm_reads(alice):
    alice.first_name, alice.is_staff, alice.last_login = "Alice", True, timezone.now() - timedelta(days=1)
    alice.save()
    token, raw = auth.token_create(user=alice, name="laptop", expires_at=timezone.now() + timedelta(days=3))
    found, followed = auth.token_and_topics(raw)
    expected = ApiToken.objects.select_related("user").get(pk=token.pk)
    assert (found.pk, found.name, found.prefix, found.key_hash) == (token.pk, "laptop", token.prefix, token.key_hash)
    assert found.expires_at == expected.expires_at and found.created_at == expected.created_at
    assert found.expires_at.tzinfo is not None  # aware, as the ORM's (SQLite returns text)
    user_fields = [field.attname for field in get_user_model()._meta.concrete_fields]
    assert [getattr(found.user, name) for name in user_fields] == [getattr(expected.user, name) for name in user_fields]
    assert found.user.is_staff is True and found.user.is_superuser is False  # bools, not 1 and 0
    assert followed == {}


def test_the_followed_topics_come_with_the_token(alice, bob):
    first, second, ended, bobs = (Topic.objects.create(slug=slug, title=slug) for slug in ("a", "b", "c", "d"))
    Follow.objects.create(user=alice, topic=first)
    Follow.objects.create(user=alice, topic=second)
    Follow.objects.create(user=alice, topic=ended, ended_at=timezone.now())  # unfollowed: not followed now
    Follow.objects.create(user=bob, topic=bobs)
    _, raw = auth.token_create(user=alice)
    _, followed = auth.token_and_topics(raw)
    assert followed == selectors.followed_topics(alice) == {first.pk: "a", second.pk: "b"}
    assert auth.token_and_topics(raw, with_topics=False)[1] == {}


def test_a_handshake_lookup_is_one_statement(alice):
    Follow.objects.create(user=alice, topic=Topic.objects.create(slug="a", title="a"))
    _, raw = auth.token_create(user=alice)
    auth.token_and_topics(raw)  # sets last_used_at: the next lookups within a minute write nothing
    with CaptureQueriesContext(connection) as queries:
        auth.token_and_topics(raw)
        auth.token_lookup(raw)
    assert len(queries) == 2


@pytest.mark.parametrize("change", ["revoked", "expired", "inactive", "wrong secret", "unknown prefix"])
def test_every_refusal_of_the_orm_lookup_still_holds(alice, change):
    token, raw = auth.token_create(user=alice)
    if change == "revoked":
        ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
    elif change == "expired":
        ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    elif change == "inactive":
        type(alice).objects.filter(pk=alice.pk).update(is_active=False)
    elif change == "wrong secret":
        raw = raw[:-2] + ("AA" if not raw.endswith("AA") else "BB")
    else:
        raw = f"ntf_{'0' * 12}_{raw.split('_', 2)[2]}"
    expected = {"revoked": "token_revoked", "expired": "token_expired", "inactive": "user_inactive",
                "wrong secret": "invalid_token", "unknown prefix": "invalid_token"}[change]
    with pytest.raises(auth.AuthFailure) as refused:
        auth.token_and_topics(raw)
    assert refused.value.code == expected


def test_store_heads_in_one_statement_equal_the_orm_form(alice, bob):
    streams.reserve_counts({streams.user_stream(alice.pk): 2, streams.BROADCAST: 1})
    keys = [streams.user_stream(alice.pk), streams.user_stream(bob.pk), streams.BROADCAST]
    assert selectors.store_heads(keys) == (ensure_store(), streams.heads(keys))
    assert selectors.store_heads(keys)[1] == {streams.user_stream(alice.pk): 2, streams.user_stream(bob.pk): 0,
                                              streams.BROADCAST: 1}
    many = [streams.user_stream(n) for n in range(1, selectors.HEADS_IN_ONE_STATEMENT + 5)]  # the ORM form
    assert selectors.store_heads(many) == (ensure_store(), streams.heads(many))
    with CaptureQueriesContext(connection) as queries:
        selectors.store_heads(keys)
    assert len(queries) == 1


def test_store_heads_creates_a_missing_store_row(alice):
    Store.objects.all().delete()
    Stream.objects.create(key=streams.user_stream(alice.pk), head=3)
    epoch, heads = selectors.store_heads([streams.user_stream(alice.pk)])
    assert epoch == Store.objects.get(pk=1).epoch and heads == {streams.user_stream(alice.pk): 3}


# The API's sender check: one statement instead of has_perm's two queries, the same answer.

def _grant(user, codename, *, via_group=False, app_label="notifications"):
    from django.contrib.auth.models import Group, Permission

    permission = Permission.objects.get(codename=codename, content_type__app_label=app_label)
    if via_group:
        group, _ = Group.objects.get_or_create(name=f"senders-{codename}")
        group.permissions.add(permission)
        user.groups.add(group)
    else:
        user.user_permissions.add(permission)


@pytest.mark.parametrize("case", ["plain user", "staff without the permission", "staff with it", "staff via a group",
                                  "not staff with it", "superuser", "inactive superuser", "inactive staff with it",
                                  "staff with another permission", "staff with a same-named permission elsewhere"])
def test_may_send_answers_as_has_perm_does(make_user, case):
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType

    user = make_user(f"u-{abs(hash(case))}")
    user.is_staff = case not in ("plain user", "not staff with it")
    user.is_superuser = case in ("superuser", "inactive superuser")
    user.is_active = not case.startswith("inactive")
    user.save()
    if case in ("staff with it", "not staff with it", "inactive staff with it"):
        _grant(user, "add_notification")
    elif case == "staff via a group":
        _grant(user, "add_notification", via_group=True)
    elif case == "staff with another permission":
        _grant(user, "change_notification")
    elif case == "staff with a same-named permission elsewhere":
        other, _ = ContentType.objects.get_or_create(app_label="elsewhere", model="thing")
        Permission.objects.create(codename="add_notification", name="elsewhere", content_type=other)
        _grant(user, "add_notification", app_label="elsewhere")
    fresh = type(user).objects.get(pk=user.pk)
    expected = fresh.is_staff and fresh.has_perm("notifications.add_notification")
    assert auth.may_send(type(user).objects.get(pk=user.pk)) is expected
    assert expected is (case in ("staff with it", "staff via a group", "superuser"))


def test_may_send_asks_other_authentication_backends_as_django_does(make_user, settings):
    user = make_user("custom-backend")
    user.is_staff = True
    user.save()
    settings.AUTHENTICATION_BACKENDS = ["tests.test_handshake_queries.AllowEverything"]
    assert auth.may_send(user) is True


class AllowEverything:
    def authenticate(self, request, **credentials):
        return None

    def has_perm(self, user, perm, obj=None):
        return perm == "notifications.add_notification"
