"""Delivery beyond the socket: what a send pays for its job row, and emails and pushes per second.

    .venv/bin/python bench/delivery.py              # 10,000 recipients, 3 repeats (~9-10 minutes here)
    .venv/bin/python bench/delivery.py --quick      # 1,000 recipients, 1 repeat, fewer sends (smoke run)
    .venv/bin/python bench/delivery.py --profile    # also cProfile the first repeat's phases (slower; not saved)

One measuring process (Django set up on the bench database, the in-memory channel layer, no
``REDIS_URL``: the push to sockets is the same in every variant; ``DELIVERY_WORKER`` off: it
calls the pipeline of notifications/delivery.py itself) runs three parts:

1. **Send-path cost.** ``--sends`` (500) ``notification_send`` calls of each kind (a personal
   send to one user, a broadcast) in three variants: every external channel off
   (``NOTIFICATIONS["DELIVERY_CHANNELS"] = []``: nothing); on, with no rule asking for the
   send's audience or level (the send's one lookup, ``preferences.may_deliver``, and no job);
   on, with a rule that asks (the lookup and one ``DeliveryJob`` per send). The variants take
   turns within each of ``--rounds`` (5) rounds (each first, second and last in turn). Only the
   calls are timed (each commits and pushes, as a send does); the jobs written are deleted
   between rounds. Reported: µs per send per variant, and the added cost per notification of
   each "on" variant (paired with "off" in each round).
2. **Emails per second.** ``--recipients`` (10,000) users ``dbench-<i>`` with an email address
   and a rule ``Preference(scope="broadcast", email=True)``; one broadcast; then planning
   (``plan_due()`` until no job is left: the ``Delivery`` rows) and sending (``send_due("email")``
   until none is due) are timed apart, through a real SMTP server (tests/smtp.py, aiosmtpd) that
   runs in the orchestrating process, so its CPU is not the sender's. Checked: every recipient's
   address arrived exactly once at the server (envelope recipients counted), each message's
   ``Message-ID`` names the broadcast, and every ``Delivery`` row is ``sent``.
3. **Pushes per second.** The same users with the rule ``push=True`` (email off), each with one
   ``PushSubscription`` on a local HTTPS push service (tests/pushservice.py, in the orchestrating
   process, ``check=False``: it records without decrypting), fresh VAPID keys
   (``webpush.generate_keys()``), ``VAPID_SUBJECT`` set, every user offline (no sockets;
   ``LocalPresence``). Checked: every subscription got exactly one request, every answer 201,
   every ``Delivery`` row ``sent`` with ``sent_to`` its subscription; and a sample of the bodies
   (``--verify``, 100 per repeat) decrypted with the browser's keys (http_ece, aes128gcm: the
   subscriptions' keys are derived from the user's name, so the orchestrator knows them) and
   their VAPID headers verified (ES256 signature, ``aud``, ``exp``, ``sub``, the key the sender
   generated), as the ``check=True`` service does.

Parts 2 and 3 run ``--repeats`` (3) times, each with a fresh broadcast (its deliveries deleted
after). Beside each, a same-run **transport baseline**: the same server and client libraries
without the product's pipeline: ``--baseline`` (1,000) copies of one pre-rendered email sent over
Django's SMTP backend, 100 per connection (as a claim does), and ``pywebpush.webpush`` to the same
subscriptions with one payload, one ``requests`` session per 100; no database. The gap to the
baseline is what the pipeline (claims, rendering, marks) costs.

PostgreSQL: ``BENCH_DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/notif_bench``,
created and migrated here, as bench/batch.py does). The bench users, rules and subscriptions are
created once and reused (the subscriptions' endpoints are moved to this run's push service);
this script's notifications (sent as ``dbench-sender``), their deliveries and their jobs are
deleted at start and at the end; nothing else is touched. It stops before planning when another
program's delivery jobs or email/push deliveries are due in that database (``plan_due`` and
``send_due`` would take them); a delivery worker of another process on the same database while it
runs (``DELIVERY_WORKER`` on) would take this script's rows, and the checks would fail. Writes
``bench/results/delivery-<date>.json`` and prints a markdown table.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
RESULTS = BASE_DIR / "bench" / "results"
PY = sys.executable
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/notif_bench"
SENDER = "dbench-sender"
USER_RE = r"^dbench-[0-9]+$"
DOMAIN = "bench.invalid"
TITLE = "Deploy of api-server finished"
BODY = ("Version 2026.12.1 is live on all 12 hosts. Error rate unchanged, p99 latency 41 ms. "
        "Rollback with `deploy rollback api-server` within 24 hours if needed.")
LINK = "/deploys/4211/"
CLAIM = 100  # the rows one send_due call claims (DELIVERY_BATCH's default), and the baseline's batch
sys.path.insert(0, str(BASE_DIR))

from bench.batch import setup_database  # noqa: E402


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def username(i: int) -> str:
    return f"dbench-{i}"


def address(i: int) -> str:
    return f"dbench-{i}@{DOMAIN}"


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def browser_keys(name: str):
    """The browser side of the user's subscription, derived from the user's name (so the rows can be
    reused across runs and the orchestrator can decrypt what was sent): ``(private key, auth secret)``."""
    from cryptography.hazmat.primitives.asymmetric import ec

    seed = hashlib.sha256(f"notif-bench-delivery:{name}".encode()).digest()
    key = ec.derive_private_key(int.from_bytes(seed, "big") % (P256_ORDER - 1) + 1, ec.SECP256R1())
    return key, hashlib.sha256(f"notif-bench-auth:{name}".encode()).digest()[:16]


def median_range(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# The measuring process


class Control:
    """Questions to the orchestrator (which runs the SMTP server and the push service) over stdin/stdout."""

    @staticmethod
    def ask(op: str, **fields) -> dict:
        print("ASK " + json.dumps({"op": op, **fields}), flush=True)
        line = sys.stdin.readline()
        if not line:
            sys.exit("bench: the orchestrator went away")
        return json.loads(line)


def worker(args: argparse.Namespace) -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.mail import get_connection
    from django.db import connection as db_connection
    from django.db.models import CharField, F, Func, Value
    from django.db.models.functions import Concat, StrIndex

    from notifications import delivery, mail, services, webpush
    from notifications.models import Delivery, DeliveryJob, Notification, Preference, PushSubscription

    for key, value in json.loads(os.environ["BENCH_SMTP_SETTINGS"]).items():
        setattr(settings, key, value)
    private, public = webpush.generate_keys()
    base = {**settings.NOTIFICATIONS, "DELIVERY_WORKER": False, "VAPID_PRIVATE_KEY": private, "VAPID_PUBLIC_KEY": "",
            "VAPID_SUBJECT": f"mailto:bench@{DOMAIN}", "SITE_URL": f"https://{DOMAIN}"}
    channels_on = {**base, "DELIVERY_CHANNELS": ["email", "digest", "push"]}
    channels_off = {**base, "DELIVERY_CHANNELS": []}
    settings.NOTIFICATIONS = channels_on
    assert delivery.enabled_channels() == {"email", "digest", "push"}, delivery.enabled_channels()
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"
    from notifications.presence import LocalPresence, get_presence

    assert isinstance(get_presence(), LocalPresence), get_presence()
    push_origin = os.environ["BENCH_PUSH_ORIGIN"]

    # Setup (idempotent): users, rules, subscriptions
    t_setup = time.perf_counter()
    User = get_user_model()
    sender, _ = User.objects.get_or_create(username=SENDER)
    names = [username(i) for i in range(args.recipients)]
    have = set(User.objects.filter(username__in=names).values_list("username", flat=True))
    User.objects.bulk_create([User(username=username(i), email=address(i)) for i in range(args.recipients)
                              if username(i) not in have], batch_size=1000)
    User.objects.filter(username__in=names).exclude(email=Concat(F("username"), Value(f"@{DOMAIN}"))).update(
        email=Concat(F("username"), Value(f"@{DOMAIN}")))
    User.objects.filter(username__in=names, is_active=False).update(is_active=True)
    users = dict(User.objects.filter(username__in=names).values_list("username", "pk"))
    user_ids = [users[n] for n in names]
    ruled = set(Preference.objects.filter(user_id__in=user_ids, scope="broadcast", key="")
                .values_list("user_id", flat=True))
    Preference.objects.bulk_create([Preference(user_id=pk, scope="broadcast", key="") for pk in user_ids
                                    if pk not in ruled], batch_size=1000)
    subscribed = set(PushSubscription.objects.filter(user_id__in=user_ids).values_list("user_id", flat=True))
    new_subscriptions = []
    for name in names:
        if users[name] not in subscribed:
            key, auth = browser_keys(name)
            new_subscriptions.append(PushSubscription(
                user_id=users[name], endpoint=f"{push_origin}/push/{name}", p256dh=webpush.b64url(
                    key.public_key().public_bytes(*_point_format())), auth=webpush.b64url(auth),
                user_agent="bench/delivery.py"))
    PushSubscription.objects.bulk_create(new_subscriptions, batch_size=1000)
    # This run's push service: the same path on its origin (one statement).
    moved = PushSubscription.objects.filter(user__username__regex=USER_RE).update(endpoint=Concat(
        Value(push_origin), Func(F("endpoint"), StrIndex(F("endpoint"), Value("/push/")), function="SUBSTR",
                             output_field=CharField())))
    subscription_of = dict(PushSubscription.objects.filter(user_id__in=user_ids).values_list("user_id", "pk"))
    assert len(subscription_of) == len(user_ids), "a bench user has no (or more than one) subscription"
    # This script's notifications of earlier runs (deliveries cascade), and their jobs.
    cleanup(sender)
    setup_s = time.perf_counter() - t_setup
    log(f"setup: {len(user_ids):,} users ({len(user_ids) - len(have):,} new), {len(new_subscriptions):,} new "
        f"subscriptions, {moved:,} endpoints moved, {setup_s:.1f} s")

    def rules(*, email: bool, push: bool) -> None:
        """This run's users get ``email``/``push`` for broadcasts; other bench users (of a larger earlier run) none."""
        mine = Preference.objects.filter(user_id__in=user_ids, scope="broadcast", key="")
        mine.exclude(email=email, push=push, digest=False).update(email=email, push=push, digest=False)
        Preference.objects.filter(user__username__regex=USER_RE).exclude(user_id__in=user_ids).filter(
            email=True).update(email=False)
        Preference.objects.filter(user__username__regex=USER_RE).exclude(user_id__in=user_ids).filter(
            push=True).update(push=False)

    def nothing_foreign_due() -> None:
        from django.utils import timezone

        now = timezone.now()
        jobs = DeliveryJob.objects.filter(due_at__lte=now).count()
        rows = (Delivery.objects.filter(status="pending", channel__in=["email", "push"], due_at__lte=now)
                .exclude(notification__actor=sender).count())
        if jobs or rows:
            sys.exit(f"bench: {jobs} delivery jobs and {rows} email/push deliveries of other programs are due in "
                     "the bench database: plan_due/send_due would take them. Plan and send them first "
                     "(DATABASE_URL=<bench> manage.py deliver --once), or use another BENCH_DATABASE_URL.")

    # 1. Send-path cost
    personal_to = [user_ids[0]]

    def send(kind: str):
        if kind == "personal":
            return services.notification_send(title=TITLE, body=BODY, link=LINK, actor=sender, users=personal_to)
        return services.notification_send(title=TITLE, body=BODY, link=LINK, actor=sender, broadcast=True)

    def drop_jobs(after_pk: int, ids: set[int]) -> int:
        """Delete the jobs this script's sends wrote (not timed)."""
        mine = [pk for pk, nids in DeliveryJob.objects.filter(pk__gt=after_pk).values_list("pk", "notification_ids")
                if set(nids) <= ids]
        DeliveryJob.objects.filter(pk__in=mine).delete()
        return len(mine)

    def last_job_pk() -> int:
        return DeliveryJob.objects.order_by("-pk").values_list("pk", flat=True).first() or 0

    own_rule, _ = Preference.objects.get_or_create(user_id=personal_to[0], scope="own", key="")

    def asked(yes: bool) -> None:
        """The sends' audiences have a rule that asks for email (a job per send), or none does.
        Then VACUUM ANALYZE: switching 10,000 rules leaves dead entries in the partial indexes
        that the send's lookup reads, which a site whose users change a rule now and then has not."""
        rules(email=yes, push=False)
        Preference.objects.filter(pk=own_rule.pk).update(email=yes)
        with db_connection.cursor() as cursor:
            cursor.execute(f"VACUUM ANALYZE {Preference._meta.db_table}")

    # off: every external channel off; unasked: on, and no rule asks (the send's one lookup, no
    # job); on: on, and a rule asks (the lookup and one DeliveryJob per send).
    variants = {"off": (channels_off, False), "unasked": (channels_on, False), "on": (channels_on, True)}

    def use(name: str) -> None:
        settings.NOTIFICATIONS, yes = variants[name]
        asked(yes)

    for kind in ("personal", "broadcast"):  # warm-up: first queries, the push's loop, imports
        for name in variants:
            use(name)
            start = last_job_pk()
            ids = {row.id for _ in range(20) for row in send(kind)}
            drop_jobs(start, ids)
    send_runs = []
    names = list(variants)
    for rnd in range(args.rounds):
        order = names[rnd % 3:] + names[:rnd % 3]  # each variant first, second and last in turn
        for kind in ("personal", "broadcast"):
            for name in order if kind == "personal" else order[::-1]:
                use(name)
                start, ids, elapsed = last_job_pk(), set(), 0.0
                for _ in range(args.sends):
                    t = time.perf_counter()
                    rows = send(kind)
                    elapsed += time.perf_counter() - t
                    ids.update(row.id for row in rows)
                jobs = drop_jobs(start, ids)
                send_runs.append({"round": rnd + 1, "kind": kind, "variant": name, "sends": args.sends,
                                  "us_per_send": 1e6 * elapsed / args.sends, "jobs_written": jobs})
                log(f"round {rnd + 1}/{args.rounds} {kind:<9} channels {name:<3} "
                    f"{1e6 * elapsed / args.sends:8.0f} µs per send, {jobs} jobs")
    settings.NOTIFICATIONS = channels_on
    asked(False)
    cleanup(sender)

    # 2 and 3. Emails and pushes per second
    profiles: dict[str, str] = {}

    def timed(label: str, repeat: int, fn):
        """Run ``fn``; with --profile, under cProfile in the first repeat (stats written next to the run)."""
        if not (args.profile and repeat == 0):
            t = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t
        import cProfile

        profiler = cProfile.Profile()
        t = time.perf_counter()
        out = profiler.runcall(fn)
        elapsed = time.perf_counter() - t
        path = Path(os.environ["BENCH_RUN_DIR"]) / f"{label}.prof"
        profiler.dump_stats(str(path))
        profiles[label] = str(path)
        return out, elapsed

    def until_idle(fn) -> int:
        calls = 0
        while fn():
            calls += 1
        return calls

    def deliver(channel: str, repeat: int) -> dict:
        rules(email=channel == "email", push=channel == "push")
        nothing_foreign_due()
        Control.ask("reset")
        t0 = time.perf_counter()
        sent = services.notification_send(title=f"{TITLE} ({channel} {repeat + 1})", body=BODY, link=LINK,
                                          actor=sender, broadcast=True)
        send_s = time.perf_counter() - t0
        notification = sent[0]
        planned_calls, plan_s = timed(f"plan-{channel}", repeat, lambda: until_idle(delivery.plan_due))
        rows = Delivery.objects.filter(notification=notification)
        planned = rows.count()
        claims, send_time = timed(f"send-{channel}", repeat, lambda: until_idle(lambda: delivery.send_due(channel)))
        total_s = time.perf_counter() - t0
        by_status = dict(Counter(rows.values_list("status", flat=True)))
        mine = rows.filter(user_id__in=user_ids, channel=channel)
        result = {
            "channel": channel, "repeat": repeat + 1, "notification": notification.pk, "recipients": len(user_ids),
            "send_ms": 1000 * send_s, "plan_s": plan_s, "plan_calls": planned_calls,
            "plan_ms_per_1000": 1000 * plan_s / len(user_ids) * 1000, "deliveries_planned": planned,
            "send_s": send_time, "send_due_calls": claims, "per_s": len(user_ids) / send_time, "total_s": total_s,
            "deliveries_by_status": by_status,
            "my_rows_sent": mine.filter(status="sent").count(),
            "my_users_with_a_row": mine.values("user_id").distinct().count(),
            "rows_of_other_users": rows.exclude(user_id__in=user_ids).count(),
        }
        if channel == "push":
            wrong = [pk for pk, uid, sent_to in mine.values_list("pk", "user_id", "sent_to")
                     if sent_to != [subscription_of[uid]]]
            result["rows_sent_to_wrong"] = len(wrong)
        result["server"] = Control.ask(f"check-{channel}", notification=notification.pk, repeat=repeat,
                                       vapid_public_key=public)
        checks = [planned == len(user_ids), by_status == {"sent": len(user_ids)},
                  result["my_rows_sent"] == len(user_ids), result["my_users_with_a_row"] == len(user_ids),
                  result["server"]["ok"], result.get("rows_sent_to_wrong", 0) == 0]
        result["ok"] = all(checks)
        rows.delete()
        log(f"repeat {repeat + 1}/{args.repeats} {channel:<5} {result['per_s']:7.0f}/s sending ({send_time:.1f} s), "
            f"planning {plan_s * 1000:.0f} ms ({result['plan_ms_per_1000']:.0f} ms per 1,000), total "
            f"{total_s:.1f} s; {'checks passed' if result['ok'] else 'CHECKS FAILED: ' + json.dumps(result)}")
        return result

    def baseline(channel: str, repeat: int) -> dict:
        """The transport alone: the same server and client libraries, no database, one message."""
        n = min(args.baseline, len(user_ids))
        Control.ask("reset")
        if channel == "email":
            first = User.objects.get(pk=user_ids[0])
            message = mail.notification_email(first, Notification.objects.filter(actor=sender).latest("pk"))

            def run() -> None:
                for start in range(0, n, CLAIM):
                    connection = get_connection()  # Django's backend itself: no product code
                    connection.open()
                    for _ in range(min(CLAIM, n - start)):
                        assert connection.send_messages([message]) == 1
                    connection.close()
        else:
            import requests
            from pywebpush import webpush as pywebpush_send

            subscriptions = list(PushSubscription.objects.filter(user_id__in=user_ids[:n]).order_by("user_id"))
            data = webpush.payload(Notification.objects.filter(actor=sender).latest("pk"))
            vapid = webpush.vapid_key()

            def run() -> None:
                for start in range(0, n, CLAIM):
                    with requests.Session() as session:
                        for s in subscriptions[start:start + CLAIM]:
                            pywebpush_send(subscription_info={"endpoint": s.endpoint,
                                                              "keys": {"p256dh": s.p256dh, "auth": s.auth}},
                                           data=data, vapid_private_key=vapid,
                                           vapid_claims={"sub": f"mailto:bench@{DOMAIN}"},
                                           content_encoding="aes128gcm", ttl=3600, timeout=10,
                                           requests_session=session)

        t = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t
        server = Control.ask(f"count-{channel}")
        result = {"channel": channel, "repeat": repeat + 1, "messages": n, "per_s": n / elapsed,
                  "received": server["received"], "ok": server["received"] == n}
        log(f"repeat {repeat + 1}/{args.repeats} {channel:<5} baseline {result['per_s']:7.0f}/s "
            f"({n:,} in {elapsed:.1f} s, {server['received']:,} received)")
        return result

    delivery_runs, baseline_runs = [], []
    for repeat in range(args.repeats):
        for channel in ("email", "push"):
            delivery_runs.append(deliver(channel, repeat))
            if args.baseline:
                baseline_runs.append(baseline(channel, repeat))
    cleanup(sender)
    print("RESULT " + json.dumps({"setup_s": setup_s, "send_runs": send_runs, "delivery_runs": delivery_runs,
                                  "baseline_runs": baseline_runs, "profiles": profiles,
                                  "vapid_public_key": public}), flush=True)


