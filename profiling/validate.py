"""Does the LUT predict real engines? Measure held-out plans end to end, with the teacher, and compare.

The search uses the LUT's *ratios* (a plan's predicted latency over the
teacher's), and budgets are fractions of the teacher. So validation draws N
held-out plans stratified over 30-95% of the teacher's predicted latency (one
plan per equal-width stratum; the calibration plans of the build are excluded),
slices and exports each, times them **together with the teacher in one
session, each plan visit bracketed by teacher visits** (:func:`vitrim.export.runners.time_ratio`), and reports (:func:`vitrim.profiling.calibrate.error_stats`):

* the ratio error (predicted plan/teacher against measured plan/teacher):
  median, max, share within +-5% and +-10%, Spearman. This is the headline;
  LitePred (Feng et al. 2024) reports 90.5% within +-5% on ORT mobile CPUs,
  nn-Meter (Zhang et al. 2021) 99% within +-10%;
* the absolute error, labelled as drift since the build: the teacher's
  predicted and measured ms (a shared VM drifts +-20-40% between hours).

JSON plus a two-panel scatter PNG (ratios, and absolute ms).
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from vitrim.export.target import Target, check_compatible
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.rundir import RunDir
from vitrim.profiling.calibrate import error_stats, stratified_plans
from vitrim.profiling.table import LatencyTable

VALIDATION_RANGE = (0.30, 0.95)


def validation_plans(lut: LatencyTable, n: int, seed: int = 0, lo: float = VALIDATION_RANGE[0],
                     hi: float = VALIDATION_RANGE[1], align: int = 8) -> list[Plan]:
    """``n`` held-out plans, one per equal stratum of ``[lo, hi]`` of the teacher's predicted latency."""
    teacher = lut.predict(Plan.full(lut.spec))
    exclude = {(c["embed"], tuple(tuple(b) for b in c["blocks"])) for c in lut.calibration}
    return stratified_plans(lut.spec, lut.grid, n, lo, hi, lambda p: lut.predict(p) / teacher,
                            random.Random(seed), align, exclude=exclude)


def measure_plans(plans: list[Plan], state: dict, target: Target, warmup: int, repeats: int, rounds: int,
                  workdir: Path, progress: bool = True, paired: bool = False) -> list[dict]:
    """Slice and export every plan, then time them all in one interleaved session.

    ``paired``: plan 0 is the reference (the teacher) and brackets every other
    plan (:func:`vitrim.export.runners.time_ratio`); each other row gets its ``ratio`` to it.
    """
    import gc

    from tqdm import tqdm

    from vitrim.export.engine import runner_for_module
    from vitrim.export.runners import interleaved, time_interleaved, time_ratio
    from vitrim.pipeline.core.slicing import slice_model

    runners = []
    for i, plan in enumerate(tqdm(plans, desc="[profile] export plans", disable=not progress)):
        shape = (plan.spec["in_chans"], *plan.spec["img_size"])
        runners.append(runner_for_module(slice_model(state, plan), shape, target, workdir, f"plan{i}"))
    gc.collect()
    ratios = None
    with interleaved(runners):
        if paired:
            timings, ratios = time_ratio(runners, target.batch, repeats, rounds, warmup)
        else:
            timings = time_interleaved(runners, target.batch, repeats, rounds, warmup)
    out = [{"median_ms": t.median_ms, "p90_ms": t.p90_ms, "n": t.repeats} for t in timings]
    for row, q in zip(out[1:], ratios or []):
        row["ratio"] = q
    return out


