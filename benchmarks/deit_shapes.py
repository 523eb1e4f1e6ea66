"""The LUT at ImageNet shapes: DeiT-Tiny and DeiT-Small at 224 px, ORT-CPU, batch 8.

For each model (timm, ``pretrained=False``: random weights, no hub download;
latency does not depend on the weight values):

1. build the LUT (micro-models plus whole-plan calibration) and time the build;
2. validate it on N held-out plans stratified over 30-95% of the teacher's
   predicted latency, each sliced, exported and timed round-robin with the
   teacher in one session: ratio error median / max / within +-5% / Spearman,
   and the drift of the absolute ms;
3. search a 50% plan and measure its speedup against the LUT's prediction. With
   random weights there is no data to score on, so the search is the
   ``magnitude`` strategy's selection (knapsack on L1 magnitude per ms saved,
   :func:`vitrim.pipeline.search.prune_to` + ``refill``) with no KD steps.

    .venv/bin/python benchmarks/deit_shapes.py --out runs/deit_shapes

Writes ``<out>/deit_shapes.json``, per-model ``lut_validation.{json,png}`` and
prints the README table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch

from vitrim.export.target import Target
from vitrim.pipeline.core.config import ProfileConfig, SearchConfig
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.models import canonical_state, describe
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.core.slicing import full_size_compact
from vitrim.pipeline.search import LatencyCost, prune_to, refill, relative_magnitude
from vitrim.profiling.table import LatencyTable
from vitrim.profiling.build import build_lut
from vitrim.profiling.validate import measure_plans, validate_lut

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}


def grid_cfg(text: str, a) -> ProfileConfig:
    kw = {f"{k}_points" if k != "heads" else "head_points": int(v) for k, v in (p.split("=") for p in text.split(","))}
    return ProfileConfig(**kw, warmup=a.warmup, repeats=a.repeats, rounds=a.rounds, checks=a.checks,
                         calibration_plans=a.calibration_plans)


def magnitude_plan(teacher, lut, fraction: float) -> Plan:
    """A plan at ``fraction`` of the teacher's predicted latency, searched on ``lut`` with the ``magnitude``
    strategy's selection (random weights leave no data to score on): knapsack on L1 magnitude per ms saved,
    then refill; no block skipping (magnitude has no block score on the groups' scale)."""
    compact, full = full_size_compact(teacher)
    scores = relative_magnitude(compact)
    cost = LatencyCost(lut)
    budget = fraction * cost.predict(full)
    plan, removed = prune_to(full, scores, cost, budget, SearchConfig(prune_blocks=False), lut.grid.embed[0])
    return refill(plan, removed, cost, budget)[0]


def bench_one(name: str, a, out: Path) -> dict:
    torch.manual_seed(0)
    teacher = timm.create_model(MODELS[name], pretrained=False).eval()
    spec = describe(teacher, MODELS[name])
    target = Target(batch=a.batch, threads=a.threads)
    pcfg = grid_cfg(a.grid, a)
    lut_path = out / f"lut-{name}.json"
    t0 = time.time()
    if lut_path.is_file() and not a.rebuild:
        lut = LatencyTable.load(lut_path, expect=target.signature(Plan.full(spec).num_tokens))
    else:
        lut = build_lut(spec, target, pcfg, Floors(), 8, lut_path, progress=False)
    print(lut.summary(), flush=True)
    rep = validate_lut(lut, canonical_state(teacher), target, a.plans, out / name, seed=a.seed, warmup=a.warmup,
                       repeats=a.repeats, rounds=a.rounds)
    plan = magnitude_plan(teacher, lut, 0.5)
    cost, full = LatencyCost(lut), Plan.full(spec)
    t_pred = cost.predict(full)
    with tempfile.TemporaryDirectory() as tmp:
        t, s = measure_plans([full, plan], canonical_state(teacher), target, a.warmup, max(a.repeats, 30),
                             max(a.rounds, 6), Path(tmp), progress=False, paired=True)
    pred_speedup = t_pred / cost.predict(plan)
    meas_speedup = 1.0 / s["ratio"]  # the student against the teacher visits that bracket it
    r = {"model": name, "spec": {k: spec[k] for k in ("embed_dim", "depth", "num_heads", "mlp_hidden")},
         "tokens": Plan.full(spec).num_tokens, "grid": lut.grid.__dict__, "entries": lut.meta.get("entries"),
         "lut_build_s": lut.meta.get("build_s"), "validation": {k: rep[k] for k in ("ratio", "drift", "protocol")},
         "validate_s": rep["validate_s"], "calibration": lut.calibration, "probes": lut.probes,
         "compose": [lut.compose, lut.compose_offset_ms],
         "search50": {"predicted_ratio": 1 / pred_speedup, "predicted_speedup": pred_speedup,
                      "teacher_ms": t["median_ms"], "student_ms": s["median_ms"], "measured_speedup": meas_speedup,
                      "measured_ratio": 1 / meas_speedup, "ratio_err_pct": 100 * (meas_speedup / pred_speedup - 1),
                      "params": plan.num_params(), "plan": plan.summary()},
         "wall_s": round(time.time() - t0, 1)}
    print(f"[deit_shapes] {name}: 50% plan predicted {1 / pred_speedup:.1%} of the teacher ({pred_speedup:.2f}x), "
          f"measured {1 / meas_speedup:.1%} ({meas_speedup:.2f}x)", flush=True)
    return r


def table(rows: list[dict]) -> str:
    lines = ["| model | LUT entries | LUT build | plans (range measured) | ratio err median | max | within +-5% "
             "| Spearman | 50% plan: predicted / measured speedup |", "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        v = r["validation"]["ratio"]
        s = r["search50"]
        lines.append(f"| {r['model']} | {r['entries']} | {r['lut_build_s']:.0f} s | {v['n']} "
                     f"({v['measured_range'][0]:.0%}-{v['measured_range'][1]:.0%}) | {v['median_abs_err_pct']:.1f}% "
                     f"| {v['max_abs_err_pct']:.1f}% | {v['within_5_pct']:.0%} | {v['spearman']:.3f} "
                     f"| {s['predicted_speedup']:.2f}x / {s['measured_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="deit_tiny,deit_small")
    p.add_argument("--plans", type=int, default=15)
    p.add_argument("--out", default="runs/deit_shapes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", default="embed=3,heads=4,qk=3,v=3,mlp=5", help="grid points per axis")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--checks", type=int, default=4)
    p.add_argument("--calibration-plans", type=int, default=6)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rebuild", action="store_true", help="measure the LUTs again even if present in --out")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in a.models.split(","):
        rows.append(bench_one(m, a, out))
        atomic_write_json(out / "deit_shapes.json", {"args": vars(a), "results": rows})  # after each model
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
