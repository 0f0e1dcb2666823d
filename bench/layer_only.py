"""The channel layer alone, as the hubs use it: 2 receivers (2 processes' hubs) in the broadcast
stream's group ``b``, one sender; core (``RedisChannelLayer``) or pub/sub (``RedisPubSubChannelLayer``).

    .venv/bin/python bench/layer_only.py [--messages 2000] [--rate 500]

For each layer: publish ``--messages`` at ``--rate`` per second and measure group_send → receive
latency at both receivers (p50, p99), then the same number back to back (messages per second
until both receivers have all). Redis at ``REDIS_URL``; keys under a unique prefix, flushed after.
Less sensitive to a busy machine than the end-to-end ``bench/scaleout.py``.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from project.layers import redis_channel_layer  # noqa: E402


def build(backend: str, prefix: str):
    from django.utils.module_loading import import_string

    config = redis_channel_layer(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), prefix, backend=backend)
    return import_string(config["BACKEND"])(**config["CONFIG"])


GROUP = "b"  # notifications.streams.BROADCAST: the group of the broadcast stream


def message(i: int) -> dict:
    """A stream message (``notifications.push.notification_message``) the size of a small notification frame."""
    return {"type": "stream.notification", "stream": GROUP, "offset": i + 1, "id": i + 1, "t": time.time(),
            "frame": "x" * 300}


def pct(values, q):
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


async def measure(backend: str, messages: int, rate: float) -> dict:
    prefix = f"bench-layer-{uuid.uuid4().hex[:8]}"
    sender, receivers = build(backend, prefix), [build(backend, prefix) for _ in range(2)]
    channels = []
    for layer in receivers:
        channel = await layer.new_channel()
        await layer.group_add(GROUP, channel)
        channels.append(channel)
    await asyncio.sleep(0.2)
    latencies: list[float] = []
    counts = [0, 0]

    async def receive(k):
        while True:
            message = await receivers[k].receive(channels[k])
            latencies.append(time.time() - message["t"])
            counts[k] += 1

    tasks = [asyncio.create_task(receive(k)) for k in range(2)]

    async def wait_for(total):
        deadline = time.monotonic() + 60
        while min(counts) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    for i in range(messages):
        await sender.group_send(GROUP, message(i))
        await asyncio.sleep(1 / rate)
    await wait_for(messages)
    paced = list(latencies)
    latencies.clear()
    started = time.perf_counter()
    for i in range(messages):
        await sender.group_send(GROUP, message(i))
    await wait_for(2 * messages)
    burst_seconds = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    for layer in (sender, *receivers):
        await layer.flush()
    return {"layer": backend, "messages": messages, "rate": rate, "paced_p50_ms": pct(paced, 0.5),
            "paced_p99_ms": pct(paced, 0.99), "burst_messages_per_s": round(messages / burst_seconds),
            "burst_p99_ms": pct(latencies, 0.99), "received": min(counts)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=500)
    args = parser.parse_args()
    results = [asyncio.run(measure(b, args.messages, args.rate)) for b in ("core", "pubsub", "core", "pubsub")]
    print(json.dumps(results, indent=2))
    out = Path(__file__).resolve().parent / "results" / f"layer-only-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"loadavg_1min": round(os.getloadavg()[0], 2), "results": results}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
