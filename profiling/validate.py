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
from typing import Callable, Optional

import numpy as np

from export.target import Target, check_compatible
from pipeline.io import atomic_write_json
from pipeline.plan import BlockPlan, Plan
from profiling.lut import LatencyTable


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
                  workdir: Path, progress: bool = True) -> list[dict]:
    """Slice, export and time each plan end to end (interleaved rounds)."""
    from tqdm import tqdm

    from export.onnx import export_onnx
    from export.runners import make_runner
    from pipeline.slicing import slice_model

    runners = []
    for i, plan in enumerate(tqdm(plans, desc="[profile] export plans", disable=not progress)):
        model = slice_model(state, plan)
        shape = (plan.spec["in_chans"], *plan.spec["img_size"])
        if target.backend in ("torch-cpu", "torch-cuda"):
            runners.append(make_runner(target.backend, model=model, sample_shape=shape, threads=target.threads,
                                       precision=target.precision))
            continue
        path = export_onnx(model, workdir / f"plan{i}.onnx", shape)
        if target.backend == "ort-cpu":
            runners.append(make_runner("ort-cpu", onnx_path=path, threads=target.threads, opt_level=target.opt_level))
        else:
            from export.engine import build_trt_engine
            from export.onnx import to_fp16
            from export.target import trt_major

            src = to_fp16(path, workdir / f"plan{i}.fp16.onnx") if target.precision == "fp16" and trt_major() >= 11 else path
            eng = build_trt_engine(src, workdir / f"plan{i}.plan", target, shape, workdir / "timing.cache")
            runners.append(make_runner("tensorrt", engine_path=eng.path))
    samples: list[list[float]] = [[] for _ in plans]
    per_round = max(1, repeats // max(1, rounds))
    chunk = 6
    for c in range(0, len(runners), chunk):
        part = list(range(c, min(c + chunk, len(runners))))
        for i in part:
            runners[i].activate()
        try:
            for rnd in range(max(1, rounds)):
                for i in part:
                    samples[i] += runners[i].time_samples(target.batch, per_round, warmup=warmup if rnd == 0 else 2)
        finally:
            for i in part:
                runners[i].deactivate()
    return [{"median_ms": float(np.median(s)), "p90_ms": float(np.percentile(s, 90)), "n": len(s)} for s in samples]


def validate_lut(lut: LatencyTable, state: dict, target: Target, n: int, out_dir: str | os.PathLike, seed: int = 0,
                 warmup: int = 10, repeats: int = 30, rounds: int = 3, align: int = 8, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Validate ``lut`` on ``n`` random plans plus the teacher; writes JSON and PNG into ``out_dir``."""
    from scipy.stats import spearmanr

    t0 = time.time()
    want = target.signature(lut.signature.tokens)
    check_compatible(lut.signature, want)
    rng = random.Random(seed)
    plans = [Plan.full(lut.spec)] + [random_plan(lut.spec, lut.grid, rng, align=align) for _ in range(n)]
    with tempfile.TemporaryDirectory(prefix="vitrim-val-") as tmp:
        measured = measure_plans(plans, state, target, warmup, repeats, rounds, Path(tmp), progress)
    rows = []
    for i, (p, m) in enumerate(zip(plans, measured)):
        pred = lut.predict(p)
        rows.append({"plan": "teacher" if i == 0 else f"random{i}", "embed": p.embed_dim,
                     "blocks": [list(d) for d in p.block_dims()], "macs": p.macs(), "predicted_ms": pred,
                     "measured_ms": m["median_ms"], "measured_p90_ms": m["p90_ms"],
                     "err_pct": 100.0 * (pred - m["median_ms"]) / m["median_ms"]})
    pred = np.array([r["predicted_ms"] for r in rows])
    meas = np.array([r["measured_ms"] for r in rows])
    macs = np.array([r["macs"] for r in rows], dtype=np.float64)
    abs_err = np.abs((pred - meas) / meas) * 100
    report = {"signature": lut.signature.to_dict(), "n_plans": len(rows), "median_abs_err_pct": float(np.median(abs_err)),
              "max_abs_err_pct": float(abs_err.max()), "spearman": float(spearmanr(pred, meas).statistic),
              "spearman_macs": float(spearmanr(macs, meas).statistic), "validate_s": round(time.time() - t0, 1),
              "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "lut_validation.json", report)
    scatter_png(pred, meas, out / "lut_validation.png", report)
    log(f"[profile] validation on {len(rows)} plans: median |err| {report['median_abs_err_pct']:.1f}%, "
        f"max {report['max_abs_err_pct']:.1f}%, Spearman {report['spearman']:.3f} (MACs: {report['spearman_macs']:.3f})")
    return report


def scatter_png(pred: np.ndarray, meas: np.ndarray, path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_save

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.scatter(meas, pred, s=18)
    ax.scatter(meas[:1], pred[:1], s=40, marker="*", color="C3", label="teacher")
    lo, hi = min(pred.min(), meas.min()) * 0.95, max(pred.max(), meas.max()) * 1.05
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("LUT-predicted latency (ms)")
    ax.set_title(f"median |err| {report['median_abs_err_pct']:.1f}%, Spearman {report['spearman']:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
