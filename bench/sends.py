"""Sends from plain synchronous code: the push transport against the old per-send ``async_to_sync``.

    .venv/bin/python bench/sends.py                    # 8 processes, 5 s, 3 repeats per variant (~1 minute)
    .venv/bin/python bench/sends.py --processes 4 --duration 10 --repeats 5

Each of ``--processes`` processes (a script, a Celery worker, a management command: no event
loop of its own) calls ``notification_send`` for one user at a time, one transaction each,
in a loop for ``--duration`` seconds. Two variants, run alternately, ``--repeats`` times each:

- ``transport``: the tree as it is (``push`` → ``notifications.transport.publish``: one
  event loop and one set of Redis connections per process);
- ``async_to_sync``: the same, with ``transport.publish`` replaced at start by the old path,
  ``async_to_sync`` of the ``group_send`` calls per send (a new event loop each time).

Reported per variant: sends per second (all processes), p50 and p99 of one
``notification_send`` call, and the Redis connections opened per 1,000 sends (the change of
``total_connections_received`` in ``INFO stats``, on a private ``redis-server`` that nothing
else uses, over the run including start-up): the median over the repeats, with the range.
One channel is a member of every group the sends go to (as one server process's hub with a
socket of every user), so each ``group_send`` writes a message as in production; Redis is
emptied before each run.

PostgreSQL: ``BENCH_DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/notif_bench``,
created and migrated here, as bench/run.py does; its notifications are deleted first).
Writes ``bench/results/sends-<date>.json``.
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.faults.scenarios import RedisServer

BASE_DIR = Path(__file__).resolve().parent.parent
RESULTS = BASE_DIR / "bench" / "results"
PY = sys.executable
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/notif_bench"
VARIANTS = ("transport", "async_to_sync")
USERS = 100
sys.path.insert(0, str(BASE_DIR))

from bench.batch import setup_database  # noqa: E402
from bench.sender import percentile  # noqa: E402


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def push_failures() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("notifications_push_failures_total") or 0.0


# One sending process


def use_async_to_sync_per_send() -> None:
    """The push path before notifications/transport.py: a new event loop per send."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from notifications import metrics, transport

    def publish(messages) -> None:
        messages = list(messages)
        layer = get_channel_layer()
        if not messages or layer is None:
            return

        async def send_all() -> None:
            for group, message in messages:
                await layer.group_send(group, message)

        try:
            async_to_sync(send_all)()
        except Exception:
            metrics.push_failed()

    transport.publish = publish


def worker(variant: str, duration: float, user_ids: list[int]) -> None:
    """Wait for ``go`` on stdin, send for ``duration`` seconds, print one JSON line."""
    import django

    django.setup()
    from notifications.services import notification_send

    if variant == "async_to_sync":
        use_async_to_sync_per_send()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    calls: list[float] = []
    errors: dict[str, int] = {}
    failed_before = push_failures()
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < duration:
        t = time.perf_counter()
        try:
            notification_send(title="bench sends", data={"seq": i}, users=[user_ids[i % len(user_ids)]])
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        calls.append(time.perf_counter() - t)
        i += 1
    elapsed = time.perf_counter() - started
    print(json.dumps({"sends": len(calls), "elapsed": elapsed, "calls": calls, "errors": errors,
                      "push_failures": push_failures() - failed_before}), flush=True)


# The run


