"""Connect and resume storms against ``bin/serve`` with two workers (issue 14), bounded for CI:
a few hundred Bearer-token clients handshake at once, then drop at once and come back with their
cursors. Every handshake gets ``hello``, none is refused, and every resume is ``recovered`` with
what was sent while they were away, exactly once. ``bench/run.py --only storm`` runs the same
shape with 2,000 clients and measures the rates."""

import asyncio

import pytest
from asgiref.sync import sync_to_async

from tests.conftest import since
from tests.server import recv_json

pytestmark = [pytest.mark.server, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

CLIENTS = 300
IN_FLIGHT = 100  # handshakes at once
TIMEOUT = 120.0  # seconds for every phase: a bound, not a measurement
FRAME_TIMEOUT = 30.0  # seconds for one frame: 100 handshakes in line on a loaded 2-core machine


def _users_and_tokens(count: int) -> list[str]:
    from django.contrib.auth import get_user_model

    from notifications.auth import token_build
    from notifications.models import ApiToken

    user_model = get_user_model()
    users = user_model.objects.bulk_create([user_model(username=f"storm-{i}", password="!") for i in range(count)])
    built = [token_build(user=user) for user in users]
    ApiToken.objects.bulk_create([token for token, _ in built])
    return [raw for _, raw in built]


async def _connect(server, token: str, gate: asyncio.Semaphore, query: dict | None = None):
    async with gate:
        ws = await server.websocket(token=token, query=query)
        return ws, await recv_json(ws, FRAME_TIMEOUT)


async def _until_resumed(ws) -> tuple[list[dict], dict]:
    """The frames after hello up to ``resumed`` (the replay), and the ``resumed`` frame."""
    frames = []
    while True:
        frame = await recv_json(ws, FRAME_TIMEOUT)
        if frame["type"] == "resumed":
            return frames, frame
        frames.append(frame)


async def test_a_connect_storm_then_a_resume_storm_on_two_workers(serve, staff_token):
    tokens = await sync_to_async(_users_and_tokens)(CLIENTS)
    server = await asyncio.to_thread(serve, "storm", workers=2)
    gate = asyncio.Semaphore(IN_FLIGHT)

    async with asyncio.timeout(TIMEOUT):
        opened = await asyncio.gather(*(_connect(server, token, gate) for token in tokens), return_exceptions=True)
    failed = [repr(result) for result in opened if isinstance(result, BaseException)]
    assert failed == [], f"{len(failed)} of {CLIENTS} handshakes failed: {failed[:5]}"
    assert {hello["type"] for _, hello in opened} == {"hello"}

    # Every client drops at once; a broadcast is sent while they are away.
    await asyncio.gather(*(ws.close() for ws, _ in opened))
    sent = await server.request_async("POST", "/api/notifications/", token=staff_token,
                                      json_body={"title": "while you were away", "broadcast": True})
    assert sent.status == 201, sent.text
    [missed] = sent.json()["notifications"]

    async def resume(token: str, hello: dict):
        query = {"since": since(hello["cursor"]), "epoch": hello["epoch"]}
        ws, again = await _connect(server, token, gate, query)
        try:
            assert again["type"] == "hello", again
            return await _until_resumed(ws)
        finally:
            await ws.close()

    async with asyncio.timeout(TIMEOUT):
        pairs = zip(tokens, opened, strict=True)
        resumed = await asyncio.gather(*(resume(token, hello) for token, (_, hello) in pairs), return_exceptions=True)
    failed = [repr(result) for result in resumed if isinstance(result, BaseException)]
    assert failed == [], f"{len(failed)} of {CLIENTS} resumes failed: {failed[:5]}"
    assert all(done["recovered"] for _, done in resumed), [done for _, done in resumed if not done["recovered"]][:5]
    replayed = [[frame["id"] for frame in frames if frame["type"] == "notification"] for frames, _ in resumed]
    assert replayed == [[missed["id"]]] * CLIENTS  # each missed notification once, nothing else
