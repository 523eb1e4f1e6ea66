"""Whole-plan calibration of a LUT, and the error statistics that validate it.

The separable LUT sums per-block micro-models; inside a whole model ORT (or
TensorRT) fuses, caches and schedules differently, so the sum is off by a
scale and an offset (Dudziak et al., BRP-NAS 2020, and nn-Meter, Zhang et al.
2021, both calibrate kernel sums against whole models). vitrim measures a few
whole plans in the same interleaved session as the micro-models and fits::

    measured(plan) - shell(E) = k * sum over kept blocks + c

by least squares on relative error, through the teacher's point (ratios are
what the search uses: the teacher is their denominator, and a small plan's
error counts as much as a large one's).

The search uses *ratios* (plan / teacher, both from the LUT), and budgets are
fractions of the teacher. :func:`error_stats` therefore reports the ratio error
(predicted plan/teacher against measured plan/teacher, both measured in one
session) as the headline, and the absolute error separately: on a shared VM
absolute milliseconds drift by +-20-40% between hours, so it measures the
machine's drift since the build, not the table.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Optional

import numpy as np

from vitrim.pipeline.core.plan import BlockPlan, Plan


# ---------------------------------------------------------------------------
# Plans of a chosen size


def sized_plan(spec: dict, grid, size: float, rng: random.Random, align: int = 8) -> Plan:
    """A random plan of roughly ``size`` (0..1] of the teacher, widths inside the LUT's grid.

    ``size`` is split at random between the embedding width, the number of kept
    blocks and the per-block widths (log-uniform Dirichlet split), and each
    block's widths are jittered by +-25%, so plans of one size differ in shape.
    """
    size = min(1.0, max(1e-3, size))
    if size >= 0.999:
        return Plan.full(spec)
    w = [rng.random() for _ in range(3)]
    w = [x / sum(w) for x in w]
    fe, fb, fw = (size ** x for x in w)  # fe * fb * fw == size

    def snap(full: int, frac: float, lo: int, hi: int, step: int) -> int:
        v = int(round(full * frac / step)) * step
        return int(min(hi, max(lo, v)))

    E = snap(spec["embed_dim"], fe, grid.embed[0], grid.embed[-1], align)
    depth = spec["depth"]
    n_keep = max(1, min(depth, int(round(depth * fb))))
    kept = set([0] + rng.sample(range(1, depth), n_keep - 1)) if depth > 1 else {0}
    blocks = []
    for i in range(depth):
        if i not in kept:
            blocks.append(BlockPlan(False))
            continue

        def jit() -> float:
            return fw * rng.uniform(0.75, 1.25)

        H = snap(spec["num_heads"], jit(), grid.heads[0], grid.heads[-1], 1)
        q = snap(spec["head_dim"], jit(), grid.qk[0], grid.qk[-1], align)
        v = snap(spec["head_dim"], jit(), grid.v[0], grid.v[-1], align)
        m = snap(spec["mlp_hidden"], jit(), grid.mlp[0], grid.mlp[-1], align)
        blocks.append(BlockPlan(True, sorted(rng.sample(range(spec["num_heads"]), H)),
                                sorted(rng.sample(range(spec["head_dim"]), q)),
                                sorted(rng.sample(range(spec["head_dim"]), v)),
                                sorted(rng.sample(range(spec["mlp_hidden"]), m))))
    return Plan(spec=dict(spec), embed_keep=sorted(rng.sample(range(spec["embed_dim"]), E)), blocks=blocks).validate()


def plan_key(p: Plan) -> tuple:
    return (p.embed_dim, tuple(p.block_dims()))


def stratified_plans(spec: dict, grid, n: int, lo: float, hi: float, ratio: Callable[[Plan], float],
                     rng: random.Random, align: int = 8, tries: int = 300,
                     exclude: Optional[set] = None) -> list[Plan]:
    """``n`` distinct plans, one per equal-width stratum of ``[lo, hi]`` of ``ratio(plan)``.

    ``ratio`` is the plan's fraction of the teacher (the LUT's prediction for
    validation; a proxy for calibration, before any table exists). Each stratum
    is filled by rejection sampling; the size to draw is steered by the sizes
    that landed near it so far. A stratum that cannot be hit within ``tries``
    takes the closest plan found (logged by the caller through the ratios).
    """
    edges = np.linspace(lo, hi, n + 1)
    seen: list[tuple[float, float]] = []  # (ratio, size) of every draw
    taken = set(exclude or ())
    out: list[Plan] = []
    for a, b in zip(edges[:-1], edges[1:]):
        mid = (a + b) / 2
        best: Optional[tuple[float, Plan]] = None
        for t in range(tries):
            if len(seen) >= 4 and t % 3:  # steer: the size whose ratio was closest to the stratum's middle
                r0, s0 = min(seen, key=lambda rs: abs(rs[0] - mid))
                size = min(1.0, max(0.01, s0 * (mid / max(r0, 1e-6)) * rng.uniform(0.85, 1.15)))
            else:
                size = rng.uniform(0.02, 1.0)
            p = sized_plan(spec, grid, size, rng, align)
            k = plan_key(p)
            if k in taken:
                continue
            r = ratio(p)
            seen.append((r, size))
            if a <= r <= b:
                best = (0.0, p)
                break
            d = min(abs(r - a), abs(r - b))
            if best is None or d < best[0]:
                best = (d, p)
        if best is not None:
            out.append(best[1])
            taken.add(plan_key(best[1]))
    return out


# ---------------------------------------------------------------------------
# Composition fit


def fit_composition(shell_ms: np.ndarray, blocks_ms: np.ndarray, measured_ms: np.ndarray,
                    anchor: Optional[int] = None) -> tuple[float, float]:
    """Least-squares ``(k, c)`` with ``measured ~ shell + k * blocks + c``, on relative error.

    ``anchor`` (the teacher's row) is fitted exactly and the other plans fix the
    scale (the teacher is the denominator of every ratio). On the embedded
    default it validated worse than the plain fit (16.9% vs 6.6% median ratio
    error on the same measurements: one noisy teacher sample then shifts every
    ratio), so the default ``anchor=None`` is plain weighted least squares. With a single plan (or plans whose block sums
    coincide) the offset is not identifiable: ``c = 0`` and ``k`` alone is fitted.
    """
    shell_ms, blocks_ms, measured_ms = (np.asarray(a, dtype=np.float64) for a in (shell_ms, blocks_ms, measured_ms))
    y = measured_ms - shell_ms
    w = 1.0 / measured_ms  # relative error: every plan's ratio matters alike
    if len(y) < 2 or np.ptp(blocks_ms) <= 1e-9 * max(1.0, float(np.abs(blocks_ms).max())):
        k = float(np.sum(w * w * blocks_ms * y) / np.sum(w * w * blocks_ms * blocks_ms)) if np.any(blocks_ms) else 1.0
        return k, 0.0
    if anchor is None:
        A = np.stack([blocks_ms, np.ones_like(blocks_ms)], axis=1) * w[:, None]
        (k, c), *_ = np.linalg.lstsq(A, y * w, rcond=None)
        return float(k), float(c)
    x, yy = blocks_ms - blocks_ms[anchor], y - y[anchor]  # through the anchor: y - y_a = k (x - x_a)
    k = float(np.sum(w * w * x * yy) / np.sum(w * w * x * x))
    return k, float(y[anchor] - k * blocks_ms[anchor])


def select_composition(shell_ms, blocks_ms, measured_ms, teacher: int = 0) -> tuple[float, float, str, dict]:
    """Scale-and-offset or scale-only composition, whichever predicts held-out ratios better.

    Leave-one-out over the calibration plans (the teacher stays in, as the
    ratios' denominator): with 6-8 noisy whole-plan timings, a free offset can
    fit the noise, so it is kept only when it predicts the left-out plans'
    ratios better than a scale through the teacher alone. Returns
    ``(k, c, model, leave-one-out median |ratio error| % per model)``.
    """
    sh, bs, me = (np.asarray(a, dtype=np.float64) for a in (shell_ms, blocks_ms, measured_ms))
    n = len(me)

    def scale_only(idx):
        return float((me[teacher] - sh[teacher]) / bs[teacher]) if bs[teacher] else 1.0, 0.0

    def both(idx):
        return fit_composition(sh[idx], bs[idx], me[idx])

    loo: dict = {}
    for name, fit in (("scale+offset", both), ("scale", scale_only)):
        errs = []
        for j in range(n):
            if j == teacher:
                continue
            idx = [i for i in range(n) if i != j]
            k, c = fit(idx)
            pt, pj = sh[teacher] + k * bs[teacher] + c, sh[j] + k * bs[j] + c
            errs.append(abs((pj / pt) / (me[j] / me[teacher]) - 1.0) * 100)
        loo[name] = float(np.median(errs)) if errs else float("nan")
    if n >= 3 and loo["scale+offset"] < loo["scale"]:
        k, c = both(list(range(n)))
        return k, c, "scale+offset", loo
    k, c = scale_only(list(range(n)))
    return k, c, "scale", loo


# ---------------------------------------------------------------------------
# Error statistics


def error_stats(predicted_ms: list[float], measured_ms: list[float], teacher: int = 0) -> dict:
    """Ratio error (headline) and absolute error (drift) of predictions against one session's measurements.

    Row ``teacher`` is the teacher, measured in the same session as the others.
    For every other row i::

        ratio_err_i = (pred_i / pred_t) / (meas_i / meas_t) - 1      (in %)

    The teacher's own ratio error is 0 by construction, so it is left out of the
    ratio statistics. The absolute error ``pred_i / meas_i - 1`` over all rows,
    and the teacher's ``pred_t`` vs ``meas_t``, are reported as drift since the build.
    """
    from scipy.stats import spearmanr

    pred = np.asarray(predicted_ms, dtype=np.float64)
    meas = np.asarray(measured_ms, dtype=np.float64)
    others = np.array([i for i in range(len(pred)) if i != teacher], dtype=int)
    pr, mr = pred[others] / pred[teacher], meas[others] / meas[teacher]
    rerr = 100.0 * (pr / mr - 1.0)
    aerr = 100.0 * (pred / meas - 1.0)
    rho = float(spearmanr(pr, mr).statistic) if len(others) >= 2 else float("nan")
    a = np.abs(rerr)
    return {
        "ratio": {"n": int(len(others)), "median_abs_err_pct": float(np.median(a)) if len(a) else float("nan"),
                  "max_abs_err_pct": float(a.max()) if len(a) else float("nan"),
                  "within_5_pct": float(np.mean(a <= 5.0)) if len(a) else float("nan"),
                  "within_10_pct": float(np.mean(a <= 10.0)) if len(a) else float("nan"),
                  "spearman": rho if not math.isnan(rho) else None,
                  "measured_range": [float(mr.min()), float(mr.max())] if len(mr) else None,
                  "predicted_range": [float(pr.min()), float(pr.max())] if len(pr) else None},
        "drift": {"teacher_predicted_ms": float(pred[teacher]), "teacher_measured_ms": float(meas[teacher]),
                  "teacher_err_pct": float(aerr[teacher]), "median_abs_err_pct": float(np.median(np.abs(aerr))),
                  "max_abs_err_pct": float(np.abs(aerr).max())},
        "ratio_err_pct": [0.0 if i == teacher else float(rerr[list(others).index(i)]) for i in range(len(pred))],
        "abs_err_pct": [float(x) for x in aerr],
    }
