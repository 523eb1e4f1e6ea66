"""Does the LUT predict real engines? Measure random plans end to end and compare.

For N random plans (per-block widths, skipped blocks and embedding dims drawn
on the search's alignment), slice the teacher, export the student, time it on
the target runner, and compare with ``lut.predict``. Reports the median and max
absolute % error and the Spearman rank correlation, as JSON plus a scatter PNG.
This is the evidence that the table is worth having (HELP found FLOPs rank
architectures with a correlation of only 0.667 on a GPU).
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
from vitrim.pipeline.core.plan import BlockPlan, Plan
from vitrim.profiling.lut import LatencyTable


def random_plan(spec: dict, grid, rng: random.Random, skip_prob: float = 0.2, align: int = 8) -> Plan:
    """A random plan inside the LUT's grid, widths on multiples of ``align``."""
    def width(lo: int, hi: int) -> int:
        choices = sorted({w for w in range(lo, hi + 1) if w % align == 0 or w in (lo, hi)})
        return rng.choice(choices)

    E = width(grid.embed[0], grid.embed[-1])
    blocks = []
    for i in range(spec["depth"]):
        if i > 0 and rng.random() < skip_prob:
            blocks.append(BlockPlan(False))
            continue
        H = rng.randint(grid.heads[0], grid.heads[-1])
        q, v, m = width(grid.qk[0], grid.qk[-1]), width(grid.v[0], grid.v[-1]), width(grid.mlp[0], grid.mlp[-1])
        blocks.append(BlockPlan(True, sorted(rng.sample(range(spec["num_heads"]), H)),
                                sorted(rng.sample(range(spec["head_dim"]), q)),
                                sorted(rng.sample(range(spec["head_dim"]), v)),
                                sorted(rng.sample(range(spec["mlp_hidden"]), m))))
    return Plan(spec=dict(spec), embed_keep=sorted(rng.sample(range(spec["embed_dim"]), E)), blocks=blocks).validate()


def measure_plans(plans: list[Plan], state: dict, target: Target, warmup: int, repeats: int, rounds: int,
                  workdir: Path, progress: bool = True, extra: list | None = None) -> list[dict]:
    """Slice and export every plan, then time them all round-robin (one interleaved session).

    ``extra`` runners (e.g. the LUT's reference micro-model) are timed in the same rounds and
    their results appended after the plans'.
    """
    import gc

    from tqdm import tqdm

    from vitrim.export.engine import runner_for_module
    from vitrim.export.runners import time_interleaved
    from vitrim.pipeline.core.slicing import slice_model

    runners = []
    for i, plan in enumerate(tqdm(plans, desc="[profile] export plans", disable=not progress)):
        shape = (plan.spec["in_chans"], *plan.spec["img_size"])
        runners.append(runner_for_module(slice_model(state, plan), shape, target, workdir, f"plan{i}"))
    runners += list(extra or [])
    gc.collect()
    for r in runners:
        r.activate()
    try:
        timings = time_interleaved(runners, target.batch, repeats, rounds, warmup)
    finally:
        for r in runners:
            r.deactivate()
    return [{"median_ms": t.median_ms, "p90_ms": t.p90_ms, "n": t.repeats} for t in timings]


