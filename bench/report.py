"""Markdown tables of one or more ``bench/results/bench-*.json`` runs (for docs/performance.md).

    .venv/bin/python bench/report.py bench/results/bench-<date>.json [...]

Broadcast rows get their ratio to the raw ``websockets`` server and to the tutorial Channels
app *of the same run and rate*; the summary compares each target's best lossless delivered/s.
"""

import json
import sys


def fmt(value, digits=0):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def broadcast_table(rows):
    out = ["| N | target | broadcasts/s | offered frames/s | delivered/s | × raw | × baseline | p50 ms | p99 ms"
           " | max ms | lost | server CPU ms / 1000 | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["n"], r["target"], r["rate"]): r for r in rows}
    for r in rows:
        raw = by.get((r["n"], "raw", r["rate"]))
        base = by.get((r["n"], "baseline", r["rate"]))
        ratio_raw = f"{r['delivered_per_s'] / raw['delivered_per_s']:.2f}" if raw and raw["delivered_per_s"] else "–"
        ratio_base = (f"{r['delivered_per_s'] / base['delivered_per_s']:.1f}" if base and base["delivered_per_s"]
                      else "–")
        lost = fmt(r["lost"]) + (f" ({', '.join(f'{v}×{k}' for k, v in r['close_codes'].items())} closed)"
                                 if r["close_codes"] else "")
        out.append(f"| {r['n']:,} | {r['target']} | {r['rate']} | {fmt(r['offered_per_s'])} | "
                   f"{fmt(r['delivered_per_s'])} | {ratio_raw} | {ratio_base} | {fmt(r['p50_ms'], 1)} | "
                   f"{fmt(r['p99_ms'], 1)} | {fmt(r['max_ms'], 1)} | {lost} | "
                   f"{fmt(r['server_cpu_ms_per_1000'], 1)} | {r['load'][0][0]:.1f} |")
    return "\n".join(out)


def summary_table(summary):
    out = ["| N | target | best lossless delivered/s | × raw | × baseline | p99 at 10/s (ms) |",
           "|---|---|---|---|---|---|"]
    for key, per_target in summary.items():
        n = key.split("=")[1]
        for name, e in per_target.items():
            out.append(f"| {n} | {name} | {fmt(e['peak_lossless_per_s'])} | {fmt(e.get('ratio_to_raw'), 2)} | "
                       f"{fmt(e.get('ratio_to_baseline'), 1)} | {fmt(e.get('p99_ms_at_10'), 1)} |")
    return "\n".join(out)


def api_table(rows):
    out = ["| scenario | target | N | rate/s | sent | delivered/s | send → frame p50 / p99 ms | send call p99 ms"
           " | lost | server CPU ms per notification | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["server_cpu_ms_per_1000"] / 1000 * (r["expected"] / max(1, r["sent"])) if r[
            "server_cpu_ms_per_1000"] else None
        out.append(f"| {r['scenario']} | {r['target']} | {r['n']:,} | {r['rate']} | {r['sent']} | "
                   f"{fmt(r['delivered_per_s'])} | {fmt(r['p50_ms'], 1)} / {fmt(r['p99_ms'], 1)} | "
                   f"{fmt(r['api_p99_ms'], 1)} | {r['lost']} | {fmt(per, 1)} | {r['load'][0][0]:.1f} |")
    return "\n".join(out)


def connect_table(rows):
    out = ["| target | N | connects/s | failed | connect p99 ms | KiB per idle connection | load |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        errors = f" ({', '.join(r['errors'])})" if r["errors"] else ""
        out.append(f"| {r['target']} | {r['n']:,} | {fmt(r['connects_per_s'])} | {r['failed']}{errors} | "
                   f"{fmt(r['connect_p99_ms'])} | {fmt(r['kib_per_connection'], 1)} | {r['load'][0][0]:.1f} |")
    return "\n".join(out)


def main():
    for path in sys.argv[1:]:
        data = json.loads(open(path).read())
        print(f"### {path.split('/')[-1]}: {data['date']}, commit {data['git_commit'][:10]}"
              f"{' + uncommitted changes' if data['git_dirty'] else ''}, {data['machine']['cpus']} cores\n")
        rows = data["rows"]
        groups = [("broadcast", broadcast_table), ("topic", api_table), ("personal-api", api_table),
                  ("connect", connect_table)]
        for scenario, table in groups:
            mine = [r for r in rows if r["scenario"] == scenario]
            if mine:
                print(table(mine) + "\n")
        if data.get("summary"):
            print(summary_table(data["summary"]) + "\n")


if __name__ == "__main__":
    main()
