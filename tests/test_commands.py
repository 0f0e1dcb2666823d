"""Management commands: create_api_token (the app's) and demo_setup (this project's demo, project/demo/)."""

import re
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from notifications.auth import AuthFailure, token_authenticate
from notifications.models import ApiToken, Topic
from project.demo.management.commands.demo_setup import DEMO_PASSWORD

pytestmark = [pytest.mark.django_db]

TOKEN_LINE = re.compile(r"ntf_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


def run(command: str, *args, **options) -> str:
    """Run a command; return what it wrote to stdout."""
    out = StringIO()
    call_command(command, *args, stdout=out, **options)
    return out.getvalue()


def printed_tokens(output: str) -> list[str]:
    """The raw tokens of create_api_token's stdout, asserting that it holds nothing else."""
    assert output.endswith("\n")
    lines = output[:-1].split("\n")
    assert all(TOKEN_LINE.fullmatch(line) for line in lines), [line for line in lines if not TOKEN_LINE.fullmatch(line)]
    return lines


# create_api_token


def test_create_api_token_with_1000_new_users_prints_one_token_per_line_in_order():
    usernames = [f"user{i:04d}" for i in range(1000)][::-1]  # argument order is not alphabetical order
    tokens = printed_tokens(run("create_api_token", "--create-users", *usernames))

    assert len(tokens) == 1000
    assert len(set(tokens)) == 1000
    assert get_user_model().objects.filter(username__in=usernames).count() == 1000
    assert ApiToken.objects.count() == 1000
    for index in (0, 1, 2, 499, 500, 997, 998, 999):
        assert token_authenticate(tokens[index]).username == usernames[index]


def test_create_api_token_for_existing_users_keeps_argument_order_and_repeats(alice, bob):
    tokens = printed_tokens(run("create_api_token", "bob", "alice", "bob"))
    assert [token_authenticate(t).username for t in tokens] == ["bob", "alice", "bob"]
    assert ApiToken.objects.filter(user=bob).count() == 2


def test_create_api_token_mixes_existing_and_new_users_with_create_users(alice):
    tokens = printed_tokens(run("create_api_token", "--create-users", "newbie", "alice"))
    assert [token_authenticate(t).username for t in tokens] == ["newbie", "alice"]
    assert get_user_model().objects.count() == 2


def test_created_users_cannot_log_in_with_a_password():
    run("create_api_token", "--create-users", "carol")
    carol = get_user_model().objects.get(username="carol")
    assert not carol.has_usable_password()
    assert not carol.is_staff


def test_create_api_token_for_unknown_user_without_create_users_fails_and_creates_nothing(alice):
    with pytest.raises(CommandError, match="ghost"):
        run("create_api_token", "alice", "ghost")
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["alice"]
    assert not ApiToken.objects.exists()


def test_create_api_token_normalizes_usernames_like_django(alice):
    (token,) = printed_tokens(run("create_api_token", "--create-users", "\uff41lice"))  # fullwidth "a"
    assert token_authenticate(token) == alice
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["alice"]


@pytest.mark.parametrize(("name", "reason"), [
    ("Alice", "differs from the existing user 'alice' only by case"),
    ("alice ", "Enter a valid username"),
])
def test_create_api_token_refuses_lookalike_and_invalid_usernames(alice, name, reason):
    with pytest.raises(CommandError, match=reason):
        run("create_api_token", "--create-users", name)
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["alice"]
    assert not ApiToken.objects.exists()


def test_create_api_token_refuses_two_new_names_that_differ_only_by_case():
    with pytest.raises(CommandError, match="only by case"):
        run("create_api_token", "--create-users", "carol", "Carol")
    assert not get_user_model().objects.exists()


def test_create_api_token_with_staff_makes_senders(client, alice):
    tokens = printed_tokens(run("create_api_token", "--create-users", "--staff", "ops", "alice"))
    for username in ("ops", "alice"):
        user = get_user_model().objects.get(username=username)
        assert user.is_staff
        assert user.has_perm("notifications.add_notification")
    response = client.post(
        "/api/notifications/",
        {"title": "from ops", "users": ["alice"]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {tokens[0]}",
    )
    assert response.status_code == 201, response.content


def test_create_api_token_with_staff_twice_is_harmless(alice):
    run("create_api_token", "--staff", "alice")
    run("create_api_token", "--staff", "alice")
    alice = get_user_model().objects.get(username="alice")
    assert alice.user_permissions.filter(codename="add_notification").count() == 1


def test_create_api_token_without_staff_leaves_users_unprivileged(alice):
    run("create_api_token", "alice")
    alice = get_user_model().objects.get(username="alice")
    assert not alice.is_staff
    assert not alice.has_perm("notifications.add_notification")


def test_api_tokens_are_stored_hashed():
    tokens = printed_tokens(run("create_api_token", "--create-users", "alice", "bob"))
    for token, raw in zip(ApiToken.objects.order_by("pk"), tokens, strict=True):
        _, prefix, secret = raw.split("_", 2)
        assert token.prefix == prefix
        for field in ApiToken._meta.concrete_fields:
            value = str(field.value_from_object(token))
            assert raw not in value, field.name
            assert secret not in value, field.name


def test_create_api_token_sets_name_and_expiry(alice):
    token = printed_tokens(run("create_api_token", "--name", "ci", "--expires-days", "7", "alice"))[0]
    stored = ApiToken.objects.get()
    assert stored.name == "ci"
    assert (stored.expires_at - stored.created_at).days in (6, 7)
    assert token_authenticate(token) == alice


# demo_setup


def demo_tokens(output: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(\w+)\s+(?:staff|user)\s+token: (\S+)$", output, flags=re.MULTILINE))


def test_demo_setup_is_idempotent_and_replaces_demo_tokens(settings):
    settings.DEBUG = True
    first = demo_tokens(run("demo_setup"))
    second = demo_tokens(run("demo_setup"))

    User = get_user_model()
    assert sorted(User.objects.values_list("username", flat=True)) == ["admin", "alice", "bob"]
    assert set(first) == set(second) == {"admin", "alice", "bob"}
    for username in ("admin", "alice", "bob"):
        with pytest.raises(AuthFailure) as failure:
            token_authenticate(first[username])
        assert failure.value.code == "token_revoked"
        assert token_authenticate(second[username]).username == username
        assert User.objects.get(username=username).check_password(DEMO_PASSWORD)
    assert ApiToken.objects.filter(revoked_at__isnull=True).count() == 3
    assert [(u.username, u.is_staff) for u in User.objects.order_by("username")] == [
        ("admin", True),
        ("alice", False),
        ("bob", False),
    ]
    assert sorted(Topic.objects.values_list("slug", "private")) == [
        ("announcements", False),
        ("deploys", False),
        ("security", True),
    ]
    assert sorted(Topic.objects.get(slug="security").members.values_list("username", flat=True)) == ["admin", "alice"]


def test_demo_setup_keeps_tokens_not_made_by_it(settings, alice):
    settings.DEBUG = True
    own = printed_tokens(run("create_api_token", "alice"))[0]
    run("demo_setup")
    assert token_authenticate(own) == alice


def test_demo_admin_token_can_send(settings, client):
    settings.DEBUG = True
    tokens = demo_tokens(run("demo_setup"))
    response = client.post(
        "/api/notifications/",
        {"title": "hello", "broadcast": True},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {tokens['admin']}",
    )
    assert response.status_code == 201, response.content


def test_demo_setup_refuses_without_debug(settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="DEBUG"):
        run("demo_setup")
    assert not get_user_model().objects.exists()
    assert not ApiToken.objects.exists()


def test_demo_setup_runs_without_debug_when_forced(settings):
    settings.DEBUG = False
    tokens = demo_tokens(run("demo_setup", "--force"))
    assert sorted(tokens) == ["admin", "alice", "bob"]
