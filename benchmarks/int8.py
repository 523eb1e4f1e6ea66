"""Does INT8 pay on ORT-CPU, and does searching against an int8 LUT change the plan?

Part 1, the embedded default (latency and test top-1): the teacher in fp32 and
int8, and a student searched and fine-tuned against the fp32 LUT and one
against the int8 LUT (``vitrim run`` with ``target.precision`` fp32 / int8),
each engine released in fp32 and int8. Part 2, deit_small at 224 px (random
weights, batch 8, latency only): a LUT in fp32 and one in int8 (``--deit-mode``,
dynamic by default), a 50% plan searched against each (the ``magnitude``
selection: random weights leave no data to score on), and the teacher and both
students exported in fp32 and int8. Also: which of ORT's transformer-optimizer
fusions apply to the exported graphs.

Every block of engines is timed round-robin in one session (machine drift
hits all alike).

    .venv/bin/python benchmarks/int8.py configs/fmnist_cpu.yaml --out runs/int8
    .venv/bin/python benchmarks/int8.py --skip-embedded --out runs/int8_deit      # deit_small only

``--smoke``: tiny sizes, seconds (benchmarks/smoke.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import smoke as smoke_sizes  # benchmarks/smoke.py (a script's own folder is on sys.path)


def _time(paths: dict, batch: int, threads: int, smoke: bool = False) -> dict:
    from vitrim.export.backends.ort_cpu import OrtCpuRunner
    from vitrim.export.runners import interleaved, time_interleaved

    runners = [OrtCpuRunner(p, threads, "all") for p in paths.values()]
    with interleaved(runners):
        ts = time_interleaved(runners, batch, **smoke_sizes.timing(smoke, 60, 12, 5))
    return {k: t.median_ms for k, t in zip(paths, ts)}


def _top1(path, ds, batch: int = 256) -> float:
    from vitrim.export.backends.ort_cpu import OrtCpuRunner
    from vitrim.pipeline.core.data import make_loader

    ok = n = 0
    with OrtCpuRunner(path, 2, "all") as r:
        for x, y in make_loader(ds, batch):
            ok += int((r.infer(x.numpy()).argmax(1) == y.numpy()).sum())
            n += len(y)
    return 100.0 * ok / n


def embedded(cfg_path: str, out: Path, sets: list[str], smoke: bool = False) -> list[dict]:
    from vitrim.export.onnx import export_onnx
    from vitrim.export.quantize import collect_calibration, quantize_ort
    from vitrim.pipeline.core.config import load_config
    from vitrim.pipeline.core.data import build_splits, make_loader
    from vitrim.pipeline.core.evaluate import top1
    from vitrim.pipeline.core.slicing import load_compact
    from vitrim.pipeline.stages.run import run_pipeline
    from vitrim.pipeline.stages.teacher import load_teacher

    rows, paths = [], {}
    base = load_config(cfg_path, sets)
    splits = build_splits(base.data, model_cfg=base.model)
    calib = collect_calibration(make_loader(splits.val, 32, shuffle=True, seed=0), base.target.quant.calib_images)
    teacher, _ = load_teacher(base, splits)
    models = {"teacher": (teacher, "-")}
    for lut_prec in ("fp32", "int8"):
        cfg = copy.deepcopy(base)
        cfg.target.precision = lut_prec
        cfg.out_dir = str(out / f"student_{lut_prec}_lut")
        s = run_pipeline(cfg, progress=False)
        models[f"student ({lut_prec} LUT)"] = (load_compact(cfg.out_dir), f"{s['student']['predicted_ms']:.3f} ms "
                                                f"pred. ({lut_prec} LUT)")
    for name, (model, note) in models.items():
        fp32 = export_onnx(model.eval().cpu(), out / f"{name.replace(' ', '_')}.onnx", (1, 28, 28))
        int8 = out / f"{name.replace(' ', '_')}.int8.onnx"
        quantize_ort(fp32, int8, base.target.quant, calib)
        paths[f"{name} fp32"], paths[f"{name} int8"] = fp32, int8
        torch_acc = top1(model, splits.test, 512)
        rows += [{"model": name, "engine": "fp32", "note": note, "torch_top1": torch_acc, "path": fp32},
                 {"model": name, "engine": "int8 (static QDQ)", "note": note, "torch_top1": torch_acc, "path": int8}]
    ms = _time(paths, base.target.batch, base.target.threads, smoke)
    t_ms = ms["teacher fp32"]
    for r, v in zip(rows, ms.values()):
        r.update(ms=v, speedup=t_ms / v, engine_top1=_top1(r.pop("path"), splits.test))
    return rows


def magnitude_plan(teacher, lut, fraction: float):
    """A plan at ``fraction`` of the teacher's predicted latency, searched on ``lut`` with the ``magnitude``
    strategy's selection (random weights leave no data to score on): knapsack on L1 magnitude per ms saved,
    then refill; no block skipping (magnitude has no block score on the groups' scale)."""
    from vitrim.pipeline.core.config import SearchConfig
    from vitrim.pipeline.core.slicing import full_size_compact
    from vitrim.pipeline.search import LatencyCost, prune_to, refill, relative_magnitude

    compact, full = full_size_compact(teacher)
    cost = LatencyCost(lut)
    budget = fraction * cost.predict(full)
    plan, removed = prune_to(full, relative_magnitude(compact), cost, budget, SearchConfig(prune_blocks=False),
                             lut.grid.embed[0])
    return refill(plan, removed, cost, budget)[0]


def deit_small(out: Path, grid: str = "embed=2,heads=3,qk=2,v=2,mlp=3", mode: str = "dynamic",
               smoke: bool = False) -> tuple:
    """deit_small: LUTs in fp32 and int8 (``mode``), a 50% plan searched against each, all timed together."""
    import timm

    from vitrim.export.onnx import export_onnx
    from vitrim.export.quantize import quantize_ort, random_calibration, transformer_fusions
    from vitrim.export.target import Target
    from vitrim.pipeline.core.config import ProfileConfig, QuantConfig
    from vitrim.pipeline.core.models import describe
    from vitrim.pipeline.core.plan import Floors, Plan
    from vitrim.pipeline.core.slicing import slice_model
    from vitrim.profiling.table import LatencyTable
    from vitrim.profiling.build import build_lut

    torch.manual_seed(0)
    # --smoke: a 32 px, dim-32 ViT of the same family, few timings (the script's code path, not its figures)
    kwargs = dict(smoke_sizes.DEIT_KW) if smoke else {}
    res = kwargs.get("img_size", 224)
    teacher = timm.create_model("deit_small_patch16_224", **kwargs).eval()
    spec = describe(teacher, "deit_small_patch16_224", kwargs)
    kw = {f"{k}_points" if k != "heads" else "head_points": int(v) for k, v in (p.split("=") for p in grid.split(","))}
    pcfg = ProfileConfig(**kw, warmup=2, repeats=12, rounds=4, checks=3, calibration_plans=6)
    if smoke:
        pcfg = ProfileConfig(embed_points=1, head_points=1, qk_points=1, v_points=1, mlp_points=2, warmup=1, repeats=2,
                             rounds=2, checks=1, calibration_plans=1, min_visit_ms=0, remeasure_spread_pct=0)
    q = QuantConfig(mode=mode)
    plans, luts = {"teacher": Plan.full(spec)}, {}
    for prec in ("fp32", "int8"):
        target = Target(batch=2 if smoke else 8, threads=2, precision=prec, quant=q)
        path = out / f"lut-deit_small-{prec}.json"
        t0 = time.time()
        if path.is_file():
            lut = LatencyTable.load(path, expect=target.signature(Plan.full(spec).num_tokens))
        else:
            lut = build_lut(spec, target, pcfg, Floors(), 8, path, progress=False)
        luts[prec] = {"build_s": lut.meta.get("build_s", round(time.time() - t0, 1)), "teacher_pred_ms": lut.predict(
            Plan.full(spec))}
        plans[f"student ({prec} LUT)"] = plan = magnitude_plan(teacher, lut, 0.5)
        luts[prec]["plan"] = plan.summary()
        print(f"[int8] deit_small {prec} LUT ({luts[prec]['build_s']} s): 50% plan {plan.summary()}", flush=True)
    paths, fusions = {}, {}
    calib = random_calibration((3, res, res), 16)  # latency only: the scales do not change the timing
    for name, plan in plans.items():
        tag = name.split(" ")[0] + ("" if name == "teacher" else "_" + name.split("(")[1][:4])
        p = export_onnx(slice_model(teacher, plan), out / f"deit_{tag}.onnx", (3, res, res))
        if name == "teacher":
            fusions[name] = transformer_fusions(p, spec["num_heads"], spec["embed_dim"])
        paths[f"{name} fp32"] = p
        qp = out / f"deit_{tag}.{mode}.onnx"
        quantize_ort(p, qp, q, calib)
        paths[f"{name} int8 {mode}"] = qp
    ms = _time(paths, 2 if smoke else 8, 2, smoke)
    t = ms["teacher fp32"]
    rows = [{"model": k.rsplit(" ", 1)[0] if k.endswith("fp32") else k.split(" int8")[0],
             "engine": "fp32" if k.endswith("fp32") else "int8 " + k.rsplit(" ", 1)[1], "ms": v, "speedup": t / v}
            for k, v in ms.items()]
    return rows, fusions, luts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/fmnist_cpu.yaml")
    ap.add_argument("--out", default="runs/int8")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--skip-deit", action="store_true")
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--deit-mode", default="dynamic", help="int8 mode of the deit_small part (dynamic or static)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks the script runs (make test), "
                    "its figures mean nothing; pass tiny --set overrides for the embedded part")
    args = ap.parse_args(argv)
    if args.smoke:
        args.set += smoke_sizes.SETS
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from vitrim.export.target import cpu_name
    from vitrim.pipeline.core.io import atomic_write_json, atomic_write_text

    t0 = time.time()
    lines = [f"# INT8 on ORT-CPU ({cpu_name()}, onnxruntime, 2 threads)", ""]
    res = {}
    if not args.skip_deit:
        rows, fusions, luts = deit_small(out, mode=args.deit_mode, smoke=args.smoke)
        res["deit_small"], res["fusions"], res["deit_luts"] = rows, fusions, luts
        lines += ["## deit_small, 224 px, random weights, batch 8 (latency only, one interleaved session)", "",
                  "| model | engine | ms | speedup vs fp32 teacher |", "|---|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['engine']} | {r['ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
        lines += ["", f"LUTs (build s, teacher predicted ms, 50% plan): {json.dumps(luts)}", "",
                  f"ORT transformer-optimizer fusions that apply: {json.dumps(fusions)}", ""]
        atomic_write_text(out / "int8.md", "\n".join(lines) + "\n")  # partial results survive a later failure
        print("\n".join(lines), flush=True)
    rows = [] if args.skip_embedded else embedded(args.config, out, args.set, args.smoke)
    res["embedded"] = rows
    lines += [] if args.skip_embedded else ["## Embedded default (Fashion-MNIST), batch 64 (one interleaved session)", "",
              "| model | engine | ms | speedup | test top-1 engine (%) | torch fp32 top-1 (%) | note |",
              "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['engine']} | {r['ms']:.2f} | {r['speedup']:.2f}x | {r['engine_top1']:.2f} | "
              f"{r['torch_top1']:.2f} | {r['note']} |" for r in rows]
    lines += ["", f"wall: {time.time() - t0:.0f} s"]
    atomic_write_json(out / "int8.json", res)
    atomic_write_text(out / "int8.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
