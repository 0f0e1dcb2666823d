"""manage.py revoke_api_token: by prefix or by user; prints how many; closes live connections."""

from io import StringIO

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command

from notifications.auth import AuthFailure, token_authenticate, token_create
from notifications.models import ApiToken

from .conftest import MEMORY_LAYER

pytestmark = [pytest.mark.django_db(transaction=True)]


def revoke(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("revoke_api_token", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def refused(raw: str) -> str:
    with pytest.raises(AuthFailure) as failure:
        token_authenticate(raw)
    return failure.value.code


async def test_revoking_by_prefix_closes_the_connections_opened_with_that_token_only(layer, ws, alice):
    (stolen, stolen_raw), (_, kept_raw) = [await sync_to_async(token_create)(user=alice) for _ in range(2)]
    on_stolen, _ = await ws(stolen_raw)
    on_kept, _ = await ws(kept_raw)
    out, _ = await sync_to_async(revoke)(str(stolen))  # as the admin shows it: ntf_<prefix>_…
    assert out == "Revoked 1 API token.\n"
    assert await on_stolen.receive_json_from(timeout=5) == {
        "type": "error", "code": "disconnected", "message": "token revoked",
    }
    assert (await on_stolen.receive_output(timeout=5))["code"] == 4003
    await on_kept.send_json_to({"type": "ping"})
    assert await on_kept.receive_json_from(timeout=5) == {"type": "pong"}
    assert await sync_to_async(refused)(stolen_raw) == "token_revoked"
    again = await ws(stolen_raw, hello=False)
    assert (await again.receive_json_from(timeout=5))["code"] == "token_revoked"
    assert (await again.receive_output(timeout=5))["code"] == 4003


def test_revoking_by_user_revokes_every_active_token_of_that_user(alice, bob, settings):
    settings.CHANNEL_LAYERS = MEMORY_LAYER
    alice_raw = [token_create(user=alice)[1] for _ in range(3)]
    bob_raw = token_create(user=bob)[1]
    out, err = revoke("--user", "alice")
    assert out == "Revoked 3 API tokens.\n"
    assert "in-memory channel layer" in err  # the command cannot reach the servers' connections without Redis
    assert [refused(raw) for raw in alice_raw] == ["token_revoked"] * 3
    assert token_authenticate(bob_raw) == bob
    assert revoke("--user", "alice")[0] == "Revoked 0 API tokens.\n"  # already revoked


def test_a_whole_token_or_its_prefix_is_accepted_and_never_printed(alice):
    token, raw = token_create(user=alice)
    out, err = revoke(raw)
    assert out == "Revoked 1 API token.\n"
    assert raw.split("_", 2)[2] not in out + err
    token_create(user=alice)
    assert revoke(f"ntf_{ApiToken.objects.latest('pk').prefix}")[0] == "Revoked 1 API token.\n"


@pytest.mark.parametrize("args", [(), ("0123456789ab",), ("--user", "nobody")], ids=["nothing", "prefix", "user"])
def test_unknown_tokens_or_users_revoke_nothing(alice, args):
    _, raw = token_create(user=alice)
    with pytest.raises(CommandError):
        revoke(*args, "--user", "alice") if args else revoke()
    assert token_authenticate(raw) == alice
