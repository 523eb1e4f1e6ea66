"""The LUT at ImageNet shapes (issue 23): independent builds at DeiT-Tiny and DeiT-Small shapes, each validated.

For each model (timm, ``pretrained=False``: random weights, no hub download; latency
does not depend on the weight values) and each of ``--builds`` independent builds:

1. build the LUT from scratch with the profile settings of ``--config``
   (``configs/deit_small_cpu.yaml``: its grid, its token axis for
   ``search.prune_tokens``, its measurement settings) at 224 px, batch 8, and time the build;
2. validate it (:func:`vitrim.profiling.validate.validate_lut`) on ``--plans`` held-out
   plans over 30-95% of the teacher, a third of them with token merges, each sliced,
   exported and timed bracketed by the teacher in one session, against the MACs proxy
   on the same plans, and times ``--controls`` of the build's own calibration plans again (an A/A control:
   how far a ratio the build measured moved by the time of the validation);
3. check the issue's goals for that build: ratio error median <= 2%, >= 95% of plans
   within +-5%, max <= 6%, at most half the MACs proxy's median error, signed median
   within +-1%, build <= 5 minutes.

    .venv/bin/python benchmarks/deit_shapes.py --out runs/deit_shapes

Writes ``<out>/deit_shapes.json`` (after every build), per-build ``lut.json`` and
``lut_validation.{json,png}``, and prints the results table (markdown).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

import smoke as smoke_sizes  # benchmarks/smoke.py (a script's own folder is on sys.path)
from vitrim.export.target import Target
from vitrim.pipeline.core.config import load_config
from vitrim.pipeline.core.io import atomic_write_json, read_json
from vitrim.pipeline.core.models import canonical_state, describe
from vitrim.pipeline.core.plan import Floors
from vitrim.pipeline.stages.profile import lut_tokens
from vitrim.profiling.build import build_lut
from vitrim.profiling.validate import validate_lut

MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}
GOALS = {"median": 2.0, "within5": 0.95, "max": 6.0, "macs_share": 0.5, "signed": 1.0, "build_s": 300.0}


def goals(v: dict, build_s: float) -> list[str]:
    """The goals a build misses (empty: all met)."""
    lut, macs = v["ratio"], v["macs"]
    miss = []
    if lut["median_abs_err_pct"] > GOALS["median"]:
        miss.append("median")
    if lut["within_5_pct"] < GOALS["within5"]:
        miss.append("within 5%")
    if lut["max_abs_err_pct"] > GOALS["max"]:
        miss.append("max")
    if lut["median_abs_err_pct"] > GOALS["macs_share"] * macs["median_abs_err_pct"]:
        miss.append("half of MACs")
    if abs(lut["signed_median_err_pct"]) > GOALS["signed"]:
        miss.append("signed median")
    if build_s > GOALS["build_s"]:
        miss.append("build time")
    return miss


def bench_build(name: str, b: int, a, cfg, out: Path) -> dict:
    torch.manual_seed(0)
    kwargs = smoke_sizes.DEIT_KW if a.smoke else {}
    teacher = timm.create_model(MODELS[name], pretrained=False, **kwargs).eval()
    spec = describe(teacher, MODELS[name], kwargs)
    target = Target(batch=a.batch, threads=a.threads)
    d = out / name / f"build{b}"
    if a.reuse and (d / "result.json").is_file():  # a finished build of an earlier invocation
        return read_json(d / "result.json", "benchmark", "build result", "delete it")
    if d.exists() and not a.reuse:
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    lut = build_lut(spec, target, cfg.profile, Floors.from_config(cfg.search), cfg.search.align, d / "lut.json",
                    progress=False, tokens=lut_tokens(cfg, spec))
    print(lut.summary(), flush=True)
    rep = validate_lut(lut, canonical_state(teacher), target, a.plans - a.plans // 3, d, seed=100 + b,
                       warmup=cfg.profile.warmup, repeats=cfg.profile.repeats, rounds=cfg.profile.rounds,
                       merged=a.plans // 3 if len(lut.grid.tokens) > 1 else 0, progress=False, controls=a.controls)
    build_s = lut.meta["build_s"]
    row = {"model": name, "build": b, "signature": str(lut.signature), "tokens": lut.grid.tokens,
            "entries": lut.meta["entries"],
            "build_s": build_s, "noise": lut.meta["noise"], "compose_model": lut.meta["compose_model"],
            "compose": [lut.compose, lut.block_correction_ms, lut.compose_offset_ms],
            "alignment": lut.meta.get("alignment"), "probes": lut.probes,
            "validation": {k: rep[k] for k in ("ratio", "macs", "groups", "drift", "n_plans", "n_merged", "protocol",
                                               "controls") if k in rep},
            "phases_s": lut.meta.get("phases_s"), "plan_exports_s": lut.meta.get("plan_exports_s"),
            "validate_s": rep["validate_s"], "missed_goals": goals(rep, build_s),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    atomic_write_json(d / "result.json", row)
    return row


def _aa(v: dict) -> str:
    c = v.get("controls")
    if not c:
        return "-"
    mv = c["moved"]
    return f"{mv['median_abs_err_pct']:.1f}% / {mv['signed_median_err_pct']:+.1f}% ({c['n']} plans)"


def table(rows: list[dict]) -> str:
    lines = ["| model | build | LUT build | plans (merged) | LUT ratio error: median / signed median / max / within +-5% "
             "| merged plans: median / max | MACs proxy: median / max | entry noise (median spread) "
             "| A/A: calibration plans' ratio moved since the build, median / signed | goals |",
             "|---|---:|---:|---|---|---|---|---:|---|---|"]
    for r in rows:
        v = r["validation"]
        lut, macs, m = v["ratio"], v["macs"], v["groups"].get("merged", {}).get("lut")
        merged = f"{m['median_abs_err_pct']:.1f}% / {m['max_abs_err_pct']:.1f}%" if m and m.get("n") else "-"
        lines.append(f"| {r['model']} | {r['build']} | {r['build_s']:.0f} s | {v['n_plans']} ({v['n_merged']}) "
                     f"| {lut['median_abs_err_pct']:.1f}% / {lut['signed_median_err_pct']:+.1f}% / "
                     f"{lut['max_abs_err_pct']:.1f}% / {lut['within_5_pct']:.0%} | {merged} "
                     f"| {macs['median_abs_err_pct']:.1f}% / {macs['max_abs_err_pct']:.1f}% "
                     f"| {r['noise']['entry_spread_median_pct']:.1f}% | {_aa(v)} "
                     f"| {'all met' if not r['missed_goals'] else 'missed: ' + ', '.join(r['missed_goals'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/deit_small_cpu.yaml", help="profile and search settings")
    p.add_argument("--models", default="deit_tiny,deit_small")
    p.add_argument("--builds", type=int, default=3)
    p.add_argument("--plans", type=int, default=21, help="held-out plans per validation, a third of them merged")
    p.add_argument("--out", default="runs/deit_shapes")
    p.add_argument("--controls", type=int, default=4, help="calibration plans timed again in each validation (A/A)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="keep the builds an earlier invocation finished in --out, "
                   "and resume one it left unfinished (its build time is then the resumed part's)")
    p.add_argument("--smoke", action="store_true", help="a 32 px DeiT of each family, one coarse build, 3 plans: "
                   "seconds (benchmarks/smoke.py); figures mean nothing")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    sets = []
    if a.smoke:
        a.builds, a.plans, a.controls, a.batch, a.models = 1, 2, 1, 2, a.models.split(",")[0]
        sets = [s for s in smoke_sizes.SETS if s.startswith("profile.")]
    cfg = load_config(a.config, sets)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    for m in a.models.split(","):
        for b in range(1, a.builds + 1):
            rows.append(bench_build(m, b, a, cfg, out))
            print(table(rows[-1:]), flush=True)
            atomic_write_json(out / "deit_shapes.json", {
                "command": "python benchmarks/deit_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": rows[0]["signature"], "date": time.strftime("%Y-%m-%d", time.gmtime()),
                "args": vars(a), "profile": dataclasses.asdict(cfg.profile), "results": rows,
                "wall_s": round(time.time() - t0)})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
