"""The fault scenarios of tests/faults, longer and bigger, with figures.

    .venv/bin/python bench/faults.py                      # every scenario, on a fresh SQLite file
    .venv/bin/python bench/faults.py --database-url postgres://postgres@127.0.0.1:5432/notifications
    .venv/bin/python bench/faults.py --only storm --storm-clients 2000

Runs the same scenarios as ``tests/faults/test_faults.py`` (``tests/faults/scenarios.py``,
clients from ``tests/faults/client.py``), on loopback: Redis restarted mid-stream (a
private redis-server), the clients' server killed with SIGTERM and with SIGKILL (clients
fail over to a second process), a reconnect storm (the server restarted under 1000
clients), and the database briefly unavailable (PostgreSQL only: a TCP proxy is cut).

The database is created here: a fresh SQLite file in a temporary directory, or, with
``--database-url postgres://...``, a fresh database ``<name>_faults_<pid>`` on that server,
dropped at the end. Redis is ``--redis-url`` (default ``REDIS_URL`` or the local one) under a
unique prefix per scenario; the Redis restart scenario uses a private redis-server.

Prints, per scenario: clients, notifications sent, deliveries expected and received,
lost, duplicated, out of order (a frame not at the next offset of its stream, or a resumed
cursor that disagrees with what the client received: ``tests/faults/client.py``), p99 resume
time (from a client noticing the close to its ``resumed`` frame), and writes
``bench/results/faults-<date>.json`` with every figure and fact.
Server logs stay in the temporary directory printed at the start.
"""

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BASE_DIR = Path(__file__).resolve().parent.parent
RESULTS = BASE_DIR / "bench" / "results"
sys.path.insert(0, str(BASE_DIR))

