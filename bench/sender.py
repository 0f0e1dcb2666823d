"""Open-loop sender worker for ``bench/run.py``: sends at a fixed rate whatever the server does.

    python bench/sender.py MODE [options as JSON]

Reads one JSON command per line on stdin (``{"cmd": "send", "rate": R, "duration": D, ...}``)
and answers one JSON line. Send ``i`` is *scheduled* at ``t0 + i / R`` and carries that
time as ``data.ts``; it starts at its scheduled time even if earlier sends have not
finished (no coordinated omission: a slow send path shows up as latency).

Modes:

- ``product``: ``notification_send`` (broadcast, topic or users) in this process, which
  shares the database and Redis with the server: what a worker or a management command
  does. The ORM runs in a few threads (``sync_to_async``, ``threads`` option, default 4);
  the push after commit runs on this event loop's Redis connection.
- ``api``: ``POST /api/notifications/`` with a staff Bearer token to one user at a time
  (round robin over ``users``): API → frame latency. A small keep-alive HTTP/1.1 client.
- ``baseline``: ``group_send`` to the tutorial app's group on its channel layer.
- ``raw``: ``PUBLISH`` on the raw ``websockets`` server's Redis channel.
"""

import asyncio
import json
import os
import sys
import time

# The product's broadcast frame (notifications.v2: its stream and offset at the end), for the baselines.
FRAME_TEMPLATE = ('{{"type":"notification","id":{seq},"audience":"broadcast","title":"bench",'
                  '"body":"","level":"info","data":{{"ts":{ts:.6f},"seq":{seq}}},"link":null,"topic":null,'
                  '"actor":"bench-sender","created_at":"2026-01-01T00:00:00.000000+00:00","read":false,'
                  '"stream":"b","offset":{seq}}}')


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


class Sender:
    def __init__(self, mode: str, options: dict):
        self.mode, self.options = mode, options
        self.errors: dict[str, int] = {}
        self.done = 0
        self.lags: list[float] = []
        self.calls: list[float] = []
        self.seq = 0

    async def setup(self):
        if self.mode == "product":
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
            import django

            django.setup()
            from asgiref.sync import sync_to_async
            from django.contrib.auth import get_user_model

            from notifications.services import notification_send

            actor = await sync_to_async(get_user_model().objects.get)(username=self.options["actor"])

            def send_sync(i, ts, audience):
                return notification_send(title="bench", data={"ts": ts, "seq": i}, actor=actor, **audience)

            # Several threads (each with its own database connection), as several workers would send:
            # one thread serializes every send's round trips to PostgreSQL and Redis, and under load
            # that, not the server, caps the rate. Offsets stay gap-free and commit-ordered in each stream
            # (its row's lock); pushes may reach the hub out of order, which it handles.
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(max_workers=self.options.get("threads", 4))
            self._send_sync = sync_to_async(send_sync, thread_sensitive=False, executor=executor)
            self.user_ids = self.options.get("user_ids", [])
        elif self.mode == "baseline":
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.baseline.settings")
            import django

            django.setup()
            from channels.layers import get_channel_layer

            self.layer = get_channel_layer()
        elif self.mode == "raw":
            import redis.asyncio as redis

            self.redis = redis.Redis.from_url(self.options["redis_url"])
        elif self.mode == "api":
            self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            self.users = self.options["users"]

    async def one(self, i: int, ts: float, cmd: dict):
        start = time.time()
        try:
            if self.mode == "product":
                if cmd.get("audience") == "topic":
                    audience = {"topic": cmd["topic"]}
                elif cmd.get("audience") == "user":
                    audience = {"users": [self.user_ids[i % len(self.user_ids)]]}
                else:
                    audience = {"broadcast": True}
                await self._send_sync(i, ts, audience)
            elif self.mode == "baseline":
                await self.layer.group_send("bench", {"type": "bench.message", "text": FRAME_TEMPLATE.format(
                    seq=i, ts=ts)})
            elif self.mode == "raw":
                await self.redis.publish(self.options["channel"], FRAME_TEMPLATE.format(seq=i, ts=ts))
            elif self.mode == "api":
                await self.post(i, ts)
        except Exception as exc:
            key = f"{type(exc).__name__}: {str(exc)[:80]}"
            self.errors[key] = self.errors.get(key, 0) + 1
            return
        end = time.time()
        self.done += 1
        self.lags.append(end - ts)
        self.calls.append(end - start)

    async def post(self, i: int, ts: float):
        user = self.users[i % len(self.users)]
        body = json.dumps({"title": "bench", "users": [user], "data": {"ts": ts, "seq": i}}).encode()
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.options["port"])
        request = (f"POST /api/notifications/ HTTP/1.1\r\nHost: 127.0.0.1:{self.options['port']}\r\n"
                   f"Authorization: Bearer {self.options['token']}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        response = await reader.readexactly(length)
        if b"connection: close" in head.lower():
            writer.close()
        else:
            self.idle.append((reader, writer))
        if status != 201:
            raise RuntimeError(f"HTTP {status}: {response[:60]!r}")

    async def run(self, cmd: dict) -> dict:
        self.errors, self.done, self.lags, self.calls = {}, 0, [], []
        rate, duration = cmd["rate"], cmd["duration"]
        total = max(1, round(rate * duration))
        loop = asyncio.get_running_loop()
        tasks = []
        t0 = time.time() + 0.05
        for n in range(total):
            target = t0 + n / rate
            delay = target - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.seq += 1
            tasks.append(loop.create_task(self.one(self.seq, target, cmd)))
        sent_by = time.time()
        await asyncio.wait(tasks, timeout=cmd.get("timeout", 60))
        return {"scheduled": total, "sent": self.done, "errors": self.errors, "t0": t0,
                "schedule_s": sent_by - t0, "lag_p50": percentile(self.lags, 0.5),
                "lag_p99": percentile(self.lags, 0.99), "lag_max": max(self.lags, default=None),
                "call_p50": percentile(self.calls, 0.5), "call_p99": percentile(self.calls, 0.99)}


async def main():
    mode, options = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    sender = Sender(mode, options)
    await sender.setup()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    while line := await reader.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "send":
            reply = await sender.run(cmd)
        elif cmd["cmd"] == "close":
            break
        else:
            reply = {"error": "unknown command"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
