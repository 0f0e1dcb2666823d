"""Run ``bench/scaleout.py`` for several variants, print a table, write ``bench/results/<name>-<date>.json``."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
COLUMNS = [
    ("connects/s", lambda r: r["connects_per_s"]),
    ("server KiB/socket", lambda r: r["server_rss_kib_per_socket"]),
    ("Redis B/socket", lambda r: r["redis_bytes_per_socket"]),
    ("paced p50 ms", lambda r: r["paced"]["p50_ms"]),
    ("paced p99 ms", lambda r: r["paced"]["p99_ms"]),
    ("burst deliveries/s", lambda r: r["burst"]["deliveries_per_s"]),
    ("burst p99 ms", lambda r: r["burst"]["p99_ms"]),
]


def compare(name: str, variants: list[tuple[str, str]], extra: list[str]) -> None:
    results = []
    load_before = os.getloadavg()
    for server, layer in variants:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run([sys.executable, str(BASE_DIR / "bench" / "scaleout.py"), "--server", server, "--layer",
                            layer, "--json", out.name, *extra], check=True, cwd=BASE_DIR, stdout=subprocess.DEVNULL)
            results.append(json.loads(Path(out.name).read_text()))
    header = ["server", "layer", *(c for c, _ in COLUMNS)]
    rows = [[r["server"], r["layer"], *(str(f(r)) for _, f in COLUMNS)] for r in results]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))
    machine = {"cpus": os.cpu_count(), "database": os.environ.get("BENCH_DATABASE_URL", "sqlite").split("@")[-1],
               "args": extra, "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    path = BASE_DIR / "bench" / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"\nwritten: {path.relative_to(BASE_DIR)}")
