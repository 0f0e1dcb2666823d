"""The benchmark of issue 9: the product against a tutorial Channels app and raw ``websockets``.

    .venv/bin/python bench/run.py               # the short run (make bench, about 2.5 minutes; storm rows at 500)
    .venv/bin/python bench/run.py --full        # every scenario of docs/performance.md (about 15 minutes)
    .venv/bin/python bench/run.py --only broadcast --n 1000 --targets product,product-daphne --rates 10,100
    .venv/bin/python bench/run.py --only storm --n 2000   # issue 14: connect and resume storms, API, batch
    make bench BENCH_ARGS="--only storm"                  # the same at N=1000

Everything runs on this machine, on loopback: PostgreSQL (``BENCH_DATABASE_URL``, default
``postgres://postgres@127.0.0.1:5432/notif_bench``, created and migrated here), the real
Redis (``REDIS_URL``) under a unique ``CHANNELS_PREFIX``, the servers, the open-loop
senders (``bench/sender.py``) and the load-generator processes (``bench/loadgen.py``).
Each scenario prints a row per target and rate; the run writes
``bench/results/bench-<date>.json`` (machine, load average, git commit, every row) and
``bench/results/bench-<date>.png``. docs/performance.md explains every number.
"""

import argparse
import http.client
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
BENCH = BASE_DIR / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
VENV_BIN = Path(PY).parent
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/notif_bench"
# Offered by every target's clients (the baselines accept it too): a v1 client is refused (4426).
SUBPROTOCOL = "notifications.v2"
# Its own Redis database (besides a unique CHANNELS_PREFIX): the product's throttle counters live in
# Django's cache without a prefix, keyed by client address, so another suite's failed logins from
# 127.0.0.1 in database 0 would refuse this run's handshakes (4029).
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
# bin/serve's uvicorn options (production), then the loop and parser it picks anyway when installed.
SERVE_FLAGS = ["--ws", "notifications.serving:WebSocketProtocol", "--ws-max-size", "1048576",
               "--ws-per-message-deflate", "false", "--lifespan", "on", "--timeout-graceful-shutdown", "10",
               "--no-proxy-headers", "--header", "server:notifications", "--loop", "uvloop",
               "--http", "notifications.serving:HttpProtocol", "--no-access-log"]
SERVER_FLAGS = ["--ws", "websockets-sansio", "--ws-per-message-deflate", "false", "--loop", "uvloop",
                "--http", "httptools"]


LOG_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# Processes


class Worker:
    """A child speaking one JSON line per command on stdin/stdout."""

    def __init__(self, argv, env=None, name="worker"):
        self.name = name
        self.process = subprocess.Popen(argv, cwd=BASE_DIR, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, bufsize=1)

    def send(self, cmd: dict) -> None:
        self.process.stdin.write(json.dumps(cmd) + "\n")
        self.process.stdin.flush()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.process.poll()})")
        return json.loads(line)

    def call(self, cmd: dict) -> dict:
        self.send(cmd)
        return self.read()

    def stop(self):
        try:
            self.send({"cmd": "close"})  # it exits (a load generator first closes its sockets)
        except OSError as exc:  # already gone
            log(f"{self.name}: {exc}")
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def call_all(workers, cmds):
    for w, c in zip(workers, cmds, strict=True):
        w.send(c)
    return [w.read() for w in workers]


