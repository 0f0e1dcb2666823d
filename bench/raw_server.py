"""The ceiling: the ``websockets`` library's own server, fanning out with ``broadcast()``.

    python bench/raw_server.py PORT REDIS_URL CHANNEL

Every socket (any handshake is accepted; the ``Authorization`` header is ignored) joins
one set; every message published on the Redis pub/sub ``CHANNEL`` is written to all of
them with ``websockets.broadcast()`` (one encoded frame, no per-socket task, no
backpressure). Same Redis, same frames, same client as the product.
"""

import sys

import redis.asyncio as redis
from websockets.asyncio.server import broadcast, serve

CONNECTIONS = set()


async def handler(websocket):
    CONNECTIONS.add(websocket)
    try:
        await websocket.wait_closed()
    finally:
        CONNECTIONS.discard(websocket)


async def relay(url: str, channel: str) -> None:
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    async for message in pubsub.listen():
        if message["type"] == "message":
            broadcast(CONNECTIONS, message["data"], text=True)


async def main(port: int, url: str, channel: str) -> None:
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=2**20,
                     subprotocols=["notifications.v2"], ping_interval=20, ping_timeout=20):
        print("ready", flush=True)
        await relay(url, channel)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
