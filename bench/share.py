"""Messages each server process receives under a personal-send load, with 1, 2 and 4 processes.

    .venv/bin/python bench/share.py [--processes 1,2,4] [--users 200] [--sends 400] [--json out.json]

For each count K: K single-worker ``bin/serve`` processes on their own ports (their own
``/metrics``), the same PostgreSQL (``BENCH_DATABASE_URL``, else a fresh SQLite file) and Redis
(``REDIS_URL``, keys under a unique prefix); ``--users`` users each connected once, spread
round-robin over the processes; ``--sends`` personal notifications to random users, sent from
this process with ``notification_send`` (as a worker would). Then each process's
``notifications_hub_messages_received_total{kind="user"}``: routing by audience means each
receives about its share (1/K of the sends), not all of them. The baseline in the same run is
"every process receives every send": the count the previous version's single group gave.
Prints a table and writes JSON (``--json``, default ``bench/results/share-<date>.json``).
"""

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

import scaleout  # noqa: E402  (bench/scaleout.py: the server wrapper and the user setup)

scaleout.WORKERS = 1


def user_messages(port: int) -> float:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    found = re.search(r'^notifications_hub_messages_received_total\{kind="user"\} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def one_count(count: int, args, raws: list[str], user_ids: list[int]) -> dict:
    from asgiref.sync import sync_to_async
    from websockets.asyncio.client import connect

    from notifications import services

    servers = []
    for i in range(count):
        env = {**os.environ, "SERVER_ID": f"share-{i}", "PYTHONUNBUFFERED": "1"}
        log = Path(tempfile.gettempdir()) / f"bench-share-{count}-{i}.log"
        log.write_text("")
        server = scaleout.Server("uvicorn", env, log)
        server.start()
        servers.append(server)
    sockets = []
    try:
        for i, raw in enumerate(raws):
            server = servers[i % count]
            ws = await connect(f"ws://127.0.0.1:{server.port}/ws/notifications/",
                               additional_headers={"Authorization": f"Bearer {raw}"},
                               subprotocols=[scaleout.SUBPROTOCOL], open_timeout=30, max_queue=None)
            assert json.loads(await ws.recv())["type"] == "hello"
            sockets.append(ws)
        before = [await asyncio.to_thread(user_messages, s.port) for s in servers]
        rng = random.Random(count)
        send = sync_to_async(services.notification_send, thread_sensitive=True)
        for n in range(args.sends):
            await send(users=[rng.choice(user_ids)], title=f"share {n}")
        await asyncio.sleep(2.0)  # let the last pushes arrive
        after = [await asyncio.to_thread(user_messages, s.port) for s in servers]
        received = [a - b for a, b in zip(after, before, strict=True)]
        return {"processes": count, "sends": args.sends, "received_per_process": received,
                "share_per_process": [r / args.sends for r in received], "expected_share": 1 / count,
                "baseline_every_process_receives": args.sends}
    finally:
        for ws in sockets:
            await ws.close()
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--sends", type=int, default=400)
    parser.add_argument("--json")
    args = parser.parse_args()
    scaleout.configure("bench-share-")
    from django.contrib.auth.models import User

    raws = scaleout.setup(args)
    user_ids = list(User.objects.order_by("-id").values_list("id", flat=True)[: args.users])
    rows = [asyncio.run(one_count(int(k), args, raws, user_ids)) for k in args.processes.split(",")]
    print(f"{'processes':>9}  {'sends':>5}  {'received by each process (user messages)':<44}  share each  expected")
    for row in rows:
        each = ", ".join(f"{r:.0f}" for r in row["received_per_process"])
        shares = ", ".join(f"{s:.2f}" for s in row["share_per_process"])
        print(f"{row['processes']:>9}  {row['sends']:>5}  {each:<44}  {shares}  {row['expected_share']:.2f}")
    print(f"baseline (one group for everyone, the previous version): every process receives all {args.sends}")
    out = Path(args.json or BASE_DIR / "bench" / "results" / f"share-{datetime.now(UTC):%Y%m%d-%H%M%S}.json")
    out.write_text(json.dumps({"date": datetime.now(UTC).isoformat(), "args": vars(args), "rows": rows,
                               "load_average": os.getloadavg()}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    started = time.monotonic()
    main()
    print(f"{time.monotonic() - started:.0f} s")