def _point_format():
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint


def cleanup(sender) -> None:
    """Delete this script's notifications (their deliveries cascade) and the jobs that name only them."""
    from notifications.models import DeliveryJob, Notification

    ids = set(Notification.objects.filter(actor=sender).values_list("pk", flat=True))
    if not ids:
        return
    jobs = [pk for pk, nids in DeliveryJob.objects.values_list("pk", "notification_ids") if set(nids) <= ids]
    DeliveryJob.objects.filter(pk__in=jobs).delete()
    Notification.objects.filter(actor=sender).delete()


# The orchestrator: servers, checks, the report


class Servers:
    """The SMTP server and the push service (in this process), and the checks of what they received."""

    def __init__(self, run_dir: Path, recipients: int, verify: int):
        from tests.pushservice import PushService
        from tests.smtp import SmtpServer

        self.smtp = SmtpServer().start()
        self.push = PushService(run_dir / "push", check=False).start()
        self.recipients = recipients
        self.verify = verify

    def stop(self) -> None:
        self.smtp.stop()
        self.push.stop()

    def _take_messages(self) -> list:
        handler = self.smtp.handler
        with handler.lock:
            messages, handler.messages = handler.messages, []
        return messages

    def _take_requests(self) -> list:
        with self.push._lock:
            requests, self.push.requests = self.push.requests, []
        return requests

    def answer(self, question: dict) -> dict:
        op = question["op"]
        if op == "reset":
            self._take_messages()
            self._take_requests()
            return {"ok": True}
        if op == "count-email":
            return {"received": sum(len(m.rcpt_tos) for m in self._take_messages())}
        if op == "count-push":
            return {"received": len(self._take_requests())}
        if op == "check-email":
            return self.check_email(question["notification"])
        if op == "check-push":
            return self.check_push(question["notification"], question["repeat"], question["vapid_public_key"])
        raise ValueError(f"unknown question {question!r}")

    def check_email(self, notification: int) -> dict:
        messages = self._take_messages()
        counts = Counter(a for m in messages for a in m.rcpt_tos)
        expected = [address(i) for i in range(self.recipients)]
        missing = [a for a in expected if counts[a] == 0]
        twice = [a for a in expected if counts[a] > 1]
        extra = sum(c for a, c in counts.items() if not a.startswith("dbench-"))
        wrong_id = sum(1 for m in messages if f"<notification-{notification}.user-" not in str(m.message["Message-ID"]))
        return {"messages": len(messages), "recipients_once": len(expected) - len(missing) - len(twice),
                "missing": len(missing), "more_than_once": len(twice), "other_recipients": extra,
                "message_id_not_this_notification": wrong_id, "missing_sample": missing[:5],
                "ok": not missing and not twice and not wrong_id and len(messages) == len(expected)}

    def check_push(self, notification: int, repeat: int, vapid_public_key: str) -> dict:
        import http_ece

        from tests.pushservice import verify_vapid

        requests = self._take_requests()
        counts = Counter(r.path for r in requests)
        expected = [f"/push/{username(i)}" for i in range(self.recipients)]
        missing = [p for p in expected if counts[p] == 0]
        twice = [p for p in expected if counts[p] > 1]
        not_201 = sum(1 for r in requests if r.status != 201)
        problems = []
        sample = random.Random(repeat).sample(requests, min(self.verify, len(requests)))
        for request in sample:
            name = request.path.rsplit("/", 1)[1]
            key, auth = browser_keys(name)
            try:
                data = json.loads(http_ece.decrypt(request.body, private_key=key, auth_secret=auth,
                                                   version="aes128gcm"))
                claims, k = verify_vapid(request.headers.get("authorization"), self.push.origin)
            except Exception as exc:
                problems.append(f"{request.path}: {type(exc).__name__}: {exc}")
                continue
            if data.get("id") != notification or not str(data.get("title", "")).startswith(TITLE):
                problems.append(f"{request.path}: payload is not notification {notification}: {data}")
            if k != vapid_public_key:
                problems.append(f"{request.path}: VAPID key {k} is not the sender's")
            if request.headers.get("content-encoding") != "aes128gcm" or not request.headers.get("ttl", "").isdigit():
                problems.append(f"{request.path}: headers {request.headers}")
        return {"requests": len(requests), "subscriptions_once": len(expected) - len(missing) - len(twice),
                "missing": len(missing), "more_than_once": len(twice), "not_201": not_201,
                "decrypted_and_vapid_verified": len(sample) - len(problems), "verify_problems": problems[:5],
                "ok": not missing and not twice and not not_201 and not problems and len(requests) == len(expected)
                and len(sample) > 0}


