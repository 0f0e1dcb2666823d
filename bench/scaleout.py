"""One scale-out measurement: a server with two processes on one port, real Redis, N sockets.

    .venv/bin/python bench/scaleout.py --server uvicorn --layer core [--sockets 1000] [--json out.json]

Measures, against a fresh SQLite database (or ``BENCH_DATABASE_URL``) and the Redis at
``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``, keys under a unique prefix, deleted after):

- connect rate: sockets opened (handshake + ``hello``) per second, 100 at a time;
- memory: the server processes' resident memory, and Redis' ``MEMORY USAGE`` of this run's keys
  (presence, channel layer), per open socket;
- fan-out latency: broadcasts sent from this process (``notification_send`` + commit, as a
  worker would) at ``--rate`` per second; for every delivery, the time from the send to the
  frame read by the client (p50, p99, max);
- fan-out throughput: ``--burst`` broadcasts sent back to back; deliveries per second until
  every socket has every one.

``--server uvicorn`` runs ``bin/serve --workers 2``; ``--server daphne`` runs two daphne
processes sharing one listening socket (``daphne --fd``, the systemd socket-activation way).
The client runs in this process (one event loop): at high rates it can be the bottleneck, the
same for every variant. ``bench/servers.py`` and ``bench/layers.py`` compare variants.
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
WORKERS = 2
SUBPROTOCOL = "notifications.v2"


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(p) for p in out.split()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind: str, env: dict, log: Path):
        self.kind, self.env, self.log = kind, env, log
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        self.listener = None

    def start(self) -> None:
        out = open(self.log, "ab")
        if self.kind == "uvicorn":
            self.processes.append(subprocess.Popen(
                [str(BASE_DIR / "bin" / "serve"), "--port", str(self.port), "--workers", str(WORKERS),
                 "--", "--no-access-log"],
                cwd=BASE_DIR, env=self.env, stdout=out, stderr=subprocess.STDOUT))
        else:
            # What systemd socket activation does: one listening socket, inherited by each process.
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", self.port))
            self.listener.listen(2048)
            fd = self.listener.fileno()
            daphne = str(Path(sys.executable).with_name("daphne"))
            for _ in range(WORKERS):
                self.processes.append(subprocess.Popen(
                    # The default 5 s handshake limit drops handshakes queued behind a connect burst.
                    [daphne, "--fd", str(fd), "-v", "0", "--websocket_connect_timeout", "60",
                     "project.asgi:application"],
                    cwd=BASE_DIR, env=self.env, stdout=out, stderr=subprocess.STDOUT, pass_fds=(fd,)))
        deadline = time.monotonic() + 30
        import http.client

        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    time.sleep(1.0)  # let every process finish starting
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.kind} did not start:\n{self.log.read_text()}")

    def worker_pids(self) -> list[int]:
        if self.kind == "uvicorn":
            return children(self.processes[0].pid) or [self.processes[0].pid]
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.listener:
            self.listener.close()


def prefix_bytes(client) -> int:
    """Redis memory of this run's keys (presence, channel layer): other users of the Redis do not count."""
    return sum(client.memory_usage(key) or 0 for key in client.scan_iter(match=f"{os.environ['REDIS_PREFIX']}*"))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def configure(name: str) -> None:
    """A benchmark run's environment (inherited by the servers it starts), then Django: a fresh
    SQLite database (or ``BENCH_DATABASE_URL``), the Redis at ``REDIS_URL`` under a prefix of its
    own, production-like settings."""
    workdir = tempfile.mkdtemp(prefix=name)
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    os.environ["DATABASE_URL"] = os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{workdir}/db.sqlite3"
    os.environ["REDIS_PREFIX"] = f"bench-{uuid.uuid4().hex[:8]}"
    os.environ.setdefault("DEBUG", "0")
    os.environ.setdefault("SECRET_KEY", "bench-only")
    os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
    import django

    django.setup()


def setup(args) -> list[str]:
    """Migrate, create users and one token each; return the raw tokens."""
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from notifications.auth import token_build
    from notifications.models import ApiToken

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    call_command("migrate", verbosity=0)
    User.objects.bulk_create([User(username=f"b{uuid.uuid4().hex[:10]}") for _ in range(args.users)])
    users = list(User.objects.order_by("-id")[: args.users])
    built = [token_build(user=u) for u in users]
    ApiToken.objects.bulk_create([t for t, _ in built])
    return [raw for _, raw in built]


