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
  Two more commands in this mode, both closed-loop (each client sends its next request when
  the previous one was answered, so they measure capacity, not latency at a given rate):

  - ``{"cmd": "closed", "clients": 16, "duration": D}``: ``clients`` keep-alive connections
    each sending personal notifications back to back for ``D`` seconds (``data.ts`` is the
    time the request started); answers the 2xx count, every other status, the request
    p50/p99 and the time span;
  - ``{"cmd": "batch", "clients": 4, "batches": B, "size": 1000}``: each client posts ``B``
    batches of ``size`` personal items (one user id each, round robin over ``user_ids``) to
    ``POST /api/notifications/batch/``; answers the items stored (per-item status 201), the
    statuses, the request p50/p99 and the time span; ``{"available": false}`` when the
    endpoint does not exist (a ``GET`` of it answers 404, not 405).
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
        conn = self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.options["port"])
        status, response, keep = await self.request(conn, "POST", "/api/notifications/", body)
        if keep:
            self.idle.append(conn)
        else:
            conn[1].close()
        if status != 201:
            raise RuntimeError(f"HTTP {status}: {response[:60]!r}")

    async def request(self, conn, method: str, path: str, body: bytes = b"") -> tuple[int, bytes, bool]:
        """One HTTP/1.1 request on a keep-alive connection: (status, body, connection reusable)."""
        reader, writer = conn
        writer.write((f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.options['port']}\r\n"
                      f"Authorization: Bearer {self.options['token']}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            chunks = []
            while size := int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
                chunks.append((await reader.readexactly(size + 2))[:-2])
            await reader.readuntil(b"\r\n")
            response = b"".join(chunks)
        else:
            length = 0
            for line in lower.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            response = await reader.readexactly(length)
        return status, response, b"connection: close" not in lower

    async def connection(self):
        return await asyncio.open_connection("127.0.0.1", self.options["port"])

    async def closed(self, cmd: dict) -> dict:
        """``clients`` keep-alive clients, each POSTing one personal notification after another."""
        conns = [await self.connection() for _ in range(cmd.get("clients", 16))]
        statuses: dict[str, int] = {}
        errors: dict[str, int] = {}
        calls: list[float] = []
        ok = 0
        t0 = time.time()
        deadline = t0 + cmd["duration"]

        async def client(k: int):
            nonlocal ok
            conn = conns[k]
            while (start := time.time()) < deadline:
                self.seq += 1
                body = json.dumps({"title": "bench", "users": [self.users[self.seq % len(self.users)]],
                                   "data": {"ts": start, "seq": self.seq}}).encode()
                conn, status, _ = await self.post_on(conn, "/api/notifications/", body, errors)
                if status is None:
                    continue
                calls.append(time.time() - start)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                ok += 200 <= status < 300
            conn[1].close()

        await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(len(conns)))),
                               cmd["duration"] + cmd.get("timeout", 30))
        span = time.time() - t0
        return {"ok": ok, "statuses": statuses, "errors": errors, "t0": t0, "span": span,
                "call_p50": percentile(calls, 0.5), "call_p99": percentile(calls, 0.99),
                "call_max": max(calls, default=None)}

    async def post_on(self, conn, path: str, body: bytes, errors: dict[str, int]):
        """POST on a keep-alive connection: ``(connection to use next, status, response body)``.
        A broken connection is counted in ``errors`` and replaced (status None); one the server
        will close after this response is replaced too."""
        try:
            status, response, keep = await self.request(conn, "POST", path, body)
        except Exception as exc:  # the connection broke: count it, open another
            key = f"{type(exc).__name__}: {str(exc)[:60]}"
            errors[key] = errors.get(key, 0) + 1
            conn[1].close()
            return await self.connection(), None, b""
        if not keep:
            conn[1].close()
            conn = await self.connection()
        return conn, status, response

    async def batch(self, cmd: dict) -> dict:
        """``clients`` clients, each POSTing ``batches`` batches of ``size`` personal items."""
        probe = await self.connection()
        status, _, _ = await self.request(probe, "GET", "/api/notifications/batch/")
        probe[1].close()
        if status == 404:
            return {"available": False}
        user_ids = self.options["user_ids"]
        size = cmd.get("size", 1000)
        conns = [await self.connection() for _ in range(cmd.get("clients", 4))]
        http: dict[str, int] = {}
        items: dict[str, int] = {}
        errors: dict[str, int] = {}
        calls: list[float] = []
        t0 = time.time()

        async def client(k: int):
            conn = conns[k]
            for _ in range(cmd.get("batches", 3)):
                start = time.time()
                first = self.seq
                self.seq += size
                body = json.dumps({"items": [
                    {"title": "bench", "users": [user_ids[i % len(user_ids)]], "data": {"ts": start, "seq": i}}
                    for i in range(first, first + size)]}).encode()
                conn, status, response = await self.post_on(conn, "/api/notifications/batch/", body, errors)
                if status is None:
                    continue
                calls.append(time.time() - start)
                http[str(status)] = http.get(str(status), 0) + 1
                if status == 200:
                    for result in json.loads(response)["results"]:
                        items[str(result["status"])] = items.get(str(result["status"]), 0) + 1
            conn[1].close()

        await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(len(conns)))), cmd.get("timeout", 120))
        span = time.time() - t0
        return {"available": True, "size": size, "batches": len(calls), "stored": items.get("201", 0),
                "item_statuses": items, "statuses": http, "errors": errors, "t0": t0, "span": span,
                "call_p50": percentile(calls, 0.5), "call_p99": percentile(calls, 0.99)}

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
        elif cmd["cmd"] == "closed":
            reply = await sender.closed(cmd)
        elif cmd["cmd"] == "batch":
            reply = await sender.batch(cmd)
        elif cmd["cmd"] == "close":
            break
        else:
            reply = {"error": "unknown command"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