def environment(db_url: str, servers: Servers, run_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DJANGO_", "CHANNELS_", "REDIS_", "DATABASE_URL", "EMAIL_", "VAPID_", "DELIVERY_",
                                "NOTIFICATIONS_", "PRESENCE_", "SITE_URL", "DB_POOL"))}
    env.update({"DATABASE_URL": db_url, "DEBUG": "0", "SECRET_KEY": "bench-not-secret", "LOG_LEVEL": "WARNING",
                "ALLOWED_HOSTS": "127.0.0.1", "DELIVERY_WORKER": "0", "SITE_URL": f"https://{DOMAIN}",
                "DJANGO_SETTINGS_MODULE": "project.settings",
                "PYTHONPATH": str(BASE_DIR), "PYTHONUNBUFFERED": "1", "BENCH_RUN_DIR": str(run_dir),
                "BENCH_SMTP_SETTINGS": json.dumps(servers.smtp.django_settings()),
                "BENCH_PUSH_ORIGIN": servers.push.origin, **servers.push.environ()})
    return env


def run_worker(argv: list[str], env: dict, servers: Servers) -> dict:
    process = subprocess.Popen(argv, cwd=BASE_DIR, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdin is not None and process.stdout is not None
    result = None
    for line in process.stdout:
        if line.startswith("ASK "):
            process.stdin.write(json.dumps(servers.answer(json.loads(line[4:]))) + "\n")
            process.stdin.flush()
        elif line.startswith("RESULT "):
            result = json.loads(line[7:])
        else:
            log(line.rstrip())
    if process.wait() != 0 or result is None:
        sys.exit(f"bench: the measuring process failed (exit {process.returncode})")
    return result


def summarize(result: dict) -> dict:
    sends = result["send_runs"]
    send_rows = []
    for kind in ("personal", "broadcast"):
        by = {v: {r["round"]: r["us_per_send"] for r in sends if r["kind"] == kind and r["variant"] == v}
              for v in ("off", "unasked", "on")}
        added = [by["on"][n] - by["off"][n] for n in by["on"]]
        checked = [by["unasked"][n] - by["off"][n] for n in by["unasked"]]
        send_rows.append({"kind": kind, "off_us": median_range(list(by["off"].values())),
                          "unasked_us": median_range(list(by["unasked"].values())),
                          "on_us": median_range(list(by["on"].values())), "added_us": median_range(added),
                          "check_us": median_range(checked),
                          "jobs_per_send_on": statistics.median(r["jobs_written"] / r["sends"] for r in sends
                                                                if r["kind"] == kind and r["variant"] == "on"),
                          "jobs_off": sum(r["jobs_written"] for r in sends
                                          if r["kind"] == kind and r["variant"] in ("off", "unasked"))})
    channel_rows = []
    for channel in ("email", "push"):
        mine = [r for r in result["delivery_runs"] if r["channel"] == channel]
        base = [r for r in result["baseline_runs"] if r["channel"] == channel]
        row = {"channel": channel, "repeats": len(mine), "recipients": mine[0]["recipients"],
               "per_s": median_range([r["per_s"] for r in mine]),
               "plan_ms_per_1000": median_range([r["plan_ms_per_1000"] for r in mine]),
               "total_s": median_range([r["total_s"] for r in mine]),
               "send_ms": median_range([r["send_ms"] for r in mine]),
               "checks_passed": sum(r["ok"] for r in mine)}
        if base:
            row["baseline_per_s"] = median_range([r["per_s"] for r in base])
            row["baseline_messages"] = base[0]["messages"]
            row["baseline_checks_passed"] = sum(r["ok"] for r in base)
        channel_rows.append(row)
    return {"send_path": send_rows, "channels": channel_rows}


def table(summary: dict, args: argparse.Namespace) -> str:
    def cell(value: dict, digits: int = 0) -> str:
        return f"{value['median']:,.{digits}f} ({value['min']:,.{digits}f}–{value['max']:,.{digits}f})"

    out = [f"Send path: {args.sends} `notification_send` calls per kind and variant, {args.rounds} rounds "
           "(median µs per send, range over rounds)", "",
           "| send | channels off | on, no rule asks (no job) | on, a rule asks (one `DeliveryJob`) | "
           "added: no rule asks | added: a rule asks |",
           "|---|---|---|---|---|---|"]
    for r in summary["send_path"]:
        what = "personal, one user" if r["kind"] == "personal" else "broadcast"
        out.append(f"| {what} | {cell(r['off_us'])} µs | {cell(r['unasked_us'])} µs | {cell(r['on_us'])} µs | "
                   f"{cell(r['check_us'])} µs | {cell(r['added_us'])} µs |")
    recipients = summary["channels"][0]["recipients"]
    out += ["", f"Delivery: {recipients:,} recipients, {args.repeats} repeats (median, range)",
            "", "| channel | sending, per s | transport baseline, per s | planning, ms per 1,000 recipients | "
            "send to last message, s | checks |", "|---|---|---|---|---|---|"]
    for r in summary["channels"]:
        base = (f"{cell(r['baseline_per_s'])} ({r['baseline_messages']:,})" if "baseline_per_s" in r else "—")
        checks = f"{r['checks_passed']}/{r['repeats']} passed"
        out.append(f"| {'email (SMTP)' if r['channel'] == 'email' else 'Web Push'} | {cell(r['per_s'])} | {base} | "
                   f"{cell(r['plan_ms_per_1000'], 1)} | {cell(r['total_s'], 1)} | {checks} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sends", type=int, help="notification_send calls per kind, variant and round (500)")
    parser.add_argument("--rounds", type=int, help="rounds of the send-path part (5)")
    parser.add_argument("--recipients", type=int, help="users of the email and push parts (10,000)")
    parser.add_argument("--repeats", type=int, help="repeats of the email and push parts (3)")
    parser.add_argument("--baseline", type=int, help="messages of each transport baseline (1,000; 0: none)")
    parser.add_argument("--verify", type=int, default=100, help="push bodies decrypted and VAPID-verified per repeat")
    parser.add_argument("--quick", action="store_true", help="1,000 recipients, 1 repeat, 2 rounds of 100 sends")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the first repeat's planning and sending (stats in bench/results/tmp; "
                             "the run's JSON goes there too, not beside the unprofiled runs)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes (bench/results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = {"sends": 100, "rounds": 2, "recipients": 1000, "repeats": 1, "baseline": 500}
    full = {"sends": 500, "rounds": 5, "recipients": 10_000, "repeats": 3, "baseline": 1000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.sends, args.rounds, args.recipients, args.repeats) < 1 or args.baseline < 0:
        parser.error("--sends, --rounds, --recipients and --repeats must be at least 1")
    if args.worker:
        worker(args)
        return

    started, load_start = time.time(), os.getloadavg()
    db_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = RESULTS / "tmp" / f"delivery-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_database(db_url)
    servers = Servers(run_dir, args.recipients, args.verify)
    try:
        env = environment(db_url, servers, run_dir)
        subprocess.run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=BASE_DIR, env=env, check=True)
        argv = [PY, __file__, "--worker", "--sends", str(args.sends), "--rounds", str(args.rounds),
                "--recipients", str(args.recipients), "--repeats", str(args.repeats),
                "--baseline", str(args.baseline)] + (["--profile"] if args.profile else [])
        result = run_worker(argv, env, servers)
    finally:
        servers.stop()
    summary = summarize(result)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BASE_DIR, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BASE_DIR,
                                capture_output=True, text=True).stdout.strip())
    all_ok = (all(r["ok"] for r in result["delivery_runs"]) and all(r["ok"] for r in result["baseline_runs"])
              and all(r["jobs_off"] == 0 and r["jobs_per_send_on"] == 1 for r in summary["send_path"]))
    data = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": round(time.time() - started, 1),
        "git_commit": commit, "git_dirty": dirty, "args": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "database": db_url.split("@")[-1], "channel_layer": "in-memory", "checks_passed": all_ok,
        "summary": summary, **result,
    }
    out_dir = run_dir if args.profile else args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"delivery-{stamp}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(table(summary, args))
    if not all_ok:
        print("\n**Some checks failed**: see the JSON's delivery_runs and baseline_runs.")
    if result["profiles"]:
        import pstats

        for label, prof in result["profiles"].items():
            log(f"\n== profile: {label} ({prof}) ==")
            stats = pstats.Stats(prof, stream=sys.stderr)
            stats.sort_stats("tottime").print_stats(15)
    shown = path.relative_to(BASE_DIR) if path.is_relative_to(BASE_DIR) else path
    log(f"written: {shown} ({data['duration_s']} s)")
    if not all_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
