"""Plots results.csv from the event-rate benchmark: throughput.png, freshness.png and memory.png (from rss-*.csv)."""
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(sys.argv[1])
rows = list(csv.DictReader(open(out / "results.csv")))

thr = [r for r in rows if r["kind"] == "throughput"]
modes = sorted({r["schemas"] for r in thr})
fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
for ax, mode in zip(axes[0], modes):
    sub = [r for r in thr if r["schemas"] == mode]
    names = [r["system"] for r in sub]
    rates = [float(r["records_per_s"]) for r in sub]
    colors = ["tab:green" if n.startswith("tally") else "tab:gray" for n in names]
    ax.barh(names, rates, color=colors)
    ax.set_xscale("log")
    ax.set_xlabel("records/s (log scale)")
    ax.set_title(f"throughput, schemas {mode}")
    ax.invert_yaxis()
fig.tight_layout()
fig.savefig(out / "throughput.png", dpi=110)

fr = [r for r in rows if r["kind"] == "freshness"]
if fr:
    fig, ax = plt.subplots(figsize=(7, 5))
    for key in sorted({(r["schemas"], r["workers"]) for r in fr}):
        sub = sorted((r for r in fr if (r["schemas"], r["workers"]) == key), key=lambda r: float(r["offered_per_s"]))
        x = [float(r["offered_per_s"]) for r in sub]
        ax.plot(x, [float(r["p99_ms"]) for r in sub], marker="o", label=f"p99, schemas {key[0]}, -w {key[1]}")
        # Where the broker took in less than offered, the point says how much: the load was lower than its x.
        for r in sub:
            acked = float(r["acknowledged_per_s"]) / float(r["offered_per_s"])
            if acked < 0.98:
                ax.annotate(f"{acked:.0%} acked", (float(r["offered_per_s"]), float(r["p99_ms"])), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.plot(x, [float(r["p50_ms"]) for r in sub], marker=".", linestyle="--", label=f"p50, schemas {key[0]}, -w {key[1]}")
    ax.set_xlabel("background records/s offered")
    ax.set_ylabel("produce -> visible in GET / (ms)")
    ax.set_title("freshness vs offered rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "freshness.png", dpi=110)

rss = sorted(out.glob("rss-*.csv"))
if rss:
    fig, ax = plt.subplots(figsize=(7, 5))
    for path in rss:
        samples = list(csv.DictReader(open(path)))
        ax.plot([int(s["records_read"]) for s in samples], [float(s["rss_mb"]) for s in samples], marker=".", label=path.stem[4:])
    ax.set_xlabel("records read")
    ax.set_ylabel("tally RSS (MB), sampled every 200 ms")
    ax.set_ylim(bottom=0)
    ax.set_title("memory while draining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