class Server:
    def __init__(self, target: str, argv: list[str], env: dict, port: int, log_path: Path):
        self.target, self.port, self.log_path = target, port, log_path
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(argv, cwd=BASE_DIR, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{target} exited: {log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"{target} did not start: {log_path.read_text()[-2000:]}")
        self.pid = self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def log_mark(self) -> int:
        return self.log_path.stat().st_size

    def log_problems(self, mark: int) -> dict[str, int]:
        """The server's WARNING/ERROR lines since ``mark``, counted by message (time stamps cut):
        failures the clients do not see (a presence update, a group leave, a retried push)."""
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            text = f.read().decode("utf-8", "replace")
        counts: dict[str, int] = {}
        for line in text.splitlines():
            if "Method Not Allowed: /api/notifications/batch/" in line:
                continue  # the batch endpoint's probe
            if " WARNING " in line or " ERROR " in line or line.startswith("ERROR:"):
                key = LOG_STAMP.sub("", line)[:120]
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def rss(self) -> int:
        return rss_kib(self.pid)

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# Targets: how each server is started. "product" runs bin/serve's uvicorn command (SERVE_FLAGS), one process.

PRODUCT_VARIANTS = {
    # name: (extra uvicorn args, extra env, server kind)
    "product": ([], {}, "uvicorn"),
    "product-asyncio": (["--loop", "asyncio"], {}, "uvicorn"),
    "product-h11": (["--http", "h11"], {}, "uvicorn"),
    "product-ws-legacy": (["--ws", "websockets"], {}, "uvicorn"),
    "product-wsproto": (["--ws", "wsproto"], {}, "uvicorn"),
    "product-deflate": (["--ws-per-message-deflate", "true"], {}, "uvicorn"),
    "product-pubsub": ([], {"CHANNELS_LAYER": "pubsub"}, "uvicorn"),
    "product-pool20": ([], {"DB_POOL_MAX_SIZE": "20"}, "uvicorn"),  # the pool setting (DB_POOL_MAX_SIZE)
    "product-nopersist": ([], {"CONN_MAX_AGE": "0"}, "uvicorn"),
    "product-2workers": (["--workers", "2"], {}, "uvicorn"),
    "product-threadpool": ([], {"BENCH_VARIANT": "threadpool"}, "uvicorn"),
    "product-pool": ([], {"DJANGO_SETTINGS_MODULE": "bench.settings_pool"}, "uvicorn"),
    "product-daphne": ([], {}, "daphne"),
}


# The storm scenario's targets (issue 14): the product as served in production (2 workers), beside
# the tutorial Channels app and the raw websockets server (connect storm only: they have no resume).
STORM_DEFAULT_TARGETS = ["raw", "baseline", "product-2workers"]
# A lost push is read from the store by the hubs (HUB_SYNC_INTERVAL, 2 s): wait longer than that
# before calling the frames still missing lost.
STORM_STALL = 6.0


def product_variant(target: str):
    """``product-v:a+b`` is the product with bench/variants.py's changes ``a`` and ``b``."""
    if target.startswith("product-v:"):
        return [], {"BENCH_VARIANT": target.split(":", 1)[1]}, "uvicorn"
    return PRODUCT_VARIANTS[target]


class Bench:
    def __init__(self, args):
        self.args = args
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = RESULTS / "tmp" / self.stamp
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.db_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
        self.rows: list[dict] = []
        self.tokens: list[str] = []
        self.usernames: list[str] = []
        self.user_ids: list[int] = []
        self.sender_token = ""
        self.started = time.time()

    # Environment

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "CHANNELS_", "DATABASE_URL"))}
        env.update({"DATABASE_URL": self.db_url, "REDIS_URL": REDIS_URL, "CHANNELS_PREFIX": self.prefix,
                    "DEBUG": "0", "SECRET_KEY": "bench-not-secret", "ALLOWED_HOSTS": "127.0.0.1,localhost",
                    # WARNING: no log line per connection (BENCH_LOG_LEVEL=INFO to see them).
                    "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                    "DJANGO_SETTINGS_MODULE": "project.settings", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(BASE_DIR)})
        env.update(extra)
        return env

    def setup(self, users: int):
        """Create and migrate the bench database; one token per user (and the sender's) in one call."""
        import psycopg
        import redis

        name = self.db_url.rsplit("/", 1)[1]
        admin_url = self.db_url.rsplit("/", 1)[0] + "/postgres"
        try:
            redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
            psycopg.connect(admin_url, connect_timeout=2).close()
        except Exception as exc:
            sys.exit(f"bench: PostgreSQL ({admin_url}) and Redis ({REDIS_URL}) must be running on loopback "
                     f"(.ci/run starts both): {type(exc).__name__}: {exc}")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
        env = self.env()
        subprocess.run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=BASE_DIR, env=env, check=True)
        self.usernames = [f"bench-u{i:05d}" for i in range(users)]
        started = time.perf_counter()
        out = subprocess.run([PY, "manage.py", "create_api_token", "--create-users", "--staff", "--name", "bench",
                              "bench-sender", *self.usernames], cwd=BASE_DIR, env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        self.sender_token, self.tokens = out[0], out[1:]
        assert len(self.tokens) == users, (len(self.tokens), users)
        script = (
            "import django, json, sys; django.setup()\n"
            "from django.contrib.auth import get_user_model\n"
            "from notifications.models import Topic, Follow, Notification\n"
            # Every run starts with an empty inbox for everyone: the connect path counts unread
            # notifications, so notifications left by earlier runs would slow it down run after run.
            "Notification.objects.all().delete()\n"
            "names = json.loads(sys.stdin.read())\n"
            "ids = dict(get_user_model().objects.filter(username__in=names).values_list('username', 'pk'))\n"
            "topic, _ = Topic.objects.get_or_create(slug='bench', defaults={'title': 'bench'})\n"
            "have = set(Follow.objects.filter(topic=topic, ended_at__isnull=True).values_list('user_id', flat=True))\n"
            "Follow.objects.bulk_create([Follow(user_id=ids[n], topic=topic) for i, n in enumerate(names)"
            " if i % 2 == 0 and ids[n] not in have])\n"
            "print(json.dumps([ids[n] for n in names]))\n"
        )
        result = subprocess.run([PY, "-c", script], cwd=BASE_DIR, env=env, check=True, capture_output=True,
                                text=True, input=json.dumps(self.usernames))
        self.user_ids = json.loads(result.stdout)
        log(f"setup: {users} users and tokens in {time.perf_counter() - started:.1f} s (one create_api_token call)")

    # Servers

    def start(self, target: str) -> Server:
        port = free_port()
        log_path = self.run_dir / f"{target}-{port}.log"
        if target == "raw":
            argv = [PY, str(BENCH / "raw_server.py"), str(port), REDIS_URL, f"{self.prefix}-raw"]
            return Server(target, argv, self.env(), port, log_path)
        if target.startswith("baseline"):
            layer = "pubsub" if target == "baseline-pubsub" else "core"
            argv = [str(VENV_BIN / "uvicorn"), "bench.baseline.asgi:application", "--host", "127.0.0.1",
                    "--port", str(port), *SERVER_FLAGS, "--lifespan", "off", "--no-access-log"]
            env = self.env(DJANGO_SETTINGS_MODULE="bench.baseline.settings", BASELINE_LAYER=layer,
                           CHANNELS_PREFIX=f"{self.prefix}-baseline")
            return Server(target, argv, env, port, log_path)
        extra, extra_env, kind = product_variant(target)
        env = self.env(**extra_env)
        if kind == "daphne":
            argv = [str(VENV_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "project.asgi:application"]
        else:
            # bin/serve's uvicorn command (one process unless the variant says --workers), run directly so a
            # variant can name another application (bench/variants.py).
            app = "bench.variants:application" if "BENCH_VARIANT" in extra_env else "project.asgi:application"
            argv = [str(VENV_BIN / "uvicorn"), app, "--host", "127.0.0.1", "--port", str(port), *SERVE_FLAGS,
                    *extra]
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.run_dir / f"metrics-{port}")
            os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
        return Server(target, argv, env, port, log_path)

    def start_or_skip(self, target: str) -> Server | None:
        """The target's server, or None (logged) when it does not start: the run goes on without it."""
        try:
            return self.start(target)
        except RuntimeError as exc:
            log(f"{target}: not measured: {str(exc)[-300:]}")
            return None

    def loadgens(self, count: int) -> list[Worker]:
        return [Worker([PY, str(BENCH / "loadgen.py")], env=self.env(), name=f"loadgen{i}") for i in range(count)]

    def connect(self, gens, server: Server, tokens: list[str], concurrency: int) -> dict:
        product = server.target.startswith("product")
        path = "/ws/notifications/" if product else ("/ws/" if server.target.startswith("baseline") else "/")
        parts = [tokens[i::len(gens)] for i in range(len(gens))]
        replies = call_all(gens, [{"cmd": "connect", "port": server.port, "path": path, "tokens": part,
                                   "subprotocol": SUBPROTOCOL, "wait_hello": product,
                                   "concurrency": max(1, concurrency // len(gens)), "timeout": 30,
                                   "deflate": server.target == "product-deflate"}
                                  for part in parts])
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        start = min(r["start"] for r in replies)
        end = max(r["start"] + r["elapsed"] for r in replies)
        connected = sum(r["connected"] for r in replies)
        return {"connected": connected, "failed": sum(r["failed"] for r in replies), "errors": errors,
                "elapsed": end - start, "connects_per_s": connected / (end - start),
                "connect_p99_ms": 1000 * max(r["connect_p99"] or 0 for r in replies)}

    def resume(self, gens, server: Server, concurrency: int) -> dict:
        """The resume storm: every load generator drops its sockets at once and reconnects each
        with its hello's cursor and epoch (bench/loadgen.py ``resume``)."""
        replies = call_all(gens, [{"cmd": "resume", "port": server.port, "path": "/ws/notifications/",
                                   "subprotocol": SUBPROTOCOL, "concurrency": max(1, concurrency // len(gens)),
                                   "timeout": 30}] * len(gens))
        errors: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
            for k, v in r["not_recovered"].items():
                reasons[k] = reasons.get(k, 0) + v
        start = min(r["start"] for r in replies)
        elapsed = max(r["start"] + r["elapsed"] for r in replies) - start
        resumed = sum(r["resumed"] for r in replies)
        return {"dropped": sum(r["dropped"] for r in replies), "resumed": resumed,
                "recovered": sum(r["recovered"] for r in replies), "not_recovered": reasons,
                "replayed": sum(r["replayed"] for r in replies), "failed": sum(r["failed"] for r in replies),
                "errors": errors, "elapsed": elapsed, "resumes_per_s": resumed / elapsed if elapsed else 0.0,
                # the slower load generator's quantiles (each has half the sockets)
                "resume_p50_ms": 1000 * max(r["resume_p50"] or 0 for r in replies),
                "resume_p99_ms": 1000 * max(r["resume_p99"] or 0 for r in replies)}

    def api_call(self, server: Server, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                         headers={"Authorization": f"Bearer {self.sender_token}",
                                  "Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def sender(self, server: Server) -> Worker:
        t = server.target
        if t == "raw":
            mode, options = "raw", {"redis_url": REDIS_URL, "channel": f"{self.prefix}-raw"}
            env = self.env()
        elif t.startswith("baseline"):
            mode, options = "baseline", {}
            env = self.env(DJANGO_SETTINGS_MODULE="bench.baseline.settings",
                           BASELINE_LAYER="pubsub" if t == "baseline-pubsub" else "core",
                           CHANNELS_PREFIX=f"{self.prefix}-baseline")
        else:
            mode, options = "product", {"actor": "bench-sender", "user_ids": self.user_ids}
            env = self.env(**product_variant(t)[1])
        worker = Worker([PY, str(BENCH / "sender.py"), mode, json.dumps(options)], env=env, name=f"sender-{t}")
        assert worker.read().get("ready")
        return worker

    def api_sender(self, server: Server, users: list[str], target: str = "product",
                   user_ids: list[int] | None = None) -> Worker:
        options = {"port": server.port, "token": self.sender_token, "users": users, "user_ids": user_ids or []}
        worker = Worker([PY, str(BENCH / "sender.py"), "api", json.dumps(options)], env=self.env(), name="api")
        assert worker.read().get("ready")
        return worker

    # Measuring one phase: reset, send open-loop, wait until everything arrived (or stopped arriving)

    def phase(self, gens, sender, server, *, rate, duration, per_send, extra_cmd=None, drain=20.0):
        call_all(gens, [{"cmd": "reset"}] * len(gens))
        cpu0, load0 = server_cpu(server), loadavg()
        sent = sender.call({"cmd": "send", "rate": rate, "duration": duration, **(extra_cmd or {})})
        expected = sent["sent"] * per_send
        stats, received, hist = await_frames(gens, expected, drain)
        cpu = server_cpu(server) - cpu0
        last_recv = max((s["last_recv"] or 0) for s in stats)
        span = (last_recv - sent["t0"]) if received else float("nan")
        codes: dict[str, int] = {}
        for s in stats:
            for k, v in s["close_codes"].items():
                codes[k] = codes.get(k, 0) + v
        return {
            "rate": rate, "duration": duration, "scheduled": sent["scheduled"], "sent": sent["sent"],
            "send_errors": sent["errors"], "expected": expected, "received": received,
            "lost": max(0, expected - received), "duplicates": max(0, received - expected),
            "offered_per_s": rate * per_send,
            "delivered_per_s": received / span if received else 0.0,
            "p50_ms": pct_ms(hist, 0.5), "p99_ms": pct_ms(hist, 0.99), "max_ms": 1000 * max(s["max_latency"]
                                                                                             for s in stats),
            "sender_lag_p99_ms": ms(sent["lag_p99"]), "send_call_p99_ms": ms(sent["call_p99"]),
            "server_cpu_s": cpu, "server_cpu_ms_per_1000": 1e6 * cpu / received if received else None,
            "client_cpu_ms_per_1000": 1e6 * sum(s["cpu"] for s in stats) / received if received else None,
            "open_sockets": sum(s["open"] for s in stats), "close_codes": codes, "load": [load0, loadavg()],
            "api_p50_ms": ms(sent.get("call_p50")), "api_p99_ms": ms(sent.get("call_p99")),
        }

    def profiler(self, server: Server, label: str):
        """``--profile``: py-spy samples the product server (every thread) until ``stop_profiler``."""
        if not self.args.profile or not server.target.startswith("product"):
            return None
        out = RESULTS / f"profile-{self.stamp}-{label}.txt"
        return subprocess.Popen([str(VENV_BIN / "py-spy"), "record", "-p", str(server.pid), "-r", "200",
                                 "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def stop_profiler(spy):
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)

    def row(self, scenario: str, target: str, n: int, data: dict) -> None:
        row = {"scenario": scenario, "target": target, "n": n, **data}
        self.rows.append(row)
        print(format_row(row), flush=True)
        self.save()  # after every row: an interrupted run keeps what it measured

    def clear_notifications(self) -> None:
        """Empty every inbox: the handshake counts the user's unread notifications, so a connect
        costs more the more notifications earlier scenarios left (docs/performance.md)."""
        script = "import django; django.setup()\nfrom notifications.models import Notification\n" \
                 "Notification.objects.all().delete()\n"
        subprocess.run([PY, "-c", script], cwd=BASE_DIR, env=self.env(), check=True)

    # Scenarios

    def broadcast(self, targets, n, rates, duration, label="broadcast"):
        for target in targets:
            server = self.start_or_skip(target)
            if server is None:
                continue
            gens = self.loadgens(self.args.clients)
            try:
                conn = self.connect(gens, server, self.tokens[:n], concurrency=50)
                if conn["failed"]:
                    log(f"{target}: {conn['failed']} failed connects: {conn['errors']}")
                sender = self.sender(server)
                # Warm-up: the first notification imports and primes everything (not measured).
                self.phase(gens, sender, server, rate=5, duration=0.4, per_send=conn["connected"], drain=5)
                for rate in rates:
                    spy = self.profiler(server, f"{label}-{target}-n{n}-r{rate}")
                    result = self.phase(gens, sender, server, rate=rate, duration=duration,
                                        per_send=conn["connected"])
                    self.stop_profiler(spy)
                    result["failed_connects"] = conn["failed"]
                    self.row(label, target, n, result)
                    saturated = (result["lost"] or result["open_sockets"] < conn["connected"]
                                 or result["delivered_per_s"] < 0.8 * result["offered_per_s"]
                                 or (result["p99_ms"] or 0) > 5000)
                    if saturated and not self.args.no_stop:
                        break
                sender.stop()
            finally:
                for g in gens:
                    g.stop()
                server.stop()

    def topic(self, n, rates, duration, target="product"):
        server = self.start(target)
        gens = self.loadgens(self.args.clients)
        try:
            conn = self.connect(gens, server, self.tokens[:n], concurrency=50)
            followers = len(range(0, n, 2))
            sender = self.sender(server)
            self.phase(gens, sender, server, rate=5, duration=0.4, per_send=followers,
                       extra_cmd={"audience": "topic", "topic": "bench"}, drain=5)
            for rate in rates:
                result = self.phase(gens, sender, server, rate=rate, duration=duration, per_send=followers,
                                    extra_cmd={"audience": "topic", "topic": "bench"})
                result["failed_connects"] = conn["failed"]
                result["followers"] = followers
                self.row("topic", target, n, result)
            sender.stop()
        finally:
            for g in gens:
                g.stop()
            server.stop()

    def personal(self, n, rates, duration, target="product"):
        server = self.start(target)
        gens = self.loadgens(self.args.clients)
        try:
            conn = self.connect(gens, server, self.tokens[:n], concurrency=50)
            api = self.api_sender(server, self.usernames[:n], target)
            self.phase(gens, api, server, rate=20, duration=0.5, per_send=1, drain=5)
            for rate in rates:
                spy = self.profiler(server, f"personal-n{n}-r{rate}")
                result = self.phase(gens, api, server, rate=rate, duration=duration, per_send=1)
                self.stop_profiler(spy)
                result["failed_connects"] = conn["failed"]
                self.row("personal-api", target, n, result)
            api.stop()
        finally:
            for g in gens:
                g.stop()
            server.stop()

    def connects(self, targets, n, concurrency=200):
        """Connect rate (authenticated for the product: handshake + token + hello) and idle memory."""
        self.clear_notifications()
        for target in targets:
            server = self.start(target)
            gens = self.loadgens(self.args.clients)
            try:
                warm = self.connect(gens, server, self.tokens[n:n + 20] or self.tokens[:20], concurrency=20)
                call_all(gens, [{"cmd": "close"}] * len(gens))
                for g in gens:
                    g.process.wait(5)
                time.sleep(1.0)
                gens = self.loadgens(self.args.clients)
                rss0, load0 = server_rss(server), loadavg()
                spy = self.profiler(server, f"connect-{target}-n{n}")
                result = self.connect(gens, server, self.tokens[:n], concurrency=concurrency)
                self.stop_profiler(spy)
                time.sleep(3.0)  # idle
                rss1 = server_rss(server)
                result.update({"warmup_connected": warm["connected"], "rss_before_kib": rss0, "rss_after_kib": rss1,
                               "kib_per_connection": (rss1 - rss0) / max(1, result["connected"]),
                               "load": [load0, loadavg()], "concurrency": concurrency})
                self.row("connect", target, n, result)
            finally:
                for g in gens:
                    g.stop()
                server.stop()

    def storm(self, targets, n, concurrency=200, api_duration=5.0, batches=3, batch_clients=4, missed=1):
        """Issue 14: a connect storm on every target (N sockets, ``concurrency`` handshakes in flight);
        then, on the product targets, the resume storm of those N (dropped at once, each reconnecting
        with ``?since=<hello cursor>&epoch=``), personal API sends from 16 keep-alive clients, and
        batches of 1000 personal items; the sockets stay open throughout, so every send is also
        timed to its frame. Each target on a fresh server; every inbox empty at the start."""
        self.clear_notifications()
        for target in targets:
            server = self.start_or_skip(target)
            if server is None:
                continue
            product = target.startswith("product")
            gens = self.loadgens(self.args.clients)
            api = None
            try:
                # Warm-up (not measured): imports, database connections, the hub of each worker.
                self.connect(gens, server, self.tokens[n:n + 40] or self.tokens[:40], concurrency=20)
                for g in gens:
                    g.stop()
                time.sleep(1.0)
                gens = self.loadgens(self.args.clients)
                cpu0, load0, mark = server_cpu(server), loadavg(), server.log_mark()
                conn = self.connect(gens, server, self.tokens[:n], concurrency=concurrency)
                cpu = server_cpu(server) - cpu0
                conn.update({"concurrency": concurrency, "load": [load0, loadavg()],
                             "server_log": server.log_problems(mark),
                             "server_cpu_ms_per_connect": 1000 * cpu / max(1, conn["connected"])})
                self.row("storm-connect", target, n, conn)
                if not product:
                    continue
                # Notifications the sockets get live after hello: their hello cursors are behind by
                # `missed` each, so every resume has that much to replay (as a client that dropped
                # right after its hello would).
                for i in range(missed):
                    status, body = self.api_call(server, "POST", "/api/notifications/",
                                                 {"title": f"missed {i}", "broadcast": True})
                    if status != 201:
                        log(f"{target}: the broadcast before the resume storm answered {status}: {body[:120]!r}")
                time.sleep(0.5)
                cpu0, load0, mark = server_cpu(server), loadavg(), server.log_mark()
                res = self.resume(gens, server, concurrency)
                cpu = server_cpu(server) - cpu0
                res.update({"n_connected": conn["connected"], "missed_each": missed, "concurrency": concurrency,
                            "load": [load0, loadavg()], "server_log": server.log_problems(mark),
                            "server_cpu_ms_per_resume": 1000 * cpu / max(1, res["resumed"])})
                self.row("storm-resume", target, n, res)
                api = self.api_sender(server, self.usernames[:n], target, self.user_ids[:n])
                # API: personal sends, closed loop.
                call_all(gens, [{"cmd": "reset"}] * len(gens))
                cpu0, load0, mark = server_cpu(server), loadavg(), server.log_mark()
                sent = api.call({"cmd": "closed", "clients": 16, "duration": api_duration})
                t_drain = time.monotonic()
                stats, received, hist = await_frames(gens, sent["ok"], drain=20, stall=STORM_STALL)
                cpu = server_cpu(server) - cpu0
                statuses = sent["statuses"]
                self.row("storm-api", target, n, {
                    "clients": 16, "duration": api_duration, "sent": sent["ok"],
                    "sends_per_s": sent["ok"] / sent["span"], "api_p50_ms": ms(sent["call_p50"]),
                    "api_p99_ms": ms(sent["call_p99"]), "api_max_ms": ms(sent["call_max"]),
                    "statuses": statuses, "errors": sent["errors"],
                    "non_2xx": sum(v for k, v in statuses.items() if not k.startswith("2")) + sum(
                        sent["errors"].values()),
                    "status_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
                    "received": received, "lost": max(0, sent["ok"] - received),
                    "p50_ms": pct_ms(hist, 0.5), "p99_ms": pct_ms(hist, 0.99),
                    "drain_s": time.monotonic() - t_drain, **socket_state(stats),
                    "server_log": server.log_problems(mark),
                    "server_cpu_ms_per_send": 1000 * cpu / max(1, sent["ok"]), "load": [load0, loadavg()]})
                # Batches of 1000 personal items, a few clients at once.
                call_all(gens, [{"cmd": "reset"}] * len(gens))
                cpu0, load0, mark = server_cpu(server), loadavg(), server.log_mark()
                batch = api.call({"cmd": "batch", "clients": batch_clients, "batches": batches, "size": 1000})
                if not batch["available"]:
                    self.row("storm-batch", target, n, {"available": False, "load": [load0, loadavg()]})
                    continue
                t_drain = time.monotonic()
                stats, received, hist = await_frames(gens, batch["stored"], drain=30, stall=STORM_STALL)
                cpu = server_cpu(server) - cpu0
                self.row("storm-batch", target, n, {
                    "available": True, "clients": batch_clients, "size": batch["size"], "batches": batch["batches"],
                    "stored": batch["stored"], "notifications_per_s": batch["stored"] / batch["span"],
                    "item_statuses": batch["item_statuses"], "statuses": batch["statuses"],
                    "errors": batch["errors"], "batch_p50_ms": ms(batch["call_p50"]),
                    "batch_p99_ms": ms(batch["call_p99"]), "received": received,
                    "lost": max(0, batch["stored"] - received), "p50_ms": pct_ms(hist, 0.5),
                    "p99_ms": pct_ms(hist, 0.99), "drain_s": time.monotonic() - t_drain, **socket_state(stats),
                    "server_log": server.log_problems(mark),
                    "server_cpu_ms_per_1000": 1e6 * cpu / max(1, batch["stored"]), "load": [load0, loadavg()]})
            finally:
                if api is not None:
                    api.stop()
                for g in gens:
                    g.stop()
                server.stop()

    # Output

    def save(self) -> dict:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BASE_DIR, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BASE_DIR,
                                    capture_output=True, text=True).stdout.strip())
        data = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": round(time.time() - self.started, 1),
            "git_commit": commit, "git_dirty": dirty, "args": vars(self.args),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                        "loadavg_end": loadavg()},
            "database": self.db_url.split("@")[-1], "redis": REDIS_URL.split("@")[-1], "prefix": self.prefix,
            "rows": self.rows, "summary": summarize(self.rows),
        }
        path = RESULTS / f"bench-{self.stamp}.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        return data

    def write(self):
        data = self.save()
        log(f"written: bench/results/bench-{self.stamp}.json")
        try:
            from plot import plot

            png = plot(data, RESULTS / f"bench-{self.stamp}.png")
            shutil.copyfile(png, RESULTS / "latest.png")
            log(f"written: {png.relative_to(BASE_DIR)} (and bench/results/latest.png)")
        except ImportError as exc:
            log(f"no plot: {exc} (pip install -r requirements-bench.txt)")
        print_summary(data["summary"])


def server_pids(server: Server) -> list[int]:
    pids = [server.pid]
    stack = [server.pid]
    while stack:
        out = subprocess.run(["pgrep", "-P", str(stack.pop())], capture_output=True, text=True).stdout.split()
        for p in out:
            pids.append(int(p))
            stack.append(int(p))
    return pids


def server_cpu(server: Server) -> float:
    total = 0.0
    for pid in server_pids(server):
        try:
            total += cpu_seconds(pid)
        except FileNotFoundError:
            pass
    return total


def server_rss(server: Server) -> int:
    total = 0
    for pid in server_pids(server):
        try:
            total += rss_kib(pid)
        except FileNotFoundError:
            pass
    return total


def await_frames(gens, expected: int, drain: float, stall: float = 3.0):
    """Poll the load generators until ``expected`` measured frames arrived, nothing arrived for
    ``stall`` seconds (the rest is lost) or ``drain`` seconds passed: (their stats, frames, latency
    histogram)."""
    deadline = time.monotonic() + drain
    last, still = -1, time.monotonic()
    while True:
        stats = call_all(gens, [{"cmd": "stats"}] * len(gens))
        received = sum(s["frames"] for s in stats)
        if received >= expected or time.monotonic() > deadline:
            break
        if received != last:
            last, still = received, time.monotonic()
        elif time.monotonic() - still > stall:
            break  # nothing arrived for `stall` seconds: the rest is lost
        time.sleep(0.2)
    hist: dict[int, int] = {}
    for s in stats:
        for k, v in s["hist"].items():
            hist[int(k)] = hist.get(int(k), 0) + v
    return stats, received, hist


def socket_state(stats: list[dict]) -> dict:
    codes: dict[str, int] = {}
    for s in stats:
        for k, v in s["close_codes"].items():
            codes[k] = codes.get(k, 0) + v
    return {"open_sockets": sum(s["open"] for s in stats), "close_codes": codes}


def ms(seconds):
    return None if seconds is None else round(1000 * seconds, 2)


def pct_ms(hist: dict[int, int], p: float):
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = p * total, 0
    for k in sorted(hist):
        seen += hist[k]
        if seen >= rank:
            return round(math.exp((k + 0.5) / 100) / 1000, 2)  # bucket middle, microseconds -> ms
    return None


def fmt(v, digits=0):
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def errors_text(errors: dict) -> str:
    return f" ({next(iter(errors))[:50]}...)" if errors else ""


def server_log_text(r: dict) -> str:
    problems = r.get("server_log")
    if not problems:
        return " server_log=0"
    top = next(iter(problems))
    # "WARNING notifications.presence presence remove failed: ..." or uvicorn's "ERROR:    ..."
    message = top[6:].strip() if top.startswith("ERROR:") else top.split(" ", 2)[-1]
    return f" server_log={sum(problems.values())} ({problems[top]}x {message[:60]}...)"


def format_row(r: dict) -> str:
    if r["scenario"].startswith("storm-"):
        return format_storm_row(r) + ("" if r.get("available") is False else server_log_text(r))
    return format_other_row(r)


def format_storm_row(r: dict) -> str:
    head = f"{r['scenario']:<13} {r['target']:<18} N={r['n']:<6}"
    if r["scenario"] == "storm-connect":
        return (f"{head} connects/s={fmt(r['connects_per_s'])} p99={fmt(r['connect_p99_ms'], 1)}ms "
                f"connected={r['connected']} failed={r['failed']}{errors_text(r['errors'])} "
                f"cpu/connect={fmt(r['server_cpu_ms_per_connect'], 2)}ms in_flight={r['concurrency']} "
                f"load={r['load'][0][0]:.2f}")
    if r["scenario"] == "storm-resume":
        return (f"{head} resumes/s={fmt(r['resumes_per_s'])} p50={fmt(r['resume_p50_ms'], 1)}ms "
                f"p99={fmt(r['resume_p99_ms'], 1)}ms dropped={r['dropped']} resumed={r['resumed']} "
                f"recovered={r['recovered']} not_recovered={r['not_recovered'] or 0} replayed={r['replayed']} "
                f"failed={r['failed']}{errors_text(r['errors'])} cpu/resume={fmt(r['server_cpu_ms_per_resume'], 2)}ms"
                f" load={r['load'][0][0]:.2f}")
    if r["scenario"] == "storm-api":
        return (f"{head} clients={r['clients']} sends/s={fmt(r['sends_per_s'])} api_p50={fmt(r['api_p50_ms'], 1)}ms "
                f"api_p99={fmt(r['api_p99_ms'], 1)}ms non_2xx={r['non_2xx']} 5xx={r['status_5xx']}"
                f"{errors_text(r['errors'])} frames={r['received']} lost={r['lost']} "
                f"send->frame_p99={fmt(r['p99_ms'], 1)}ms closed={r['close_codes'] or 0} "
                f"cpu/send={fmt(r['server_cpu_ms_per_send'], 2)}ms "
                f"load={r['load'][0][0]:.2f}")
    if r["scenario"] == "storm-batch":
        if not r["available"]:
            return f"{head} n/a (no batch endpoint)"
        return (f"{head} clients={r['clients']} batches={r['batches']}x{r['size']} "
                f"notifications/s={fmt(r['notifications_per_s'])} stored={r['stored']} "
                f"item_statuses={r['item_statuses']} http={r['statuses']}{errors_text(r['errors'])} "
                f"batch_p99={fmt(r['batch_p99_ms'], 1)}ms frames={r['received']} lost={r['lost']} "
                f"send->frame_p99={fmt(r['p99_ms'], 1)}ms closed={r['close_codes'] or 0} load={r['load'][0][0]:.2f}")
    raise ValueError(r["scenario"])


def format_other_row(r: dict) -> str:
    if r["scenario"] == "connect":
        return (f"{r['scenario']:<13} {r['target']:<18} N={r['n']:<6} connects/s={fmt(r['connects_per_s'])} "
                f"failed={r['failed']} p99={fmt(r['connect_p99_ms'], 1)}ms KiB/conn={fmt(r['kib_per_connection'], 1)}"
                f" load={r['load'][0][0]:.2f}")
    extra = f" api p99={fmt(r['api_p99_ms'], 1)}ms" if r["scenario"] == "personal-api" else ""
    if r.get("send_errors"):
        extra += f" send_errors={sum(r['send_errors'].values())} ({next(iter(r['send_errors']))[:40]}...)"
    return (f"{r['scenario']:<13} {r['target']:<18} N={r['n']:<6} rate={r['rate']:<5} "
            f"offered/s={fmt(float(r['offered_per_s']))} delivered/s={fmt(r['delivered_per_s'])} "
            f"p50={fmt(r['p50_ms'], 1)}ms p99={fmt(r['p99_ms'], 1)}ms max={fmt(r['max_ms'], 1)}ms "
            f"lost={r['lost']} closed={r['close_codes'] or 0} cpu/1000={fmt(r['server_cpu_ms_per_1000'], 1)}ms"
            f" client_cpu/1000={fmt(r['client_cpu_ms_per_1000'], 1)}ms"
            f" sender_lag_p99={fmt(r['sender_lag_p99_ms'], 1)}ms{extra} load={r['load'][0][0]:.2f}")


def summarize(rows: list[dict]) -> dict:
    """Per scenario and N: each target's best lossless delivered/s, its p99 at 10/s, and ratios."""
    out: dict = {}
    for r in rows:
        if r["scenario"] not in ("broadcast",):
            continue
        key = f"broadcast N={r['n']}"
        entry = out.setdefault(key, {}).setdefault(r["target"], {"peak_lossless_per_s": 0.0, "peak_per_s": 0.0})
        entry["peak_per_s"] = max(entry["peak_per_s"], r["delivered_per_s"])
        if not r["lost"] and r["open_sockets"] >= r["expected"] // max(1, r["sent"]):
            entry["peak_lossless_per_s"] = max(entry["peak_lossless_per_s"], r["delivered_per_s"])
        if r["rate"] == 10:
            entry["p99_ms_at_10"] = r["p99_ms"]
            entry["lost_at_10"] = r["lost"]
    storm = summarize_storm(rows)
    for per_target in out.values():
        raw = per_target.get("raw", {}).get("peak_per_s")
        base = per_target.get("baseline", {}).get("peak_lossless_per_s") or per_target.get("baseline", {}).get(
            "peak_per_s")
        for entry in per_target.values():
            if raw:
                entry["ratio_to_raw"] = round(entry["peak_lossless_per_s"] / raw, 3)
            if base:
                entry["ratio_to_baseline"] = round(entry["peak_lossless_per_s"] / base, 2)
    out.update(storm)
    return out


# Issue 14's targets, per storm row: (what it says, is it met).
STORM_TARGETS = {
    "connect": ("≥ 1,000 connects/s, p99 ≤ 500 ms, no failures",
                lambda e: e["per_s"] >= 1000 and e["p99_ms"] <= 500 and not e["failed"]),
    "resume": ("≥ 1,000 resumes/s for 2,000 dropped at once, every one recovered, p99 ≤ 1 s",
               lambda e: e["per_s"] >= 1000 and e["recovered"] == e["of"] and e["p99_ms"] <= 1000
               and not e["failed"]),
    "api": ("≥ 1,000 personal sends/s with 16 keep-alive clients, no 5xx, p99 ≤ 100 ms",
            lambda e: e["per_s"] >= 1000 and not e["status_5xx"] and (e["p99_ms"] or 0) <= 100),
    "batch": ("≥ 10,000 notifications/s", lambda e: e["per_s"] >= 10_000),
}


def summarize_storm(rows: list[dict]) -> dict:
    """``storm N=<n>``: each storm row's rate and p99, the connect and resume rates against the
    tutorial app's and the raw server's connect rates of the same run, and issue 14's targets."""
    out: dict = {}
    for r in rows:
        kind = r["scenario"].removeprefix("storm-")
        if not r["scenario"].startswith("storm-"):
            continue
        section = out.setdefault(f"storm N={r['n']}", {})
        if kind == "connect":
            e = {"per_s": r["connects_per_s"], "p99_ms": r["connect_p99_ms"], "failed": r["failed"],
                 "of": r["n"]}
        elif kind == "resume":
            e = {"per_s": r["resumes_per_s"], "p99_ms": r["resume_p99_ms"], "failed": r["failed"],
                 "recovered": r["recovered"], "of": r["n_connected"]}
        elif kind == "api":
            e = {"per_s": r["sends_per_s"], "p99_ms": r["api_p99_ms"], "non_2xx": r["non_2xx"],
                 "status_5xx": r["status_5xx"]}
        elif not r["available"]:
            e = {"per_s": None, "available": False}
        else:
            e = {"per_s": r["notifications_per_s"], "p99_ms": r["batch_p99_ms"], "lost": r["lost"]}
        e["server_log_problems"] = sum(r.get("server_log", {}).values())
        if e["per_s"] is not None:
            e["target"], met = STORM_TARGETS[kind]
            e["target_met"] = bool(met(e))
        section[f"{kind} {r['target']}"] = e
    for section in out.values():
        base = section.get("connect baseline", {}).get("per_s")
        raw = section.get("connect raw", {}).get("per_s")
        for key, e in section.items():
            if key.startswith(("connect ", "resume ")) and e.get("per_s"):
                if base:
                    e["ratio_to_baseline_connects"] = round(e["per_s"] / base, 3)
                if raw:
                    e["ratio_to_raw_connects"] = round(e["per_s"] / raw, 3)
    return out


def print_storm(key: str, section: dict) -> None:
    base = section.get("connect baseline", {}).get("per_s")
    raw = section.get("connect raw", {}).get("per_s")
    print(f"\n{key}: issue 14 (200 handshakes in flight), beside this run's connect rates of the tutorial "
          f"Channels app ({fmt(base)}/s) and raw websockets ({fmt(raw)}/s)")
    for name, e in section.items():
        kind = name.split(" ", 1)[0]
        if e.get("available") is False:
            print(f"  {name:<26} n/a (no batch endpoint)")
            continue
        unit = {"connect": "connects/s", "resume": "resumes/s", "api": "sends/s", "batch": "notifications/s"}[kind]
        line = f"  {name:<26} {fmt(e['per_s']):>8} {unit:<16} p99 {fmt(e['p99_ms'], 1):>8} ms"
        if kind == "connect":
            line += f"  failed {e['failed']}"
        elif kind == "resume":
            line += f"  recovered {e['recovered']}/{e['of']}  failed {e['failed']}"
        elif kind == "api":
            line += f"  non-2xx {e['non_2xx']} (5xx {e['status_5xx']})"
        elif kind == "batch":
            line += f"  frames lost {e['lost']}"
        if e["server_log_problems"]:
            line += f"  server log: {e['server_log_problems']} warnings/errors"
        if "ratio_to_baseline_connects" in e or "ratio_to_raw_connects" in e:
            line += (f"  x{e.get('ratio_to_baseline_connects', float('nan')):.2f} baseline"
                     f"  x{e.get('ratio_to_raw_connects', float('nan')):.2f} raw")
        if kind == "connect" and not name.startswith("connect product"):
            print(line)  # a baseline: issue 14's targets are the product's
            continue
        note = " (the target is for 2,000)" if kind == "resume" and e["of"] < 2000 else ""
        print(f"{line}  [target {e['target']}: {'met' if e['target_met'] else 'not met'}{note}]")


def print_summary(summary: dict) -> None:
    for key, per_target in summary.items():
        if key.startswith("storm "):
            print_storm(key, per_target)
            continue
        print(f"\n{key}: best lossless delivered/s (ratio to raw websockets, to the tutorial Channels app)")
        for name, e in per_target.items():
            raw, base = e.get("ratio_to_raw", float("nan")), e.get("ratio_to_baseline", float("nan"))
            print(f"  {name:<28} {e['peak_lossless_per_s']:>10,.0f}/s  x{raw:.2f} raw  x{base:.1f} baseline"
                  f"  p99@10/s={e.get('p99_ms_at_10')}ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every scenario, N=1000/5000/10000 (about 20 minutes)")
    parser.add_argument("--only", default="", help="comma-separated: broadcast,topic,personal,connect,storm")
    parser.add_argument("--targets", default="", help="default raw,baseline,product (storm: raw,baseline,"
                        "product-2workers; its resume, API and batch rows are measured on the product targets)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rates", default="")
    parser.add_argument("--duration", type=float, default=0)
    parser.add_argument("--clients", type=int, default=2, help="load-generator processes")
    parser.add_argument("--profile", action="store_true", help="py-spy record the product server during each phase")
    parser.add_argument("--no-stop", action="store_true", help="do not stop a rate sweep at saturation")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every server and client
    if hard < 25000 and args.full:
        log(f"warning: RLIMIT_NOFILE hard limit {hard}: 10,000 sockets need about 10,100 per process")
    log(f"load average at start: {loadavg()}")
    bench = Bench(args)
    targets = args.targets.split(",") if args.targets else ["raw", "baseline", "product"]
    storm_targets = args.targets.split(",") if args.targets else STORM_DEFAULT_TARGETS
    only = set(filter(None, args.only.split(",")))
    if args.full:
        bench.setup(10_000)
        product_targets = [t for t in targets if t.startswith("product")] or ["product"]
        if not only or "connect" in only:  # first: every inbox is empty (see clear_notifications)
            bench.connects(targets, 5000)
            bench.connects([t for t in targets if t != "baseline"], 10_000)
        if not only or "storm" in only:  # empties every inbox first
            bench.storm(storm_targets, 2000, api_duration=10.0, batches=5)
        if not only or "broadcast" in only:
            bench.broadcast(targets, 1000, [10, 25, 50, 75, 100, 150, 200], 3.0)
            bench.broadcast(targets, 5000, [2, 5, 10, 15, 20, 30, 40], 3.0)
        if not only or "personal" in only:
            for target in product_targets:
                bench.personal(1000, [100, 500], 4.0, target)
        if not only or "topic" in only:
            bench.topic(1000, [10, 100], 3.0)
    elif only:
        bench.setup(max(args.n + 40, 1000))
        rates = [float(x) if "." in x else int(x) for x in args.rates.split(",")] if args.rates else [10, 100, 200]
        duration = args.duration or 3.0
        if "broadcast" in only:
            bench.broadcast(targets, args.n, rates, duration)
        product_targets = [t for t in targets if t.startswith("product")] or ["product"]
        if "personal" in only:
            for target in product_targets:
                bench.personal(args.n, rates if args.rates else [100, 500], duration, target)
        if "topic" in only:
            for target in product_targets:
                bench.topic(args.n, rates if args.rates else [10, 100], duration, target)
        if "connect" in only:
            bench.connects(targets, args.n)
        if "storm" in only:
            bench.storm(storm_targets, args.n, api_duration=args.duration or 5.0)
    else:  # the short run of `make bench`: the storm rows at 500 clients (the full 2,000: --only storm)
        bench.setup(1020)
        bench.connects(["product"], 1000)
        bench.broadcast(targets, 1000, [10, 50, 100], 2.0)
        bench.personal(1000, [100], 3.0)
        bench.storm(STORM_DEFAULT_TARGETS, 500, api_duration=3.0, batches=2)
    bench.write()


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    main()