async def run(args, raws: list[str]) -> dict:
    from websockets.asyncio.client import connect

    from notifications import services

    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "PYTHONUNBUFFERED": "1"}
    log = Path(tempfile.gettempdir()) / f"bench-{args.server}-{args.layer}.log"
    log.write_text("")
    server = Server(args.server, env, log)
    server.start()
    redis_client = __import__("redis").Redis.from_url(os.environ["REDIS_URL"])
    try:
        pids = server.worker_pids()
        rss_before = rss_kib(pids)
        redis_before = prefix_bytes(redis_client)

        sockets = []
        gate = asyncio.Semaphore(100)

        async def open_one(i):
            async with gate:
                ws = await connect(f"ws://127.0.0.1:{server.port}/ws/notifications/",
                                   additional_headers={"Authorization": f"Bearer {raws[i % len(raws)]}"},
                                   subprotocols=[SUBPROTOCOL], open_timeout=30, max_queue=None,
                                   ping_interval=None)
                hello = json.loads(await ws.recv())
                assert hello["type"] == "hello" and hello["protocol"] == SUBPROTOCOL, hello
                sockets.append(ws)

        started = time.perf_counter()
        await asyncio.gather(*(open_one(i) for i in range(args.sockets)))
        connect_seconds = time.perf_counter() - started
        await asyncio.sleep(1.0)
        rss_after = rss_kib(pids)
        redis_after = prefix_bytes(redis_client)

        latencies: list[float] = []
        received = [0] * len(sockets)
        done = asyncio.Event()
        expected = {"count": 0}

        async def reader(k, ws):
            async for text in ws:
                now = time.time()
                frame = json.loads(text)
                if frame.get("type") == "notification":
                    latencies.append(now - frame["data"]["t"])
                    received[k] += 1
                    if expected["count"] and all(r >= expected["count"] for r in received):
                        done.set()

        readers = [asyncio.create_task(reader(k, ws)) for k, ws in enumerate(sockets)]

        def send(title):
            services.notification_send(broadcast=True, title=title, data={"t": time.time()})

        # Paced broadcasts: latency.
        expected["count"] = args.broadcasts
        for i in range(args.broadcasts):
            await asyncio.to_thread(send, f"paced {i}")
            await asyncio.sleep(1 / args.rate)
        await asyncio.wait_for(done.wait(), 60)
        paced = list(latencies)

        # A burst: throughput.
        latencies.clear()
        done.clear()
        expected["count"] = args.broadcasts + args.burst
        burst_started = time.perf_counter()

        def send_burst():
            for i in range(args.burst):
                send(f"burst {i}")

        await asyncio.to_thread(send_burst)
        await asyncio.wait_for(done.wait(), 120)
        burst_seconds = time.perf_counter() - burst_started
        burst = list(latencies)

        for task in readers:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        n = len(sockets)
        return {
            "server": args.server,
            "layer": args.layer,
            "processes": WORKERS,
            "sockets": n,
            "connects_per_s": round(n / connect_seconds, 1),
            "server_rss_kib_per_socket": round((rss_after - rss_before) / n, 1),
            "server_rss_mib_total": round(rss_after / 1024, 1),
            "redis_bytes_per_socket": round((redis_after - redis_before) / n, 1),
            "paced": {"broadcasts": args.broadcasts, "per_s": args.rate,
                      "p50_ms": round(percentile(paced, 0.5) * 1000, 1),
                      "p99_ms": round(percentile(paced, 0.99) * 1000, 1),
                      "max_ms": round(max(paced) * 1000, 1),
                      "mean_ms": round(statistics.mean(paced) * 1000, 1)},
            "burst": {"broadcasts": args.burst, "seconds": round(burst_seconds, 2),
                      "deliveries_per_s": round(n * args.burst / burst_seconds),
                      "p99_ms": round(percentile(burst, 0.99) * 1000, 1)},
        }
    finally:
        server.stop()
        keys = list(redis_client.scan_iter(match=f"{os.environ['REDIS_PREFIX']}*"))
        if keys:
            redis_client.delete(*keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn")
    parser.add_argument("--layer", choices=["core", "pubsub"], default="core")
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--broadcasts", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()

    os.environ["CHANNELS_LAYER"] = args.layer
    os.environ.setdefault("WS_MAX_CONNECTIONS_PER_USER", "1000")
    configure("bench-scaleout-")
    result = asyncio.run(run(args, setup(args)))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
