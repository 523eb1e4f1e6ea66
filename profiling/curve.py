"""Latency-accuracy curves from run results (it receives results; it never runs the pipeline).

``write_curve(rows, out_dir)`` writes ``curve.csv`` (one row per point and seed, the teacher first) and
``curve.png``: latency relative to the teacher (1 / ``session_speedup``: every point's engine and the teacher's
timed in one interleaved session, so machine drift between points cancels) against test top-1, one line per
method through the mean over seeds, with min-max bars over the seeds. ``write_curve_report`` writes ``curve.md``:
the session, each point over its seeds, at each budget where several methods ran, which differences between
methods exceed the spread between seeds (:func:`seed_test`: Welch's t-test; with one seed nothing is decided),
and each curve's wall time. A "method" is a series of the curve: a strategy, or a strategy's progressive chain
(``knapsack progressive``).
"""
from __future__ import annotations

import csv
import io
import os
from itertools import combinations
from pathlib import Path
from typing import Optional

import numpy as np

from vitrim.pipeline.core.io import atomic_save, atomic_write_text, make_dir
from vitrim.pipeline.core.rundir import RunDir

FIELDS = ["method", "budget", "seed", "predicted_ms", "run_measured_ms", "run_speedup", "session_ms",
          "session_p90_ms", "session_speedup", "top1", "delta_top1", "params", "macs", "run_dir", "start_from",
          "wall_s"]


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else v


