"""Does the LUT predict real engines? Measure held-out plans end to end, with the teacher, and compare.

The search uses the LUT's *ratios* (a plan's predicted latency over the
teacher's), and budgets are fractions of the teacher. So validation draws N
held-out plans stratified over 30-95% of the teacher's predicted latency (one
plan per equal-width stratum; the calibration plans of the build are excluded),
and, when the LUT has a token axis, M more plans that each carry one or two
token merges (stratified over the same range, drawn from their own random
stream). It slices and exports each, times them **together with the teacher in
one session, each plan visit bracketed by teacher visits**
(:func:`vitrim.export.runners.time_ratio`), and reports:

* the ratio error (predicted plan/teacher against measured plan/teacher):
  median |err|, signed median, max, share within +-5% and +-10%, Spearman
  (:func:`vitrim.profiling.calibrate.error_stats`, :func:`ratio_error_stats`).
  This is the headline; LitePred (Feng et al. 2024) reports 90.5% within +-5%
  on ORT mobile CPUs, nn-Meter (Zhang et al. 2021) 99% within +-10%;
* the same statistics for the MACs proxy (plan MACs / teacher MACs) on the
  same plans, so the report says what the table buys over counting MACs; and
  both per group (unmerged plans, merged plans);
* the absolute error, labelled as drift since the build: the teacher's
  predicted and measured ms (a shared VM drifts +-20-40% between hours);
* optionally an A/A control: some of the build's own calibration plans timed
  again in the same session, and how far their ratio moved since the build
  (``vitrim profile validate --controls``).

A positive signed error means the predictor expects the plan to keep more of
the teacher's latency than it does (it under-promises the speed-up); a
negative one, that it over-promises.

JSON plus a two-panel scatter PNG (ratios of the LUT and of MACs, and absolute ms).
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vitrim.export.target import Target, check_compatible
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import atomic_write_json, make_dir
from vitrim.pipeline.core.plan import BlockPlan, Plan
from vitrim.pipeline.core.rundir import RunDir
from vitrim.profiling.calibrate import error_stats, plan_key, stratified_plans, with_random_merges
from vitrim.profiling.table import LatencyTable

VALIDATION_RANGE = (0.30, 0.95)
MERGED_SEED_OFFSET = 104729  # the merged plans' random stream, apart from the unmerged ones'


def has_token_axis(lut: LatencyTable) -> bool:
    """Whether ``lut`` can price token merges (its token axis has more than the input count)."""
    return len(lut.grid.tokens) > 1


def default_merged(lut: LatencyTable, n: int) -> int:
    """Merged held-out plans drawn when none is asked for: a third of ``n`` with a token axis, else none."""
    return n // 3 if has_token_axis(lut) else 0


def _calibration_plan(spec: dict, c: dict) -> Plan:
    """A plan with a calibration entry's widths and merges (first indices kept): what
    :func:`vitrim.profiling.calibrate.plan_key` keys it by."""
    p = Plan(spec=dict(spec), embed_keep=list(range(c["embed"])),
             blocks=[BlockPlan(bool(H), list(range(H)), list(range(q)), list(range(v)), list(range(m)))
                     for H, q, v, m in c["blocks"]])
    p.tokens = c.get("tokens")
    return p


def validation_plans(lut: LatencyTable, n: int, seed: int = 0, lo: float = VALIDATION_RANGE[0],
                     hi: float = VALIDATION_RANGE[1], align: int = 8, merged: Optional[int] = None) -> list[Plan]:
    """``n`` held-out plans, one per equal stratum of ``[lo, hi]`` of the teacher's predicted latency, then
    ``merged`` plans with one or two token merges each, stratified over the same range.

    ``merged`` defaults to :func:`default_merged`; asking for merged plans from a LUT without a token axis is
    refused. The calibration plans of the build are excluded from both sets by their widths (merged or not),
    and the plans within a set differ in their widths (the merged set may repeat an unmerged plan's widths,
    with merges).
    """
    merged = default_merged(lut, n) if merged is None else merged
    if merged and not has_token_axis(lut):
        raise UserError("profile", f"{merged} merged validation plans asked for, but the LUT has no token axis "
                        f"(tokens {lut.grid.tokens}): it cannot price token merges",
                        "validate merged plans with a LUT built with search.prune_tokens: true, or ask for 0")
    teacher = lut.predict(Plan.full(lut.spec))
    exclude = {plan_key(_calibration_plan(lut.spec, c)) for c in lut.calibration}
    plans = stratified_plans(lut.spec, lut.grid, n, lo, hi, lambda p: lut.predict(p) / teacher,
                             random.Random(seed), align, exclude=exclude)
    if not merged:
        return plans
    drawn = stratified_plans(lut.spec, lut.grid, merged, lo, hi, lambda p: lut.predict(p) / teacher,
                             random.Random(seed + MERGED_SEED_OFFSET), align, exclude=exclude | {plan_key(p) for p in plans},
                             transform=lambda p, rng: with_random_merges(p, rng, lut.grid.tokens[0]))
    return plans + [p for p in drawn if p.merges]


def ratio_error_stats(predicted_ratio, measured_ratio) -> dict:
    """Error statistics of predicted against measured ratios to the teacher (teacher row excluded).

    Per plan ``err = predicted / measured - 1`` (in %). Returns ``n``, ``median_abs_err_pct``,
    ``signed_median_err_pct`` (the median of the signed errors: positive when the predictor expects plans to keep
    more of the teacher's latency than they do), ``max_abs_err_pct``, ``within_5_pct``, ``within_10_pct`` (shares)
    and ``spearman`` (None below two plans). Empty input gives ``n = 0`` and None everywhere else.
    """
    from scipy.stats import spearmanr

    pr, mr = np.asarray(predicted_ratio, dtype=np.float64), np.asarray(measured_ratio, dtype=np.float64)
    if not len(pr):
        return {"n": 0, "median_abs_err_pct": None, "signed_median_err_pct": None, "max_abs_err_pct": None,
                "within_5_pct": None, "within_10_pct": None, "spearman": None}
    err = 100.0 * (pr / mr - 1.0)
    a = np.abs(err)
    rho = float(spearmanr(pr, mr).statistic) if len(pr) >= 2 else float("nan")
    return {"n": int(len(err)), "median_abs_err_pct": float(np.median(a)),
            "signed_median_err_pct": float(np.median(err)), "max_abs_err_pct": float(a.max()),
            "within_5_pct": float(np.mean(a <= 5.0)), "within_10_pct": float(np.mean(a <= 10.0)),
            "spearman": None if np.isnan(rho) else rho}


def group_stats(rows: list[dict]) -> dict:
    """LUT and MACs ratio statistics of the held-out rows (teacher excluded), per group: ``unmerged`` and, where
    merged plans were measured, ``merged``."""
    out = {}
    for name, merged in (("unmerged", False), ("merged", True)):
        rs = [r for r in rows[1:] if r["merged"] == merged]
        if rs or not merged:
            mr = [r["measured_ratio"] for r in rs]
            out[name] = {"lut": ratio_error_stats([r["predicted_ratio"] for r in rs], mr),
                         "macs": ratio_error_stats([r["macs_ratio"] for r in rs], mr)}
    return out


PARALLEL_MIN_PLANS = 6  # plans are sliced and exported in worker processes from this many on


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

    workdir = Path(workdir)
    ahead = target.impl.parallel_export and len(plans) >= PARALLEL_MIN_PLANS
    if ahead:  # slice and export in worker processes; the runners below reuse the files
        from vitrim.profiling.exporter import export_parallel

        export_parallel([("plan", p, str(workdir / f"plan{i}.onnx")) for i, p in enumerate(plans)], state=state)
    runners = []
    for i, plan in enumerate(tqdm(plans, desc="[profile] export plans", disable=not progress)):
        shape = (plan.spec["in_chans"], *plan.spec["img_size"])
        done = ahead and (workdir / f"plan{i}.onnx").is_file()
        runners.append(runner_for_module(None if done else slice_model(state, plan), shape, target, workdir,
                                         f"plan{i}", reuse=done))
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


def control_plans(lut: LatencyTable, n: int) -> list[tuple[dict, Plan]]:
    """Up to ``n`` of the build's unmerged calibration plans (teacher excluded), spread over their measured
    ratios, each with the plan rebuilt from its widths (first indices kept: the timing depends on widths only)."""
    rows = sorted((c for c in lut.calibration[1:] if not c.get("tokens")), key=lambda c: c["measured_ratio"])
    if n <= 0 or not rows:
        return []
    pick = sorted({int(round(i)) for i in np.linspace(0, len(rows) - 1, min(n, len(rows)))})
    return [(rows[i], _calibration_plan(lut.spec, rows[i])) for i in pick]


def validate_lut(lut: LatencyTable, state: dict, target: Target, n: int, out_dir: str | os.PathLike, seed: int = 0,
                 warmup: int = 10, repeats: int = 30, rounds: int = 3, align: Optional[int] = None, progress: bool = True,
                 lo: float = VALIDATION_RANGE[0], hi: float = VALIDATION_RANGE[1],
                 log: Callable[[str], None] = print, merged: Optional[int] = None, controls: int = 0) -> dict:
    """Validate ``lut`` on the teacher plus ``n`` stratified held-out plans and ``merged`` plans with token merges
    (default :func:`default_merged`), against the MACs proxy on the same plans; writes JSON and PNG into ``out_dir``.

    ``controls``: that many of the build's own unmerged calibration plans are timed again in the same session
    (an A/A control, :func:`control_plans`): how far their measured ratio moved since the build is the
    measurement's own reproducibility, the floor under any table error this validation can show."""
    t0 = time.time()
    check_compatible(lut.signature, target.signature(lut.signature.tokens))
    align = align or max(8, lut.recommended_align or 8)  # the widths the search uses on this target
    plans = [Plan.full(lut.spec)] + validation_plans(lut, n, seed, lo, hi, align, merged)
    ctl = control_plans(lut, controls)
    with tempfile.TemporaryDirectory(prefix="vitrim-val-") as tmp:
        measured = measure_plans(plans + [p for _, p in ctl], state, target, warmup, repeats, rounds, Path(tmp),
                                 progress, paired=True)
    measured, measured_ctl = measured[:len(plans)], measured[len(plans):]
    pred = [lut.predict(p) for p in plans]
    # the ratio of each plan is measured against the teacher visits that bracket it; expressed
    # in ms of the teacher's session median so that error_stats sees one consistent table
    t_ms = measured[0]["median_ms"]
    meas = [t_ms] + [m["ratio"] * t_ms for m in measured[1:]]
    st = error_stats(pred, meas, teacher=0)
    macs = [p.macs() for p in plans]
    rows = []
    for i, (p, m) in enumerate(zip(plans, measured)):
        mr, xr = meas[i] / meas[0], macs[i] / macs[0]
        rows.append({"plan": "teacher" if i == 0 else f"plan{i}", "embed": p.embed_dim,
                     "blocks": [list(d) for d in p.block_dims()], "merges": p.merges, "merged": bool(p.merges),
                     "macs": macs[i], "predicted_ms": pred[i],
                     "measured_ms": m["median_ms"], "measured_p90_ms": m["p90_ms"],
                     "paired_ms": meas[i],
                     "predicted_ratio": pred[i] / pred[0], "measured_ratio": mr,
                     "ratio_err_pct": st["ratio_err_pct"][i], "abs_err_pct": st["abs_err_pct"][i],
                     "macs_ratio": xr, "macs_ratio_err_pct": 100.0 * (xr / mr - 1.0)})
    held = rows[1:]
    lut_st = ratio_error_stats([r["predicted_ratio"] for r in held], [r["measured_ratio"] for r in held])
    macs_st = ratio_error_stats([r["macs_ratio"] for r in held], [r["measured_ratio"] for r in held])
    n_merged = sum(r["merged"] for r in held)
    report = {"signature": lut.signature.to_dict(), "n_plans": len(held), "n_merged": n_merged, "range": [lo, hi],
              "protocol": f"teacher + {len(held)} held-out plans ({n_merged} with token merges) in one session, each "
                          f"plan visit bracketed by teacher visits ({rounds} rounds, {repeats} timed runs per plan, "
                          f"{warmup} warm-up); measured ratio = median over visits of plan / bracketing teacher; "
                          "the MACs proxy's ratio is plan MACs / teacher MACs"
                          + (f"; {len(ctl)} of the build's calibration plans timed again in the same session "
                             "(A/A control, not among the held-out plans)" if ctl else ""),
              "align": align,
              "ratio": {**st["ratio"], "signed_median_err_pct": lut_st["signed_median_err_pct"]},
              "macs": macs_st, "groups": group_stats(rows), "drift": st["drift"],
              "spearman_macs": macs_st["spearman"],
              "lut_created": lut.meta.get("created"), "validate_s": round(time.time() - t0, 1), "rows": rows}
    if ctl:
        t_pred = lut.predict(plans[0])
        crow = [{"embed": c["embed"], "blocks": c["blocks"], "build_ratio": c["measured_ratio"],
                 "measured_ratio": m["ratio"], "moved_pct": 100.0 * (m["ratio"] / c["measured_ratio"] - 1.0),
                 "predicted_ratio": lut.predict(p) / t_pred} for (c, p), m in zip(ctl, measured_ctl)]
        report["controls"] = {"n": len(crow), "moved": ratio_error_stats([r["measured_ratio"] for r in crow],
                                                                         [r["build_ratio"] for r in crow]),
                              "rows": crow}
    out = Path(out_dir)
    make_dir(out, "profile")
    atomic_write_json(RunDir(out).lut_validation, report)
    scatter_png(rows, report, RunDir(out).lut_validation_plot)
    log(summary(report))
    return report


def _pct(x: Optional[float], fmt: str = ".1f") -> str:
    return "n/a" if x is None else f"{x:{fmt}}%"


def _share(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def summary(report: dict) -> str:
    """The validation in a few lines: the LUT against the MACs proxy on the same plans, per group, and drift."""
    r, x, d = report["ratio"], report["macs"], report["drift"]
    rng = r["measured_range"] or [float("nan")] * 2
    rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.3f}"
    lines = [f"[profile] validation on {report['n_plans']} held-out plans ({rng[0]:.0%}-{rng[1]:.0%} of the teacher, "
             f"measured), ratio error (predicted / measured plan-to-teacher ratio):",
             f"  LUT:   median {_pct(r['median_abs_err_pct'])}, signed median {_pct(r['signed_median_err_pct'], '+.1f')}"
             f", max {_pct(r['max_abs_err_pct'])}, {_share(r['within_5_pct'])} within +-5%, "
             f"{_share(r['within_10_pct'])} within +-10%, Spearman {rho}",
             f"  MACs:  median {_pct(x['median_abs_err_pct'])}, signed median {_pct(x['signed_median_err_pct'], '+.1f')}"
             f", max {_pct(x['max_abs_err_pct'])}, {_share(x['within_5_pct'])} within +-5% (same plans)"]
    if "merged" in report["groups"]:
        for name, g in report["groups"].items():
            a, b = g["lut"], g["macs"]
            lines.append(f"  {name} plans ({a['n']}): LUT median {_pct(a['median_abs_err_pct'])}, signed "
                         f"{_pct(a['signed_median_err_pct'], '+.1f')}, max {_pct(a['max_abs_err_pct'])}; MACs median "
                         f"{_pct(b['median_abs_err_pct'])}, max {_pct(b['max_abs_err_pct'])}")
    c = report.get("controls")
    if c:
        mv = c["moved"]
        lines.append(f"  A/A control: {c['n']} of the build's calibration plans timed again: their measured ratio moved "
                     f"median {_pct(mv['median_abs_err_pct'])}, signed {_pct(mv['signed_median_err_pct'], '+.1f')}, "
                     f"max {_pct(mv['max_abs_err_pct'])} since the build (the measurement's own reproducibility)")
    lines.append(f"  drift since the build: teacher predicted {d['teacher_predicted_ms']:.3f} ms, measured "
                 f"{d['teacher_measured_ms']:.3f} ms ({d['teacher_err_pct']:+.1f}%)")
    return "\n".join(lines)


def scatter_png(rows: list[dict], report: dict, path: Path) -> None:
    """Left: LUT-predicted and MACs ratio vs measured ratio to the teacher (+-5% band; merged plans hollow).
    Right: absolute ms (drift)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitrim.pipeline.core.io import atomic_save

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4.5), dpi=110)
    held = rows[1:]
    x = np.linspace(0, 1.05, 2)
    a1.plot(x, x, "k--", lw=0.8)
    a1.fill_between(x, 0.95 * x, 1.05 * x, color="0.85", label="+-5%")
    for key, marker, color, name in (("predicted_ratio", "o", "C0", "LUT"), ("macs_ratio", "^", "C2", "MACs")):
        for merged in (False, True):
            rs = [r for r in held if r["merged"] == merged]
            if not rs:
                continue
            mr, pr = [r["measured_ratio"] for r in rs], [r[key] for r in rs]
            label = f"{name}, {'merged' if merged else 'unmerged'} plans"
            if merged:  # hollow: the same predictor on plans with token merges
                a1.scatter(mr, pr, s=22, marker=marker, facecolors="none", edgecolors=color, label=label)
            else:
                a1.scatter(mr, pr, s=18, marker=marker, color=color, label=label)
    a1.scatter([1.0], [1.0], s=40, marker="*", color="C3", label="teacher")
    a1.set_xlabel("measured latency / teacher (same session)")
    a1.set_ylabel("predicted latency / teacher (LUT, or MACs)")
    r, m = report["ratio"], report["macs"]
    rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.3f}"
    a1.set_title(f"ratio error: LUT median {_pct(r['median_abs_err_pct'])} (signed "
                 f"{_pct(r['signed_median_err_pct'], '+.1f')}), max {_pct(r['max_abs_err_pct'])},\n"
                 f"{_share(r['within_5_pct'])} within +-5%, Spearman {rho}; MACs median "
                 f"{_pct(m['median_abs_err_pct'])} (signed {_pct(m['signed_median_err_pct'], '+.1f')})", fontsize=8)
    a1.legend(fontsize=7)
    pm = np.array([r["predicted_ms"] for r in rows])
    mm = np.array([r["paired_ms"] for r in rows])
    hollow = np.array([r["merged"] for r in rows])
    a2.scatter(mm[~hollow], pm[~hollow], s=18, color="C1", label="plans")
    if hollow.any():
        a2.scatter(mm[hollow], pm[hollow], s=22, facecolors="none", edgecolors="C1", label="merged plans")
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