def validate_lut(lut: LatencyTable, state: dict, target: Target, n: int, out_dir: str | os.PathLike, seed: int = 0,
                 warmup: int = 10, repeats: int = 30, rounds: int = 3, align: int = 8, progress: bool = True,
                 lo: float = VALIDATION_RANGE[0], hi: float = VALIDATION_RANGE[1],
                 log: Callable[[str], None] = print) -> dict:
    """Validate ``lut`` on the teacher plus ``n`` stratified held-out plans; writes JSON and PNG into ``out_dir``."""
    t0 = time.time()
    check_compatible(lut.signature, target.signature(lut.signature.tokens))
    plans = [Plan.full(lut.spec)] + validation_plans(lut, n, seed, lo, hi, align)
    with tempfile.TemporaryDirectory(prefix="vitrim-val-") as tmp:
        measured = measure_plans(plans, state, target, warmup, repeats, rounds, Path(tmp), progress, paired=True)
    pred = [lut.predict(p) for p in plans]
    # the ratio of each plan is measured against the teacher visits that bracket it; expressed
    # in ms of the teacher's session median so that error_stats sees one consistent table
    t_ms = measured[0]["median_ms"]
    meas = [t_ms] + [m["ratio"] * t_ms for m in measured[1:]]
    st = error_stats(pred, meas, teacher=0)
    rows = []
    for i, (p, m) in enumerate(zip(plans, measured)):
        rows.append({"plan": "teacher" if i == 0 else f"plan{i}", "embed": p.embed_dim,
                     "blocks": [list(d) for d in p.block_dims()], "macs": p.macs(), "predicted_ms": pred[i],
                     "measured_ms": m["median_ms"], "measured_p90_ms": m["p90_ms"],
                     "paired_ms": meas[i],
                     "predicted_ratio": pred[i] / pred[0], "measured_ratio": meas[i] / meas[0],
                     "ratio_err_pct": st["ratio_err_pct"][i], "abs_err_pct": st["abs_err_pct"][i]})
    from scipy.stats import spearmanr

    macs = np.array([r["macs"] for r in rows[1:]], dtype=np.float64)
    report = {"signature": lut.signature.to_dict(), "n_plans": n, "range": [lo, hi],
              "protocol": f"teacher + {len(plans) - 1} held-out plans in one session, each plan visit bracketed by "
                          f"teacher visits ({rounds} rounds, {repeats} timed runs per plan, {warmup} warm-up); "
                          "measured ratio = median over visits of plan / bracketing teacher",
              "ratio": st["ratio"], "drift": st["drift"],
              "spearman_macs": float(spearmanr(macs, meas[1:]).statistic) if len(macs) >= 2 else None,
              "lut_created": lut.meta.get("created"), "validate_s": round(time.time() - t0, 1), "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RunDir(out).lut_validation, report)
    scatter_png(rows, report, RunDir(out).lut_validation_plot)
    r, d = report["ratio"], report["drift"]
    log(f"[profile] validation on {n} held-out plans ({r['measured_range'][0]:.0%}-{r['measured_range'][1]:.0%} of the "
        f"teacher, measured): ratio error median {r['median_abs_err_pct']:.1f}%, max {r['max_abs_err_pct']:.1f}%, "
        f"{r['within_5_pct']:.0%} within +-5%, {r['within_10_pct']:.0%} within +-10%, Spearman {r['spearman']:.3f}; "
        f"drift since the build: teacher predicted {d['teacher_predicted_ms']:.3f} ms, measured "
        f"{d['teacher_measured_ms']:.3f} ms ({d['teacher_err_pct']:+.1f}%)")
    return report


def scatter_png(rows: list[dict], report: dict, path: Path) -> None:
    """Left: predicted vs measured ratio to the teacher (+-5% band). Right: absolute ms (drift)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitrim.pipeline.core.io import atomic_save

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4.5), dpi=110)
    mr = np.array([r["measured_ratio"] for r in rows[1:]])
    pr = np.array([r["predicted_ratio"] for r in rows[1:]])
    a1.scatter(mr, pr, s=18, label="held-out plans")
    x = np.linspace(0, 1.05, 2)
    a1.plot(x, x, "k--", lw=0.8)
    a1.fill_between(x, 0.95 * x, 1.05 * x, color="0.85", label="+-5%")
    a1.scatter([1.0], [1.0], s=40, marker="*", color="C3", label="teacher")
    a1.set_xlabel("measured latency / teacher (same session)")
    a1.set_ylabel("LUT-predicted latency / teacher")
    r = report["ratio"]
    a1.set_title(f"ratio error: median {r['median_abs_err_pct']:.1f}%, max {r['max_abs_err_pct']:.1f}%,\n"
                 f"{r['within_5_pct']:.0%} within +-5%, Spearman {r['spearman']:.3f}", fontsize=8)
    a1.legend(fontsize=7)
    pm = np.array([r["predicted_ms"] for r in rows])
    mm = np.array([r["paired_ms"] for r in rows])
    a2.scatter(mm, pm, s=18, color="C1", label="plans")
    a2.scatter(mm[:1], pm[:1], s=40, marker="*", color="C3", label="teacher")
    lo, hi = min(pm.min(), mm.min()) * 0.95, max(pm.max(), mm.max()) * 1.05
    a2.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    a2.set_xlabel("measured latency (ms)")
    a2.set_ylabel("LUT-predicted latency (ms)")
    d = report["drift"]
    a2.set_title(f"absolute (drift since the build): teacher {d['teacher_predicted_ms']:.2f} ms predicted,\n"
                 f"{d['teacher_measured_ms']:.2f} ms measured ({d['teacher_err_pct']:+.1f}%)", fontsize=8)
    a2.legend(fontsize=7)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