def write_curve(rows: list[dict], out_dir: str | os.PathLike, title: str = "") -> tuple[Path, Path]:
    """``curve.csv`` and ``curve.png`` from the rows (the teacher's with method ``teacher``)."""
    out = Path(out_dir)
    make_dir(out, "curve")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:g}" if k == "budget" else _fmt(v)) for k, v in r.items()})
    atomic_write_text(RunDir(out).curve_csv, buf.getvalue())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for i, (m, pts) in enumerate(points_by_method(rows).items()):
        if m == "teacher":
            p = pts[0]
            ax.scatter([p["x"][0]], [p["y"][0]], marker="*", s=120, color="k", label="teacher", zorder=3)
            continue
        pts = sorted(pts, key=lambda p: np.mean(p["x"]))
        xs, ys = [np.mean(p["x"]) for p in pts], [np.mean(p["y"]) for p in pts]
        xerr = [[x - min(p["x"]) for x, p in zip(xs, pts)], [max(p["x"]) - x for x, p in zip(xs, pts)]]
        yerr = [[y - min(p["y"]) for y, p in zip(ys, pts)], [max(p["y"]) - y for y, p in zip(ys, pts)]]
        n = max(len(p["y"]) for p in pts)
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, color=f"C{i}",
                    label=m + (f" (mean, min-max of {n} seeds)" if n > 1 else ""))
    ax.set_xlabel("latency / teacher latency (one timing session)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "latency vs accuracy", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(RunDir(out).curve_plot, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return RunDir(out).curve_csv, RunDir(out).curve_plot


def points_by_method(rows: list[dict]) -> dict[str, list[dict]]:
    """{method: [{budget, x: latency ratios, y: top-1s, runs: run directories} per budget, over its seeds]},
    methods in row order."""
    out: dict[str, dict[float, dict]] = {}
    for r in rows:
        b = float(r["budget"])
        p = out.setdefault(r["method"], {}).setdefault(b, {"budget": b, "x": [], "y": [], "runs": []})
        p["x"].append(1.0 / float(r["session_speedup"]))
        p["y"].append(float(r["top1"]))
        p["runs"].append(r.get("run_dir"))
    return {m: list(by_b.values()) for m, by_b in out.items()}


ALPHA = 0.05  # two-sided level of the test between two methods' seeds


def seed_test(a: list[float], b: list[float]) -> tuple[Optional[bool], Optional[float]]:
    """Whether two methods' per-seed figures differ by more than their spread between seeds: Welch's t-test
    (``scipy.stats.ttest_ind``, unequal variances) at :data:`ALPHA`, two-sided. Returns (decision, p-value);
    (None, None) when either has a single seed, or when neither varies (no spread to compare with).

    Disjoint min-max ranges are not the rule: two identical methods give disjoint ranges by chance with
    probability 2 m! n! / (m + n)! (1/3 with 2 seeds each, 1/10 with 3).
    """
    import math

    from scipy.stats import ttest_ind

    if len(a) < 2 or len(b) < 2:
        return None, None
    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    if not math.isfinite(p):
        return None, None
    return p < ALPHA, p


def _span(v: list[float], digits: int) -> str:
    m = f"{np.mean(v):.{digits}f}"
    return m if len(v) < 2 else f"{m} [{min(v):.{digits}f}, {max(v):.{digits}f}]"


def method_differences(rows: list[dict]) -> list[dict]:
    """Every pair of methods at every budget both ran: the difference of their means in top-1 and in latency ratio,
    and whether it exceeds the spread between seeds (:func:`seed_test`)."""
    pts = {m: {p["budget"]: p for p in ps} for m, ps in points_by_method(rows).items() if m != "teacher"}
    out = []
    budgets = sorted({b for ps in pts.values() for b in ps}, reverse=True)
    for b in budgets:
        here = [m for m in pts if b in pts[m]]
        for m1, m2 in combinations(here, 2):
            p1, p2 = pts[m1][b], pts[m2][b]
            if p1["runs"] == p2["runs"] and None not in p1["runs"]:
                continue  # the same runs (the head of a progressive curve): nothing to compare
            (t_ok, t_p), (r_ok, r_p) = seed_test(p1["y"], p2["y"]), seed_test(p1["x"], p2["x"])
            out.append({"budget": b, "a": m1, "b": m2, "seeds": (len(p1["y"]), len(p2["y"])),
                        "top1_diff": float(np.mean(p1["y"]) - np.mean(p2["y"])), "top1_exceeds": t_ok, "top1_p": t_p,
                        "ratio_diff": float(np.mean(p1["x"]) - np.mean(p2["x"])), "ratio_exceeds": r_ok,
                        "ratio_p": r_p})
    return out


def _verdict(exceeds: Optional[bool], p: Optional[float] = None) -> str:
    if exceeds is None:
        return "not decided (one seed, or no spread)"
    return ("**exceeds the seed spread**" if exceeds else "within seed spread") + f" (p={p:.2g})"


def wall_times(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{series: {seed: the wall seconds of its runs, summed}} (a run shared by two series counts in each)."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["method"] == "teacher" or "wall_s" not in r:
            continue
        w = r["wall_s"]
        w = float("nan") if w in (None, "") else float(w)
        by_seed = out.setdefault(r["method"], {})
        by_seed[int(r["seed"])] = by_seed.get(int(r["seed"]), 0.0) + w
    # a seed with a run of unknown cost has no total
    return {m: kept for m, by in out.items() if (kept := {k: v for k, v in by.items() if np.isfinite(v)})}


def wall_time_lines(rows: list[dict]) -> list[str]:
    """The report's section on each curve's wall time (its runs' ``wall_s``, summed per seed), and a progressive
    curve's over the independent curve of the same strategy, seed by seed."""
    walls = wall_times(rows)
    if not walls:
        return []
    lines = ["", "## Wall time per curve", "", "Each curve's runs, summed per seed (each run's `work_s`: a rerun counts "
             "the time its reused stages took when they ran; a seed with a run of unknown cost is left out; the "
             "teacher and the latency table are shared, built before; the final re-timing is not counted).", "",
             "| curve | seeds | wall time (min) | over the independent curve's, per seed |", "|---|---:|---:|---:|"]
    for name, by_seed in walls.items():
        base = walls.get(name.split(" ")[0]) if " " in name else None
        rel = [by_seed[k] / base[k] for k in by_seed if base and k in base and base[k] > 0]
        lines.append(f"| {name} | {len(by_seed)} | {_span([v / 60 for v in by_seed.values()], 1)} | "
                     f"{_span(rel, 2) + 'x' if rel else ''} |")
    return lines


def write_curve_report(rows: list[dict], out_dir: str | os.PathLike, title: str, protocol: str,
                       skipped: tuple | list = (), progressive: tuple | list = ()) -> Path:
    """``curve.md``: the timing session, a table of the points (mean and min-max over seeds) and the differences
    between methods at each budget, each marked as exceeding the spread between seeds or not. ``progressive``:
    (name, what its points start from) for each progressive curve among the rows."""
    teacher = next(r for r in rows if r["method"] == "teacher")
    lines = [f"# {title}", "", f"Timing: {protocol}. Teacher {float(teacher['session_ms']):.3f} ms in that session, "
             f"test top-1 {float(teacher['top1']):.2f}%."]
    if progressive:
        lines += ["", f"Progressive curves ({', '.join(n for n, _ in progressive)}): "
                  + "; ".join(f"`{n}`: {what}" for n, what in progressive)
                  + ". The highest budget's point starts from the teacher and heads every curve of its strategy "
                  "(one run, a row in each)."]
    lines += ["", "Each figure is the mean over seeds, with [min, max] where there are several. Latency is the "
              "point's engine over the teacher's in the one session.", "",
              "| method | budget | seeds | latency / teacher | speedup | test top-1 (%) |", "|---|---:|---:|---:|---:|---:|"]
    for m, pts in points_by_method(rows).items():
        if m == "teacher":
            continue
        for p in pts:
            lines.append(f"| {m} | {p['budget']:g} | {len(p['y'])} | {_span(p['x'], 3)} | "
                         f"{_span([1 / x for x in p['x']], 2)}x | {_span(p['y'], 2)} |")
    diffs = method_differences(rows)
    lines += ["", "## Differences between methods", ""]
    if not diffs:
        lines.append("No budget has more than one method.")
    else:
        lines += [f"Rule: a difference exceeds the seed spread when Welch's t-test on the two methods' per-seed "
                  f"figures rejects equal means at p < {ALPHA:g} (two-sided); otherwise it is within seed spread. "
                  "With one seed there is no spread, and nothing is decided. (Disjoint [min, max] ranges are not "
                  "evidence on their own: identical methods give them by chance 1 time in 3 with 2 seeds each, "
                  "1 in 10 with 3.)", "",
                  "| budget | methods | seeds | top-1 difference (pt) | | latency-ratio difference | |",
                  "|---:|---|---:|---:|---|---:|---|"]
        for d in diffs:
            lines.append(f"| {d['budget']:g} | {d['a']} - {d['b']} | {d['seeds'][0]}, {d['seeds'][1]} | "
                         f"{d['top1_diff']:+.2f} | {_verdict(d['top1_exceeds'], d['top1_p'])} | "
                         f"{d['ratio_diff']:+.3f} | {_verdict(d['ratio_exceeds'], d['ratio_p'])} |")
    lines += wall_time_lines(rows)
    if skipped:
        lines += ["", "## Points that did not reach their budget", ""] + [f"* {s}" for s in skipped]
    path = RunDir(out_dir).curve_report
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