def read_line(worker: subprocess.Popen[str], variant: str) -> str:
    assert worker.stdout is not None
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"a {variant} worker exited early ({worker.wait()})")
    return line


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.db_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
        self.prefix = f"bench-sends-{uuid.uuid4().hex[:8]}"
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = RESULTS / "tmp" / f"sends-{self.stamp}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._redis: RedisServer | None = None
        self.user_ids: list[int] = []
        self.groups: list[str] = []
        self.started = time.time()

    @property
    def redis(self) -> "RedisServer":
        assert self._redis is not None, "setup() starts the private redis-server"
        return self._redis

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DJANGO_", "CHANNELS_", "REDIS_", "DATABASE_URL", "PUSH_TIMEOUT"))}
        env.update({"DATABASE_URL": self.db_url, "REDIS_URL": self.redis.url, "REDIS_PREFIX": self.prefix,
                    "DEBUG": "0", "SECRET_KEY": "bench-not-secret", "LOG_LEVEL": "WARNING",
                    "DJANGO_SETTINGS_MODULE": "project.settings", "PYTHONPATH": str(BASE_DIR),
                    "PYTHONUNBUFFERED": "1"})
        return env

    def setup(self) -> None:

        from tests.faults.scenarios import RedisServer

        setup_database(self.db_url)
        self._redis = RedisServer(self.run_dir / "redis.log").start()
        env = self.env()
        subprocess.run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=BASE_DIR, env=env, check=True)
        script = (
            "import django, json; django.setup()\n"
            "from django.contrib.auth import get_user_model\n"
            "from notifications.models import Notification\n"
            "Notification.objects.all().delete()\n"
            "User = get_user_model()\n"
            f"names = [f'sends-u{{i:03d}}' for i in range({USERS})]\n"
            "have = set(User.objects.filter(username__in=names).values_list('username', flat=True))\n"
            "User.objects.bulk_create([User(username=n) for n in names if n not in have])\n"
            "ids = list(User.objects.filter(username__in=names).order_by('pk').values_list('pk', flat=True))\n"
            # The groups a personal notification of these users goes to: one stream per audience
            # (notifications/streams.py), or the one group "stream" of the tree before it.
            "try:\n"
            "    from notifications.streams import user_stream\n"
            "    groups = [user_stream(pk) for pk in ids]\n"
            "except ImportError:\n"
            "    groups = ['stream']\n"
            "print(json.dumps({'ids': ids, 'groups': groups}))\n"
        )
        out = subprocess.run([PY, "-c", script], cwd=BASE_DIR, env=env, check=True, capture_output=True, text=True)
        found = json.loads(out.stdout)
        self.user_ids, self.groups = found["ids"], found["groups"]

    def connections_received(self) -> int:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.redis.port)
        try:
            return int(client.info("stats")["total_connections_received"])
        finally:
            client.close()

    async def member(self):
        """One channel in every group the sends go to (one server process's hub serving every user)."""
        from django.utils.module_loading import import_string

        from project.layers import redis_channel_layer

        config = redis_channel_layer(self.redis.url, self.prefix)
        layer = import_string(config["BACKEND"])(**config["CONFIG"])
        channel = await layer.new_channel()
        for group in self.groups:
            await layer.group_add(group, channel)
        await layer.close_pools()

    def flush(self) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.redis.port)
        try:
            client.flushall()
        finally:
            client.close()

    def one_run(self, variant: str) -> dict:
        self.flush()
        asyncio.run(self.member())
        env = self.env()
        n = self.args.processes
        before = self.connections_received()
        workers: list[subprocess.Popen[str]] = []
        try:
            for k in range(n):
                users = self.user_ids[k::n] or self.user_ids
                argv = [PY, __file__, "--worker", variant, "--duration", str(self.args.duration),
                        "--users", ",".join(map(str, users))]
                workers.append(subprocess.Popen(argv, cwd=BASE_DIR, env=env, stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, text=True, bufsize=1))
            for w in workers:
                read_line(w, variant)  # ready: Django set up
            for w in workers:
                assert w.stdin is not None
                w.stdin.write("go\n")
                w.stdin.flush()
            replies = [json.loads(read_line(w, variant)) for w in workers]
            for w in workers:
                w.wait(30)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        after = self.connections_received() - 1  # minus this count's own connection
        calls = [c for r in replies for c in r["calls"]]
        sends = sum(r["sends"] for r in replies)
        errors: dict[str, int] = {}
        for r in replies:
            for kind, count in r["errors"].items():
                errors[kind] = errors.get(kind, 0) + count
        return {
            "variant": variant, "processes": n, "sends": sends,
            "sends_per_s": sends / max(r["elapsed"] for r in replies),
            "p50_ms": 1000 * percentile(calls, 0.5), "p99_ms": 1000 * percentile(calls, 0.99),
            "connections": after - before, "connections_per_1000": 1000 * (after - before) / max(1, sends),
            "push_failures": sum(r["push_failures"] for r in replies), "errors": errors,
        }

    def run(self) -> list[dict]:
        runs: list[dict] = []
        for repeat in range(self.args.repeats):
            for variant in self.args.variants:
                result = self.one_run(variant)
                log(f"run {repeat + 1}/{self.args.repeats} {variant:<14} {result['sends_per_s']:7.1f} sends/s  "
                    f"p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms  "
                    f"{result['connections']} connections for {result['sends']} sends")
                runs.append(result)
        return runs

    def stop(self) -> None:
        if self._redis is not None:
            self._redis.stop()


def summarize(runs: list[dict], variants) -> list[dict]:
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "processes": mine[0]["processes"], "repeats": len(mine)}
        for key in ("sends_per_s", "p50_ms", "p99_ms", "connections_per_1000"):
            values = [r[key] for r in mine]
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        row["push_failures"] = sum(r["push_failures"] for r in mine)
        row["errors"] = sum(sum(r["errors"].values()) for r in mine)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def cell(value: dict, digits: int) -> str:
        return f"{value['median']:,.{digits}f} ({value['min']:,.{digits}f}–{value['max']:,.{digits}f})"

    out = ["| push path | processes | sends/s | p50 ms per send | p99 ms per send | Redis connections per 1,000 sends"
           " | push failures | errors |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['processes']} | {cell(r['sends_per_s'], 0)} | {cell(r['p50_ms'], 1)} | "
                   f"{cell(r['p99_ms'], 1)} | {cell(r['connections_per_1000'], 1)} | {r['push_failures']} | "
                   f"{r['errors']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of sending per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (the table shows the median)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--users", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.duration, [int(u) for u in args.users.split(",")])
        return
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {', '.join(sorted(unknown))} (of: {', '.join(VARIANTS)})")
    bench = Bench(args)
    try:
        bench.setup()
        runs = bench.run()
    finally:
        bench.stop()
    rows = summarize(runs, args.variants)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BASE_DIR, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BASE_DIR,
                                capture_output=True, text=True).stdout.strip())
    data = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": round(time.time() - bench.started, 1),
        "git_commit": commit, "git_dirty": dirty, "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_end": os.getloadavg()},
        "database": bench.db_url.split("@")[-1], "redis": "private redis-server", "rows": rows, "runs": runs,
    }
    path = RESULTS / f"sends-{bench.stamp}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(table(rows))
    log(f"written: {path.relative_to(BASE_DIR)} ({data['duration_s']} s)")


if __name__ == "__main__":
    main()