def _stats(pred: np.ndarray, meas: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    err = np.abs((pred - meas) / meas) * 100
    return {"median_abs_err_pct": float(np.median(err)), "max_abs_err_pct": float(err.max()),
            "spearman": float(spearmanr(pred, meas).statistic)}


def validate_lut(lut: LatencyTable, state: dict, target: Target, n: int, out_dir: str | os.PathLike, seed: int = 0,
                 warmup: int = 10, repeats: int = 30, rounds: int = 3, align: int = 8, progress: bool = True,
                 same_session: bool = False, pcfg=None, log: Callable[[str], None] = print) -> dict:
    """Validate ``lut`` on ``n`` random plans plus the teacher; writes JSON and PNG into ``out_dir``.

    The stored LUT was measured minutes or days ago; a shared VM drifts by
    +-20% between sessions (measured here). With ``same_session`` the LUT's
    micro-models are re-timed *in the same interleaved session* as the plans,
    which separates the model's own error from the machine's drift.
    """
    from scipy.stats import spearmanr

    from vitrim.profiling.lut import _open_runner, assemble, lut_items

    t0 = time.time()
    want = target.signature(lut.signature.tokens)
    check_compatible(lut.signature, want)
    rng = random.Random(seed)
    plans = [Plan.full(lut.spec)] + [random_plan(lut.spec, lut.grid, rng, align=align) for _ in range(n)]
    with tempfile.TemporaryDirectory(prefix="vitrim-val-") as tmp:
        extra, items, check_dims = [], [], []
        if same_session:
            from vitrim.pipeline.core.config import ProfileConfig

            items, check_dims = lut_items(lut.spec, lut.grid, pcfg or ProfileConfig(checks=len(lut.checks)))
            from tqdm import tqdm

            extra = [_open_runner(it, lut.spec, target, lut.signature.tokens, Path(tmp))
                     for it in tqdm(items, desc="[profile] LUT micro-models", disable=not progress)]
        measured = measure_plans(plans, state, target, warmup, repeats, rounds, Path(tmp), progress, extra)
    session_lut = None
    if same_session:
        med = {it.key: m["median_ms"] for it, m in zip(items, measured[len(plans):])}
        session_lut = assemble(lut.signature, lut.spec, lut.grid, med, check_dims)
        measured = measured[:len(plans)]
    rows = []
    for i, (p, m) in enumerate(zip(plans, measured)):
        pred = lut.predict(p)
        row = {"plan": "teacher" if i == 0 else f"random{i}", "embed": p.embed_dim,
               "blocks": [list(d) for d in p.block_dims()], "macs": p.macs(), "predicted_ms": pred,
               "measured_ms": m["median_ms"], "measured_p90_ms": m["p90_ms"],
               "err_pct": 100.0 * (pred - m["median_ms"]) / m["median_ms"]}
        if session_lut is not None:
            row["same_session_predicted_ms"] = session_lut.predict(p)
            row["same_session_err_pct"] = 100.0 * (row["same_session_predicted_ms"] - m["median_ms"]) / m["median_ms"]
        rows.append(row)
    pred = np.array([r["predicted_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    macs = np.array([r["macs"] for r in rows], dtype=np.float64)
    report = {"signature": lut.signature.to_dict(), "n_plans": len(rows), **_stats(pred, meas),
              "spearman_macs": float(spearmanr(macs, meas).statistic)}
    if session_lut is not None:
        report["same_session"] = _stats(np.array([r["same_session_predicted_ms"] for r in rows]), meas)
    report["validate_s"] = round(time.time() - t0, 1)
    report["rows"] = rows
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "lut_validation.json", report)
    scatter_png(pred, meas, out / "lut_validation.png", report,
                np.array([r["same_session_predicted_ms"] for r in rows]) if session_lut is not None else None)
    msg = (f"[profile] validation on {len(rows)} plans (stored LUT): median |err| {report['median_abs_err_pct']:.1f}%, "
           f"max {report['max_abs_err_pct']:.1f}%, Spearman {report['spearman']:.3f} (MACs: {report['spearman_macs']:.3f})")
    if session_lut is not None:
        ss = report["same_session"]
        msg += (f"; LUT re-timed in the same session: median |err| {ss['median_abs_err_pct']:.1f}%, "
                f"max {ss['max_abs_err_pct']:.1f}%, Spearman {ss['spearman']:.3f}")
    log(msg)
    return report


def scatter_png(pred: np.ndarray, meas: np.ndarray, path: Path, report: dict, same: np.ndarray | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitrim.pipeline.core.io import atomic_save

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.scatter(meas, pred, s=18, label="stored LUT")
    if same is not None:
        ax.scatter(meas, same, s=18, marker="x", color="C2", label="LUT re-timed in the same session")
    ax.scatter(meas[:1], pred[:1], s=40, marker="*", color="C3", label="teacher")
    allv = np.concatenate([pred, meas] + ([same] if same is not None else []))
    lo, hi = allv.min() * 0.95, allv.max() * 1.05
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("LUT-predicted latency (ms)")
    title = f"stored: median |err| {report['median_abs_err_pct']:.1f}%, Spearman {report['spearman']:.3f}"
    if "same_session" in report:
        ss = report["same_session"]
        title += f"\nsame session: median |err| {ss['median_abs_err_pct']:.1f}%, Spearman {ss['spearman']:.3f}"
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
