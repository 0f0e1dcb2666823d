"""Batch sends (``notification_send_batch``) against one ``notification_send`` per notification.

    .venv/bin/python bench/batch.py                        # 5 repeats of 2 batches of 1,000 (~40 s)
    .venv/bin/python bench/batch.py --repeats 3 --batches 5 --variants batch,api

One process (a script: no event loop of its own) sends personal notifications to ``--users``
users (100), round robin, ``--batches`` x ``--batch-size`` (1,000) notifications per run, in
three variants, run one after the other in each of ``--repeats`` rounds:

- ``batch``: ``services.notification_send_batch`` of ``--batch-size`` items without idempotency
  keys, one item per notification (one transaction, one push per batch);
- ``api``: the same items through ``POST /api/notifications/batch/`` in this process (Django's
  test client: authentication, JSON, validation, the response's payloads; no network);
- ``single``: the same number of notifications, one ``notification_send`` each (one transaction
  and one push each): the baseline.

Reported per variant: notifications per second, the median over the repeats with the range, and
the median time of one call; for ``batch``, also the time inside each step of the call
(validation, the user check, the offsets, ``bulk_create``, the push after commit). Pushes go to
a private ``redis-server`` (emptied before each run), where one channel is a member of every
user's group (as one server process's hub with a socket of every user), so each push writes its
messages as in production.

PostgreSQL: ``BENCH_DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/notif_bench``,
created and migrated here, as bench/run.py does; this script's own notifications, sent as user
``batch-sender``, are deleted first; the stored notifications are counted from the calls' answers).
Writes ``bench/results/batch-<date>.json`` and prints a markdown table.
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

BASE_DIR = Path(__file__).resolve().parent.parent
RESULTS = BASE_DIR / "bench" / "results"
PY = sys.executable
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/notif_bench"
VARIANTS = ("batch", "api", "single")
sys.path.insert(0, str(BASE_DIR))


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# The sending process


def worker(args: argparse.Namespace) -> None:
    """Set up Django on the bench database, run every round, print one JSON line."""
    import django

    django.setup()
    import redis
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from django.test import Client
    from prometheus_client import REGISTRY

    from notifications import push, services, streams
    from notifications.auth import token_create
    from notifications.models import Notification
    from notifications.streams import user_stream

    User = get_user_model()
    names = [f"batch-u{i:03d}" for i in range(args.users)]
    have = set(User.objects.filter(username__in=names).values_list("username", flat=True))
    User.objects.bulk_create([User(username=n) for n in names if n not in have])
    user_ids = list(User.objects.filter(username__in=names).order_by("pk").values_list("pk", flat=True))
    sender, _ = User.objects.get_or_create(username="batch-sender", defaults={"is_staff": True})
    sender.user_permissions.add(Permission.objects.get(content_type__app_label="notifications",
                                                       codename="add_notification"))
    sender = User.objects.get(pk=sender.pk)  # fresh permission cache
    Notification.objects.filter(actor=sender).delete()  # this script's own, from earlier runs
    token = token_create(user=sender)[1]
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_HOST="127.0.0.1")
    asyncio.run(member(os.environ["REDIS_URL"], os.environ["REDIS_PREFIX"], [user_stream(pk) for pk in user_ids]))
    redis_client = redis.Redis.from_url(os.environ["REDIS_URL"])

    def failures() -> float:
        return REGISTRY.get_sample_value("notifications_push_failures_total") or 0.0

    def items(batch: int) -> list[dict]:
        start = batch * args.batch_size
        return [{"title": "bench batch", "data": {"seq": start + i}, "users": [user_ids[(start + i) % len(user_ids)]]}
                for i in range(args.batch_size)]

    phases: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        """Count the time spent in ``owner.name`` under ``label`` (the batch variant's breakdown)."""
        inner = getattr(owner, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, name, wrapper)

    timed(services, "_notification_rows", "validate and build rows")
    timed(services, "_active_user_ids", "check users")
    timed(streams, "reserve_counts", "reserve offsets")
    timed(Notification.objects, "bulk_create", "bulk_create")
    timed(push, "notifications_created", "push (encode, publish)")

    def run_batch() -> tuple[list[float], int]:
        times, stored = [], 0
        for b in range(args.batches):
            batch_items = items(b)
            t = time.perf_counter()
            results = services.notification_send_batch(batch_items, actor=sender)
            times.append(time.perf_counter() - t)
            assert {r.outcome for r in results} == {"stored"}, {r.outcome for r in results}
            stored += sum(len(r.notifications) for r in results)
        return times, stored

    def run_api() -> tuple[list[float], int]:
        times, stored = [], 0
        for b in range(args.batches):
            body = json.dumps({"items": items(b)})
            t = time.perf_counter()
            response = client.post("/api/notifications/batch/", body, content_type="application/json")
            times.append(time.perf_counter() - t)
            assert response.status_code == 200, response.content[:500]
            results = response.json()["results"]
            assert {r["status"] for r in results} == {201}
            stored += sum(len(r["notifications"]) for r in results)
        return times, stored

    def run_single() -> tuple[list[float], int]:
        times, stored = [], 0
        for b in range(args.batches):
            for item in items(b):
                t = time.perf_counter()
                stored += len(services.notification_send(actor=sender, **item))
                times.append(time.perf_counter() - t)
        return times, stored

    runners = {"batch": run_batch, "api": run_api, "single": run_single}
    # Warm up (the first push connects to Redis and starts the transport's loop; first queries, imports).
    services.notification_send_batch(items(0)[:100], actor=sender)
    assert client.post("/api/notifications/batch/", json.dumps({"items": items(0)[:100]}),
                       content_type="application/json").status_code == 200
    runs = []
    for repeat in range(args.repeats):
        for variant in args.variants:
            redis_client.flushall()
            asyncio.run(member(os.environ["REDIS_URL"], os.environ["REDIS_PREFIX"],
                               [user_stream(pk) for pk in user_ids]))
            failed_before = failures()
            phases.clear()
            started = time.perf_counter()
            times, stored = runners[variant]()  # counted from the answers: other benchmarks may share the database
            elapsed = time.perf_counter() - started
            result = {"variant": variant, "repeat": repeat + 1, "notifications": stored, "elapsed_s": elapsed,
                      "notifications_per_s": stored / elapsed, "call_ms_median": 1000 * statistics.median(times),
                      "calls": len(times), "push_failures": failures() - failed_before,
                      "phases_ms_per_call": {k: 1000 * v / len(times) for k, v in phases.items()}
                      if variant == "batch" else {}}
            log(f"run {repeat + 1}/{args.repeats} {variant:<7} {result['notifications_per_s']:9,.0f} notifications/s"
                f"  {stored} in {elapsed:.2f} s  (median call {result['call_ms_median']:.2f} ms)")
            if result["phases_ms_per_call"]:
                log("    " + ", ".join(f"{k} {v:.1f} ms" for k, v in result["phases_ms_per_call"].items()))
            runs.append(result)
    print(json.dumps({"runs": runs}), flush=True)


async def member(url: str, prefix: str, groups: list[str]) -> None:
    """One channel in every group the sends go to (one server process's hub serving every user)."""
    from django.utils.module_loading import import_string

    from project.layers import redis_channel_layer

    config = redis_channel_layer(url, prefix)
    layer = import_string(config["BACKEND"])(**config["CONFIG"])
    channel = await layer.new_channel()
    for group in groups:
        await layer.group_add(group, channel)
    await layer.close_pools()


# The run


def setup_database(db_url: str) -> None:
    import psycopg

    name = db_url.rsplit("/", 1)[1]
    admin_url = db_url.rsplit("/", 1)[0] + "/postgres"
    try:
        psycopg.connect(admin_url, connect_timeout=2).close()
    except Exception as exc:
        sys.exit(f"bench: PostgreSQL ({admin_url}) must be running: {type(exc).__name__}: {exc}")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def environment(db_url: str, redis_url: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DJANGO_", "CHANNELS_", "REDIS_", "DATABASE_URL", "PUSH_TIMEOUT", "DB_POOL"))}
    env.update({"DATABASE_URL": db_url, "REDIS_URL": redis_url, "REDIS_PREFIX": f"bench-batch-{uuid.uuid4().hex[:8]}",
                "DEBUG": "0", "SECRET_KEY": "bench-not-secret", "LOG_LEVEL": "WARNING", "ALLOWED_HOSTS": "127.0.0.1",
                "DJANGO_SETTINGS_MODULE": "project.settings", "PYTHONPATH": str(BASE_DIR), "PYTHONUNBUFFERED": "1"})
    return env


def summarize(runs: list[dict], variants) -> list[dict]:
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        row = {"variant": variant, "repeats": len(mine), "notifications": mine[0]["notifications"]}
        for key in ("notifications_per_s", "call_ms_median"):
            values = [r[key] for r in mine]
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        row["push_failures"] = sum(r["push_failures"] for r in mine)
        if mine[0]["phases_ms_per_call"]:
            row["phases_ms_per_call_median"] = {
                k: statistics.median(r["phases_ms_per_call"].get(k, 0.0) for r in mine)
                for k in mine[0]["phases_ms_per_call"]}
        rows.append(row)
    return rows


def table(rows: list[dict], batch_size: int) -> str:
    def cell(value: dict, digits: int) -> str:
        return f"{value['median']:,.{digits}f} ({value['min']:,.{digits}f}–{value['max']:,.{digits}f})"

    single = next((r for r in rows if r["variant"] == "single"), None)
    what = {"batch": f"`notification_send_batch`, {batch_size} items", "api": f"`POST /api/notifications/batch/`, "
            f"{batch_size} items (in-process client)", "single": "`notification_send`, one per notification"}
    out = ["| variant | notifications per run | notifications/s | ms per call | vs single | push failures |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['notifications_per_s']['median'] / single['notifications_per_s']['median']:.1f}x" if single else ""
        out.append(f"| {what[r['variant']]} | {r['notifications']:,} | {cell(r['notifications_per_s'], 0)} | "
                   f"{cell(r['call_ms_median'], 2)} | {ratio} | {r['push_failures']:.0f} |")
    for r in rows:
        if "phases_ms_per_call_median" in r:
            out.append("")
            out.append(f"Inside one `{r['variant']}` call (median ms): " + ", ".join(
                f"{k} {v:.1f}" for k, v in r["phases_ms_per_call_median"].items()))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (the table shows the median)")
    parser.add_argument("--batches", type=int, default=2, help="batches per run")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {', '.join(sorted(unknown))} (of: {', '.join(VARIANTS)})")
    if args.worker:
        worker(args)
        return

    from tests.faults.scenarios import RedisServer

    started = time.time()
    db_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = RESULTS / "tmp" / f"batch-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_database(db_url)
    redis_server = RedisServer(run_dir / "redis.log").start()
    try:
        env = environment(db_url, redis_server.url)
        subprocess.run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=BASE_DIR, env=env, check=True)
        argv = [PY, __file__, "--worker", "--repeats", str(args.repeats), "--batches", str(args.batches),
                "--batch-size", str(args.batch_size), "--users", str(args.users), "--variants", ",".join(args.variants)]
        out = subprocess.run(argv, cwd=BASE_DIR, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    finally:
        redis_server.stop()
    runs = json.loads(out.strip().splitlines()[-1])["runs"]
    rows = summarize(runs, args.variants)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BASE_DIR, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BASE_DIR,
                                capture_output=True, text=True).stdout.strip())
    data = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": round(time.time() - started, 1),
        "git_commit": commit, "git_dirty": dirty, "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_end": os.getloadavg()},
        "database": db_url.split("@")[-1], "redis": "private redis-server", "rows": rows, "runs": runs,
    }
    path = RESULTS / f"batch-{stamp}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(table(rows, args.batch_size))
    log(f"written: {path.relative_to(BASE_DIR)} ({data['duration_s']} s)")


if __name__ == "__main__":
    main()
