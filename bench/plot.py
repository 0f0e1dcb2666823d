"""The figure of docs/performance.md: delivered/s and p99 latency against the offered rate."""

from pathlib import Path

COLORS = {"raw": "#444444", "baseline": "#d62728", "baseline-pubsub": "#ff9896", "product": "#1f77b4"}


def plot(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["scenario"] == "broadcast"]
    sizes = sorted({r["n"] for r in rows}) or [0]
    fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
    for col, n in enumerate(sizes):
        top, bottom = axes[0][col], axes[1][col]
        for target in dict.fromkeys(r["target"] for r in rows if r["n"] == n):
            mine = [r for r in rows if r["n"] == n and r["target"] == target]
            x = [r["offered_per_s"] for r in mine]
            style = {"color": COLORS.get(target), "marker": "o", "label": target}
            top.plot(x, [r["delivered_per_s"] for r in mine], **style)
            bottom.plot(x, [r["p99_ms"] for r in mine], **style)
            lossy = [r for r in mine if r["lost"]]
            top.scatter([r["offered_per_s"] for r in lossy], [r["delivered_per_s"] for r in lossy], marker="x",
                        s=120, color="black", zorder=5)
        top.set_title(f"broadcast fan-out, {n} sockets (x = frames lost)")
        top.set_ylabel("frames delivered per second")
        top.plot([0, max((r["offered_per_s"] for r in rows if r["n"] == n), default=1)],
                 [0, max((r["offered_per_s"] for r in rows if r["n"] == n), default=1)], ":", color="grey",
                 label="offered")
        bottom.set_yscale("log")
        bottom.set_ylabel("p99 latency, ms (send scheduled -> frame read)")
        bottom.set_xlabel("offered frames per second (broadcasts/s x sockets)")
        bottom.axhline(25, color="green", linestyle="--", linewidth=1, label="25 ms target")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{data['date']}  commit {data['git_commit'][:10]}{' (dirty)' if data['git_dirty'] else ''}  "
                 f"{data['machine']['cpus']} cores, load {data['machine']['loadavg_end'][0]:.1f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
