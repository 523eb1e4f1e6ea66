"""Latency-accuracy curves from run results (it receives results; it never runs the pipeline).

``write_curve(rows, out_dir)`` writes ``curve.csv`` and ``curve.png``: measured
latency relative to the teacher (1 / speedup, each ratio timed in one
interleaved session, so machine drift between points cancels) against test
top-1, one line per method, with the teacher point at 1.0.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from vitrim.pipeline.core.io import atomic_save, atomic_write_text, make_dir
from vitrim.pipeline.core.rundir import RunDir

FIELDS = ["method", "budget", "predicted_ms", "measured_ms", "p90_ms", "top1", "params", "macs", "speedup",
          "delta_top1"]


def write_curve(rows: list[dict], out_dir: str | os.PathLike, title: str = "") -> tuple[Path, Path]:
    out = Path(out_dir)
    make_dir(out, "curve")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(RunDir(out).curve_csv, buf.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    for i, m in enumerate(methods):
        pts = sorted((1.0 / float(r["speedup"]), float(r["top1"])) for r in rows if r["method"] == m)
        xs, ys = zip(*pts)
        if m == "teacher":
            ax.scatter(xs, ys, marker="*", s=120, color="k", label="teacher", zorder=3)
        else:
            ax.plot(xs, ys, marker="o", label=m, color=f"C{i}")
    ax.set_xlabel("measured latency / teacher latency (same-session ratio)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "latency vs accuracy", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(RunDir(out).curve_plot, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return RunDir(out).curve_csv, RunDir(out).curve_plot
