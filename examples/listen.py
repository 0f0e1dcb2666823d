"""Listen to your notifications from a terminal: a minimal native WebSocket client to copy.

usage: python examples/listen.py URL TOKEN [--max-delay SECONDS]

URL is the site (``http://127.0.0.1:8123``, ``https://notify.example.com``: the socket is then
``ws(s)://HOST[:PORT]/ws/notifications/``, under the URL's path if it has one) or the socket
endpoint itself (``ws://127.0.0.1:8123/ws/notifications/``, ``wss://...``). TOKEN is an API token
(``python manage.py create_api_token USERNAME``), sent as ``Authorization: Bearer``.

Prints each frame as it arrives, one JSON object a line (``| jq`` reads them). After a lost
connection it reconnects with exponential backoff and full jitter, never sooner than the
``retry_after`` of the server's last ``error`` frame (close 4013), and resumes from its cursor
(``?since=u.1:17,b:3&epoch=...``, docs/protocol.md "Resuming"), so what was sent meanwhile
arrives too, once. Stops, with the reason and exit status 1, on close 4001, 4003 and 4426 and on
a handshake the server refuses with an HTTP 4xx (a wrong URL). Ctrl-C to stop.
"""

import argparse
import asyncio
import json
import random
import sys
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import websockets

SUBPROTOCOL = "notifications.v2"
WS_PATH = "/ws/notifications/"
BASE_DELAY, MAX_DELAY = 0.5, 30.0  # seconds: the reconnect delay is random in [0, min(MAX, BASE * 2^attempt)]
STABLE_AFTER = 5.0  # seconds a connection must stay up before the backoff starts over
# Close codes after which reconnecting cannot help (docs/protocol.md, "Close codes").
FINAL = {
    4001: "unauthenticated: check the token (python manage.py create_api_token USERNAME)",
    4003: "forbidden: the token was revoked or the user is inactive",
    4426: "the server no longer speaks this client's protocol: update it",
}
SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


def socket_url(url: str) -> str:
    """The WebSocket endpoint for a ws(s):// endpoint or an http(s):// site URL: the scheme becomes
    ws(s), and a path that does not already end in /ws/notifications/ gets it appended."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES or not parts.hostname:
        raise ValueError(f"{url!r} is not a ws://, wss://, http:// or https:// URL with a host")
    path = parts.path
    if not path.rstrip("/").endswith(WS_PATH.rstrip("/")):
        path = path.rstrip("/") + WS_PATH
    return urlunsplit((SCHEMES[parts.scheme.lower()], parts.netloc, path, parts.query, ""))


def resume_url(url: str, cursor: dict[str, int], epoch: str | None) -> str:
    """The URL to connect to: with ``?since=<cursor>&epoch=`` once there is a cursor to resume from."""
    if epoch is None:
        return url
    since = ",".join(f"{stream}:{offset}" for stream, offset in cursor.items())
    return f"{url}{'&' if '?' in url else '?'}since={since}&epoch={epoch}"


def show(frame: dict) -> None:
    print(json.dumps(frame), flush=True)


def why(code: int | None, error: dict | None) -> str:
    """``closed with 4003 (token_revoked: The token was revoked.)``: the close code and the server's reason."""
    text = f"closed with {code}"
    if error is not None:
        text += f" ({error.get('code')}: {error.get('message')})"
    return text


async def listen(url: str, token: str, on_frame: Callable[[dict], None] = show, *,
                 max_delay: float | None = None) -> str:
    """Hand every frame to ``on_frame``, reconnecting and resuming after a lost connection; return
    why it stopped (a close code of ``FINAL``, or a refused handshake). ``url``: as ``socket_url``
    takes it; ``max_delay``: the cap of the reconnect delay (``MAX_DELAY``)."""
    url = socket_url(url)
    cap = MAX_DELAY if max_delay is None else max_delay
    cursor: dict[str, int] = {}  # the offset of the last notification seen in each stream
    epoch = None  # hello's epoch: the store the cursor belongs to
    attempt = 0
    loop = asyncio.get_running_loop()
    while True:
        resuming, opened, error = epoch is not None, loop.time(), None
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
                        elif frame["type"] == "error" and "id" not in frame:  # the reason for the close to come
                            error = frame
                        on_frame(frame)
                except websockets.ConnectionClosed:
                    pass
            code = ws.close_code
            reason = why(code, error)
        except websockets.InvalidStatus as exc:  # refused before accepting: an HTTP answer, not a socket
            status = exc.response.status_code
            if 400 <= status < 500 and status not in (408, 429):
                return f"the server refused the WebSocket handshake with HTTP {status}: is {url} its endpoint?"
            code, reason = None, f"cannot connect: HTTP {status}"
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            code, reason = None, f"cannot connect: {exc}"
        if code in FINAL:
            return f"{reason}: {FINAL[code]}; not reconnecting"
        if code == 4400:  # the server refused the cursor: start afresh
            epoch = None
        if loop.time() - opened > STABLE_AFTER:
            attempt = 0
        delay = random.uniform(0, min(cap, BASE_DELAY * 2**attempt))  # noqa: S311 - jitter, not a secret
        retry_after = (error or {}).get("retry_after")
        if isinstance(retry_after, int | float):
            delay = max(delay, float(retry_after))  # an overloaded or degraded server (4013) says how long to stay away
        attempt += 1
        print(f"{reason}; reconnecting in {delay:.1f} s", file=sys.stderr, flush=True)
        await asyncio.sleep(delay)


def main(argv: list[str] | None = None) -> int | str:
    """The command line: listens until the server makes reconnecting pointless; returns why (exit status 1)."""
    parser = argparse.ArgumentParser(description="Print your notifications as they arrive.")
    parser.add_argument("url", metavar="URL",
                        help="the site (http://HOST:PORT) or its socket (ws://HOST:PORT/ws/notifications/)")
    parser.add_argument("token", metavar="TOKEN", help="an API token (python manage.py create_api_token USERNAME)")
    parser.add_argument("--max-delay", type=float, default=MAX_DELAY, metavar="SECONDS",
                        help=f"the cap of the reconnect delay (default: {MAX_DELAY:g})")
    args = parser.parse_args(argv)
    if args.url.startswith("ntf_"):
        parser.error("the URL comes first: listen.py URL TOKEN")
    try:
        socket_url(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(listen(args.url, args.token, max_delay=args.max_delay))  # a message: exit status 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
