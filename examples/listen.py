"""Listen to your notifications from a terminal: a minimal native WebSocket client.

usage: python examples/listen.py TOKEN [--url ws://127.0.0.1:8000/ws/notifications/]

Prints each frame as it arrives. After a lost connection it reconnects with exponential
backoff and full jitter and resumes from its cursor (``?since=u.1:17,b:3&epoch=...``), so
what was sent meanwhile arrives too. Stops on close 4001, 4003 and 4426. Ctrl-C to stop.
"""

import argparse
import asyncio
import json
import random
import sys
from collections.abc import Callable

import websockets

SUBPROTOCOL = "notifications.v2"
DEFAULT_URL = "ws://127.0.0.1:8000/ws/notifications/"
BASE_DELAY, MAX_DELAY = 0.5, 30.0  # seconds: the reconnect delay is random in [0, min(MAX, BASE * 2^attempt)]
STABLE_AFTER = 5.0  # seconds a connection must stay up before the backoff starts over
# Close codes after which reconnecting cannot help (docs/protocol.md, "Close codes").
FINAL = {
    4001: "unauthenticated: check the token (python manage.py create_api_token USERNAME)",
    4003: "forbidden: the token was revoked or the user is inactive",
    4426: "the server no longer speaks this client's protocol: update it",
}


def resume_url(url: str, cursor: dict[str, int], epoch: str | None) -> str:
    """The URL to connect to: with ``?since=<cursor>&epoch=`` once there is a cursor to resume from."""
    if epoch is None:
        return url
    since = ",".join(f"{stream}:{offset}" for stream, offset in cursor.items())
    return f"{url}{'&' if '?' in url else '?'}since={since}&epoch={epoch}"


def show(frame: dict) -> None:
    print(json.dumps(frame), flush=True)


async def listen(token: str, url: str = DEFAULT_URL, on_frame: Callable[[dict], None] = show) -> str:
    """Hand every frame to ``on_frame``, reconnecting and resuming after a lost connection;
    return why it stopped (one of ``FINAL``)."""
    cursor: dict[str, int] = {}  # the offset of the last notification seen in each stream
    epoch = None  # hello's epoch: the store the cursor belongs to
    attempt = 0
    loop = asyncio.get_running_loop()
    while True:
        resuming, opened, retry_after = epoch is not None, loop.time(), 0.0
        try:
            async with websockets.connect(
                resume_url(url, cursor, epoch),
                additional_headers={"Authorization": f"Bearer {token}"},
                subprotocols=[SUBPROTOCOL],
            ) as ws:
                try:
                    async for text in ws:
                        frame = json.loads(text)
                        if frame["type"] == "hello":
                            epoch = frame["epoch"]
                            if not resuming:  # else `resumed` says where we are
                                cursor = frame["cursor"]
                        elif frame["type"] == "notification":
                            cursor[frame["stream"]] = frame["offset"]
                        elif frame["type"] == "subscribed" and "offset" in frame:
                            cursor.setdefault(frame["stream"], frame["offset"])
                        elif frame["type"] == "resumed":
                            cursor = frame["cursor"]
                        elif frame["type"] == "error" and isinstance(frame.get("retry_after"), int | float):
                            retry_after = float(frame["retry_after"])
                        on_frame(frame)
                except websockets.ConnectionClosed:
                    pass
            code = ws.close_code
            reason = f"closed with {code}"
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            code, reason = None, f"cannot connect: {exc}"
        if code in FINAL:
            return f"closed with {code}: {FINAL[code]}"
        if code == 4400:  # the server refused the cursor: start afresh
            epoch = None
        if loop.time() - opened > STABLE_AFTER:
            attempt = 0
        delay = random.uniform(0, min(MAX_DELAY, BASE_DELAY * 2**attempt))  # noqa: S311 - jitter, not a secret
        delay = max(delay, retry_after)  # an overloaded server (4013) says how long to stay away
        attempt += 1
        print(f"{reason}; reconnecting in {delay:.1f} s", file=sys.stderr, flush=True)
        await asyncio.sleep(delay)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print your notifications as they arrive.")
    parser.add_argument("token", help="an API token (python manage.py create_api_token USERNAME)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the WebSocket endpoint (default: {DEFAULT_URL})")
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(listen(args.token, args.url)))
    except KeyboardInterrupt:
        pass