SCENARIOS = ("redis", "sigterm", "sigkill", "storm", "database")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--database-url", default="", help="a PostgreSQL server to create the database on "
                        "(default: a temporary SQLite file; the database scenario needs PostgreSQL)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    parser.add_argument("--clients", type=int, default=500, help="clients in the Redis, SIGTERM, SIGKILL scenarios")
    parser.add_argument("--storm-clients", type=int, default=1000)
    parser.add_argument("--db-clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="notifications per second sent")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each stream (SIGTERM/SIGKILL: "
                        "the kill happens after a quarter of it)")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds Redis or the database stays down")
    parser.add_argument("--presence-ttl", type=int, default=3, help="PRESENCE_TTL of the servers in the kill scenarios")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def raise_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Database:
    """A fresh database for this run: SQLite in ``workdir``, or a new PostgreSQL database."""

    def __init__(self, server_url: str, workdir: Path):
        self.server_url = server_url
        self.postgres = server_url.startswith(("postgres://", "postgresql://"))
        if self.postgres:
            parts = urlsplit(server_url)
            self.name = f"{parts.path.lstrip('/') or 'notifications'}_faults_{os.getpid()}"
            self.url = urlunsplit(parts._replace(path=f"/{self.name}"))
        elif server_url:
            raise SystemExit("--database-url must be a postgres:// URL (SQLite is the default)")
        else:
            self.name = str(workdir / "faults.sqlite3")
            self.url = f"sqlite:///{self.name}"

    def _admin(self, sql: str) -> None:
        import psycopg

        parts = urlsplit(self.server_url)
        admin = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql)

    def create(self) -> None:
        if self.postgres:
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}"')
            self._admin(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        if self.postgres:
            from django.db import connections

            connections.close_all()
            try:
                self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            except Exception as exc:  # leave it rather than fail the report
                log(f"could not drop {self.name}: {exc}")


def setup_django(database: Database) -> None:
    os.environ["DATABASE_URL"] = database.url
    os.environ["DJANGO_SETTINGS_MODULE"] = "project.settings"
    os.environ.pop("REDIS_URL", None)  # this process only creates users: in-memory layer and cache
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def refused(outcome) -> int:
    """Sends the API did not accept (201) when it should have: during a database cut, 503 is expected."""
    facts = outcome.facts
    return len(facts.get("refused_sends", [])) + len(facts.get("refused_after_restore", []))


def row(outcome) -> str:
    r = outcome.report
    p99 = "-" if r.resume_p99 is None else f"{r.resume_p99:.2f} s"
    return (f"{outcome.scenario:<24} {r.clients:>7} {r.sent:>6} {refused(outcome):>7} {r.expected:>9} "
            f"{r.received:>9} {r.lost:>5} {r.duplicated:>5} {r.out_of_order:>5} {p99:>9} {outcome.seconds:>7.1f} "
            f"{'yes' if outcome.complete else 'NO':>9}")


HEADER = (f"{'scenario':<24} {'clients':>7} {'sent':>6} {'refused':>7} {'expected':>9} {'received':>9} "
          f"{'lost':>5} {'dup':>5} {'order':>5} {'p99 res.':>9} {'seconds':>7} {'complete':>9}")


async def run(args, world, database: Database) -> list:
    from tests.faults import scenarios

    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    per = max(1, round(args.rate * args.seconds / 3))  # notifications before, during and after an outage
    outcomes = []
    for name in chosen:
        world.prefix = f"faults-bench-{uuid.uuid4().hex[:8]}"
        log(f"\n== {name}")
        try:
            if name == "redis":
                outcome = await scenarios.redis_restarted(
                    world, clients=args.clients, before=per, during=per, after=per, rate=args.rate,
                    outage=args.outage, drop=max(1, args.clients // 10), deliver_timeout=120)
            elif name in ("sigterm", "sigkill"):
                outcome = await scenarios.server_killed(
                    world, sig=signal.SIGTERM if name == "sigterm" else signal.SIGKILL, clients=args.clients,
                    rate=args.rate, before=args.seconds / 4, after=args.seconds * 3 / 4,
                    presence_ttl=args.presence_ttl, deliver_timeout=120)
            elif name == "storm":
                outcome = await scenarios.reconnect_storm(
                    world, clients=args.storm_clients, before=per, during=per, after=per, rate=args.rate,
                    connect_timeout=300, deliver_timeout=300)
            else:
                if not database.postgres:
                    log("skipped: the database scenario needs --database-url postgres://...")
                    continue
                outcome = await scenarios.database_unavailable(
                    world, clients=args.db_clients, before=per, during=per, after=per, rate=args.rate,
                    outage=args.outage, deliver_timeout=120)
        finally:
            await asyncio.to_thread(world.stop_all)
            world.servers.clear()
            await asyncio.to_thread(world.cleanup_redis)
        outcomes.append(outcome)
        log(outcome.report.summary())
        log(json.dumps(outcome.facts, default=str)[:2000])
    return outcomes


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BASE_DIR, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> int:
    args = parse_args()
    raise_open_files(4 * max(args.storm_clients, args.clients) + 1024)
    workdir = Path(tempfile.mkdtemp(prefix="faults-bench-"))
    log(f"server logs in {workdir}")
    database = Database(args.database_url, workdir)
    database.create()
    setup_django(database)

    import redis as redis_py
    from django.conf import settings

    from tests.faults.scenarios import World, populate

    try:
        redis_py.Redis.from_url(args.redis_url, socket_timeout=2).ping()
    except redis_py.RedisError as exc:
        raise SystemExit(f"Redis is not answering at {args.redis_url}: {exc}") from None
    if shutil.which("redis-server") is None:
        log("warning: redis-server is not installed; the Redis restart scenario will fail")
    users = max(args.clients, args.storm_clients, args.db_clients) // 10 + 1  # at most 10 connections per user
    log(f"creating {users} users ({database.url})")
    members, staff_token = populate(users)
    world = World(db_url=database.url, redis_url=args.redis_url, secret_key=settings.SECRET_KEY, log_dir=workdir,
                  members=members, staff_token=staff_token)
    started = time.monotonic()
    try:
        outcomes = asyncio.run(run(args, world, database))
    finally:
        world.stop_all()
        database.drop()
    print()
    print(HEADER)
    for outcome in outcomes:
        print(row(outcome))
    failed = [o.scenario for o in outcomes if not (o.complete and o.report.ok and not refused(o))]
    everywhere = "0 lost, 0 duplicated, 0 out of order, 0 refused everywhere"
    print(f"\n{len(outcomes)} scenario(s) in {time.monotonic() - started:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else everywhere))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"faults-{stamp}.json"
    path.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg": Path("/proc/loadavg").read_text().split()[:3]},
        "database": "postgresql" if database.postgres else "sqlite",
        "args": {k: str(v) for k, v in vars(args).items()},
        "scenarios": [o.figures() for o in outcomes],
        "logs": str(workdir),
    }, indent=1, default=str))
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
