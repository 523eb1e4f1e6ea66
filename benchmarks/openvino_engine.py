"""OpenVINO as a second measured engine (issue 34): three tables, each ratio from one interleaved session.

(The file is not called ``openvino.py``: run as a script, its folder leads ``sys.path`` and the name would
shadow the ``openvino`` package.)

1. ``lut``: the OpenVINO fp32 LUT's ratio error against held-out plans (merged ones included), beside the MACs
   proxy on the same plans (:func:`vitrim.profiling.validate.validate_lut`), at the demo's shape
   (``configs/fmnist_openvino.yaml``'s model, random weights) and at DeiT-Tiny 224 px batch 8
   (``configs/deit_small_cpu.yaml``'s profile settings, as ``benchmarks/deit_shapes.py``). Goals, as ORT
   met them: median <= 2%, >= 95% within +-5%, max <= 6%.
2. ``cross``: one teacher (the demo's, from the cache), ``vitrim run`` with ``configs/fmnist_cpu.yaml`` and
   with ``configs/fmnist_openvino.yaml`` (the same budget, each searching on its own engine's table), then
   the teacher and both students timed on both engines (each engine one session, every plan visit bracketed by
   the teacher: ``time_ratio``), with each student's accuracy. Does a plan searched for one engine lose on
   the other?
3. ``deit``: DeiT-Small 224 px batch 8, random weights: the teacher and a 50% student (half the heads and half
   the MLP of every block) in OpenVINO fp32 / bf16 (where the CPU has it) / int8 (NNCF) and ORT fp32 / int8,
   all timed against the ORT fp32 teacher in one session (``time_ratio``, the one timing helper of
   ``vitrim.export.runners``). Goal: the OpenVINO int8 student >= 6x faster than the ORT fp32 teacher.

    .venv/bin/python benchmarks/openvino_engine.py --out runs/openvino_bench            # all three
    .venv/bin/python benchmarks/openvino_engine.py --parts deit --out runs/openvino_bench
    .venv/bin/python benchmarks/openvino_engine.py --smoke --out /tmp/ov_smoke         # tiny sizes: the code path

Writes ``<out>/openvino_bench.json`` (after every part; a part run again keeps its earlier results under
``history``, so re-timing the cross part adds a session) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

from vitrim.export.backends import get_backend
from vitrim.export.onnx import export_onnx
from vitrim.export.quantize import random_calibration
from vitrim.export.runners import interleaved, time_ratio
from vitrim.export.target import Target, cpu_flags, cpu_name
from vitrim.pipeline.core.config import load_config
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.models import canonical_state, describe
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.pipeline.core.slicing import slice_model
from vitrim.pipeline.stages.profile import lut_tokens
from vitrim.profiling.build import build_lut
from vitrim.profiling.validate import validate_lut

import smoke as smoke_sizes  # benchmarks/smoke.py (a script's own folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"median": 2.0, "within5": 0.95, "max": 6.0, "ov_int8_speedup": 6.0}
# --smoke: benchmarks/smoke.py's sizes (its figures mean nothing)
SMOKE_RUN = smoke_sizes.SETS
SMOKE_PROFILE = [s for s in smoke_sizes.SETS if s.startswith("profile.")]


def _ov_target(batch: int, threads: int, precision: str = "fp32") -> Target:
    return Target(backend="openvino", precision=precision, batch=batch, threads=threads)


# --- 1. the LUT's ratio error on OpenVINO ----------------------------------------------------------------------

def lut_part(a, out: Path) -> list[dict]:
    rows = []
    shapes = [("demo", ROOT / "configs" / "fmnist_openvino.yaml", None),
              ("deit_tiny", ROOT / "configs" / "deit_small_cpu.yaml", "deit_tiny_patch16_224")]
    for name, config, arch in shapes:
        # the token axis, so that a third of the held-out plans carry token merges (as deit_shapes.py)
        sets = ["target.backend=openvino", f"target.threads={a.threads}", "search.prune_tokens=true"]
        if arch is not None:
            sets.append(f"target.batch={a.batch}")
        if a.smoke:
            sets += SMOKE_PROFILE + ([s for s in SMOKE_RUN if s.startswith("model.kwargs")] if arch is None else [])
        cfg = load_config(config, sets)
        torch.manual_seed(0)
        if arch is None:
            arch, kw = cfg.model.arch, dict(cfg.model.kwargs)
        else:
            kw = dict(smoke_sizes.DEIT_KW) if a.smoke else {}
        teacher = timm.create_model(arch, pretrained=False, **kw).eval()
        spec = describe(teacher, arch, kw)
        target = Target.from_config(cfg.target)
        d = out / "lut" / name
        d.mkdir(parents=True, exist_ok=True)
        lut = build_lut(spec, target, cfg.profile, Floors.from_config(cfg.search), cfg.search.align, d / "lut.json",
                        progress=False, tokens=lut_tokens(cfg, spec))
        print(lut.summary(), flush=True)
        n = a.plans
        merged = n // 3 if len(lut.grid.tokens) > 1 else 0
        rep = validate_lut(lut, canonical_state(teacher), target, n - merged, d, seed=100, warmup=cfg.profile.warmup,
                           repeats=cfg.profile.repeats, rounds=cfg.profile.rounds, merged=merged, progress=False)
        v = rep["ratio"]
        miss = [k for k, bad in (("median", v["median_abs_err_pct"] > GOALS["median"]),
                                 ("within 5%", v["within_5_pct"] < GOALS["within5"]),
                                 ("max", v["max_abs_err_pct"] > GOALS["max"])) if bad]
        rows.append({"shape": name, "model": arch, "signature": str(lut.signature), "build_s": lut.meta["build_s"],
                     "validation": {k: rep[k] for k in ("ratio", "macs", "groups", "n_plans", "n_merged", "protocol")
                                    if k in rep}, "missed_goals": miss})
    return rows


def lut_table(rows: list[dict]) -> str:
    lines = ["| shape | plans (merged) | LUT ratio error: median / signed median / max / within +-5% "
             "| merged plans: median / max | MACs proxy: median / max / within +-5% | LUT build | goals |",
             "|---|---|---|---|---|---:|---|"]
    for r in rows:
        v = r["validation"]
        lut, macs, m = v["ratio"], v["macs"], v["groups"].get("merged", {}).get("lut")
        merged = f"{m['median_abs_err_pct']:.1f}% / {m['max_abs_err_pct']:.1f}%" if m and m.get("n") else "-"
        lines.append(f"| {r['shape']} ({r['model']}) | {v['n_plans']} ({v['n_merged']}) "
                     f"| {lut['median_abs_err_pct']:.1f}% / {lut['signed_median_err_pct']:+.1f}% / "
                     f"{lut['max_abs_err_pct']:.1f}% / {lut['within_5_pct']:.0%} | {merged} "
                     f"| {macs['median_abs_err_pct']:.1f}% / {macs['max_abs_err_pct']:.1f}% / "
                     f"{macs['within_5_pct']:.0%} | {r['build_s']:.0f} s "
                     f"| {'all met' if not r['missed_goals'] else 'missed: ' + ', '.join(r['missed_goals'])} |")
    return "\n".join(lines)


# --- 2. plans searched on one engine, timed on both -------------------------------------------------------------

def cross_part(a, out: Path) -> dict:
    from vitrim.pipeline.core.rundir import RunDir
    from vitrim.pipeline.stages.run import run_pipeline

    runs = {}
    for engine, config in (("ort-cpu", "fmnist_cpu.yaml"), ("openvino", "fmnist_openvino.yaml")):
        sets = [f"out_dir={out / 'cross' / engine}", f"target.threads={a.threads}"]
        cache = a.cache_dir or (str(out / "cache") if a.smoke else None)  # a smoke run never touches the real cache
        if cache:
            sets.append(f"cache_dir={cache}")
        if a.smoke:
            sets += SMOKE_RUN
        cfg = load_config(ROOT / "configs" / config, sets)
        summary = run_pipeline(cfg, log=lambda m: print(m, flush=True), progress=False)
        runs[engine] = {"cfg": cfg, "summary": summary, "rd": RunDir(cfg.out_dir)}
    cfg0 = runs["ort-cpu"]["cfg"]
    graphs = {"teacher": runs["ort-cpu"]["rd"].teacher_dir.onnx,
              **{f"searched on {e}": r["rd"].onnx for e, r in runs.items()}}
    timing = {}
    for engine in runs:
        t = Target(backend=engine, batch=cfg0.target.batch, threads=a.threads)
        runners = [t.impl.onnx_runner(p, t) for p in graphs.values()]
        with interleaved(runners):
            timings, ratios = time_ratio(runners, t.batch, a.repeats, a.rounds, warmup=cfg0.profile.warmup)
        timing[engine] = {"signature": str(t.signature(0)),
                          "ms": {k: tm.median_ms for k, tm in zip(graphs, timings)},
                          "ratio": dict(zip(list(graphs)[1:], ratios))}
    plans = {}
    for e, r in runs.items():
        s = r["summary"]
        plans[f"searched on {e}"] = {"budget": s.get("budget"), "top1": s["student"]["top1"],
                                     "teacher_top1": s["teacher"]["top1"], "macs": s["student"]["macs"],
                                     "params": s["student"]["params"], "speedup_in_run": s["speedup"],
                                     "plan": s.get("plan_summary")}
    return {"graphs": {k: str(v) for k, v in graphs.items()}, "timing": timing, "plans": plans}


def cross_table(res: dict) -> str:
    engines = list(res["timing"])
    lines = ["| plan | top-1 (teacher) | MACs | " + " | ".join(f"{e}: ms (x teacher)" for e in engines) + " |",
             "|---|---|---:|" + "---:|" * len(engines)]
    for name, p in res["plans"].items():
        cells = [f"{res['timing'][e]['ms'][name]:.3f} ({res['timing'][e]['ratio'][name]:.3f})" for e in engines]
        lines.append(f"| {name} | {p['top1']:.2f}% ({p['teacher_top1']:.2f}%) | {p['macs'] / 1e6:.1f} M | "
                     + " | ".join(cells) + " |")
    lines.append("| teacher | | | " + " | ".join(f"{res['timing'][e]['ms']['teacher']:.3f} (1)" for e in engines)
                 + " |")
    return "\n".join(lines)


# --- 3. DeiT-Small on both engines and their precisions ---------------------------------------------------------

def half_plan(spec: dict) -> Plan:
    """Half the heads and half the MLP of every block (``benchmarks/slice_deit_small.py``'s student)."""
    half = Plan.full(spec)
    for b in half.blocks:
        b.heads = b.heads[: max(1, spec["num_heads"] // 2)]
        b.mlp = b.mlp[: spec["mlp_hidden"] // 2]
    return half


def deit_part(a, out: Path) -> dict:
    arch, kw = "deit_small_patch16_224", (dict(smoke_sizes.DEIT_KW) if a.smoke else {})
    torch.manual_seed(0)
    teacher = timm.create_model(arch, pretrained=False, **kw).eval()
    spec = describe(teacher, arch, kw)
    shape = (spec["in_chans"], *spec["img_size"])
    d = out / "deit"
    d.mkdir(parents=True, exist_ok=True)
    calib = random_calibration(shape, a.calib_images)  # latency does not depend on the scales
    models = {"teacher": teacher, "50% student": slice_model(teacher, half_plan(spec))}
    ov = get_backend("openvino")
    variants = [("ort-cpu", "fp32"), ("ort-cpu", "int8"), ("openvino", "fp32"), ("openvino", "int8")]
    if "bf16" in ov.supported_precisions():
        variants.insert(3, ("openvino", "bf16"))
    runners, names = [], []
    for mname, model in models.items():
        onnx_path = export_onnx(model, d / f"{mname.split()[-1]}.onnx", shape)
        for backend, precision in variants:
            t = Target(backend=backend, precision=precision, batch=a.batch, threads=a.threads)
            src = onnx_path
            if t.quantized:
                src = d / t.impl.quantized_name(f"{mname.split()[-1]}.{backend}", precision)
                t.impl.quantize(onnx_path, src, t, calib)
            runners.append(t.impl.onnx_runner(src, t))
            names.append((mname, backend, precision))
    # the ORT fp32 teacher is the reference: every other runner's visits are bracketed by its visits
    with interleaved(runners):
        timings, ratios = time_ratio(runners, a.batch, a.repeats, a.rounds, warmup=3 if a.smoke else 10)
    rows = [{"model": m, "backend": b, "precision": p, "median_ms": tm.median_ms, "p90_ms": tm.p90_ms,
             "x_ort_fp32_teacher": 1.0 if i == 0 else 1.0 / ratios[i - 1]}
            for i, ((m, b, p), tm) in enumerate(zip(names, timings))]
    fastest = {m: max((r for r in rows if r["model"] == m), key=lambda r: r["x_ort_fp32_teacher"]) for m in models}
    ov_int8 = next(r for r in rows if (r["model"], r["backend"], r["precision"]) == ("50% student", ov.name, "int8"))
    return {"model": arch, "batch": a.batch, "threads": a.threads, "rows": rows,
            "fastest": {m: f"{r['backend']}/{r['precision']}" for m, r in fastest.items()},
            "ov_int8_student_speedup": ov_int8["x_ort_fp32_teacher"],
            "goal_met": ov_int8["x_ort_fp32_teacher"] >= GOALS["ov_int8_speedup"]}


def deit_table(res: dict) -> str:
    lines = ["| model | engine / precision | median (ms) | p90 (ms) | speedup vs the ORT fp32 teacher (median of "
             "the per-round ratios) |",
             "|---|---|---:|---:|---:|"]
    for r in res["rows"]:
        best = " (fastest)" if res["fastest"][r["model"]] == f"{r['backend']}/{r['precision']}" else ""
        lines.append(f"| {r['model']} | {r['backend']} / {r['precision']}{best} | {r['median_ms']:.2f} "
                     f"| {r['p90_ms']:.2f} | {r['x_ort_fp32_teacher']:.2f}x |")
    lines.append(f"\nOpenVINO int8 student vs the ORT fp32 teacher: {res['ov_int8_student_speedup']:.2f}x "
                 f"(goal >= {GOALS['ov_int8_speedup']:.0f}x: {'met' if res['goal_met'] else 'missed'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="lut,cross,deit", help="comma-separated: lut, cross, deit")
    p.add_argument("--out", default="runs/openvino_bench")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and repeats: checks the code path, no figures")
    p.add_argument("--plans", type=int, default=21, help="held-out plans per LUT validation, a third merged")
    p.add_argument("--batch", type=int, default=8, help="DeiT batch (the demo keeps its config's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=60, help="timed runs per model in a ratio session")
    p.add_argument("--rounds", type=int, default=12, help="round-robin visits in a ratio session")
    p.add_argument("--calib-images", type=int, default=64, help="int8 calibration images (random: timing only)")
    p.add_argument("--cache-dir", default=None, help="the cross part's cache (teacher, LUTs); default the configs'")
    a = p.parse_args(argv)
    if a.smoke:
        t = smoke_sizes.timing(True, a.repeats, a.rounds, 1)
        a.repeats, a.rounds, a.plans, a.calib_images = t["repeats"], t["rounds"], 3, 8
    warnings.simplefilter("ignore")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = cpu_flags()
    result = {"command": "python benchmarks/openvino_engine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpu": cpu_name(), "features": sorted(f for f in flags if f.startswith(("avx", "amx")))},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(a)}
    import json

    prev = out / "openvino_bench.json"
    if prev.is_file():  # earlier parts stay; a part run again moves its earlier result into history
        old = json.loads(prev.read_text())
        result = {**old, **result, "history": old.get("history", {})}
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    for part, fn, fmt in (("lut", lut_part, lut_table), ("cross", cross_part, cross_table),
                          ("deit", deit_part, deit_table)):
        if part not in parts:
            continue
        t0 = time.time()
        if part in result:
            result.setdefault("history", {}).setdefault(part, []).append(
                {"date": result.get(f"{part}_date"), "result": result[part]})
        result[part] = fn(a, out)
        result[f"{part}_s"] = round(time.time() - t0)
        result[f"{part}_date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        atomic_write_json(out / "openvino_bench.json", result)
        print(f"\n## {part}\n\n{fmt(result[part])}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
