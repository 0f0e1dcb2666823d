"""bench/delivery.py end to end, small: 50 recipients, a few sends, one repeat, on the suite's
PostgreSQL test database (its real SMTP server and push service, its checks)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.db import connection

from .conftest import require_postgres

BASE_DIR = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


def test_bench_delivery_quick(tmp_path):
    require_postgres()
    db = connection.settings_dict
    auth = quote(db["USER"] or "postgres") + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
    url = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    env = {**os.environ, "BENCH_DATABASE_URL": url}
    argv = [sys.executable, "bench/delivery.py", "--quick", "--recipients", "50", "--sends", "5", "--rounds", "1",
            "--baseline", "20", "--verify", "10", "--output", str(tmp_path)]
    run = subprocess.run(argv, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| email (SMTP) |" in run.stdout and "| Web Push |" in run.stdout, run.stdout
    (path,) = tmp_path.glob("delivery-*.json")
    data = json.loads(path.read_text())
    assert data["checks_passed"] is True
    email, push = data["delivery_runs"]
    assert email["server"]["recipients_once"] == 50 and email["deliveries_by_status"] == {"sent": 50}
    assert push["server"]["subscriptions_once"] == 50 and push["server"]["decrypted_and_vapid_verified"] == 10
    assert {(r["kind"], r["variant"]) for r in data["send_runs"]} == {
        (kind, variant) for kind in ("personal", "broadcast") for variant in ("off", "unasked", "on")}
    assert [r["jobs_off"] for r in data["summary"]["send_path"]] == [0, 0]
