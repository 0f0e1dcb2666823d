"""Listen to your notifications from a terminal: a minimal native WebSocket client.

usage: python examples/listen.py TOKEN [ws://127.0.0.1:8000/ws/notifications/]
Prints each frame as it arrives; Ctrl-C to stop.
"""

import asyncio
import json
import sys

import websockets


async def listen(token: str, url: str) -> None:
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, subprotocols=["notifications.v1"]
    ) as ws:
        async for text in ws:
            print(json.dumps(json.loads(text), indent=None), flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    try:
        asyncio.run(listen(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "ws://127.0.0.1:8000/ws/notifications/"))
    except KeyboardInterrupt:
        pass
    except websockets.ConnectionClosed as closed:
        sys.exit(f"closed: {closed.rcvd.code if closed.rcvd else 'no close frame'}")
