"""Does INT8 pay on ORT-CPU, and does searching against an int8 LUT change the plan?

Part 1, the embedded default (latency and test top-1): the teacher in fp32 and
int8, and a student searched and fine-tuned against the fp32 LUT and one
against the int8 LUT (``vitrim run`` with ``target.precision`` fp32 / int8),
each engine released in fp32 and int8. Part 2, deit_small at 224 px (random
weights, batch 8, latency only): the teacher and a half-width slice (half the
heads and MLP in every block; not searched: no data for random weights) in
fp32, static int8 and dynamic int8. Also: which of ORT's transformer-optimizer
fusions apply to the exported graphs.

Every block of engines is timed round-robin in one session (machine drift
hits all alike).

    .venv/bin/python benchmarks/int8.py configs/fmnist_cpu.yaml --out runs/int8
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


def _time(paths: dict, batch: int, threads: int) -> dict:
    from vitrim.export.runners import OrtCpuRunner, time_interleaved

    runners = [OrtCpuRunner(p, threads, "all") for p in paths.values()]
    for r in runners:
        r.activate()
    try:
        ts = time_interleaved(runners, batch, repeats=60, rounds=12, warmup=5)
    finally:
        for r in runners:
            r.deactivate()
    return {k: t.median_ms for k, t in zip(paths, ts)}


def _top1(path, ds, batch: int = 256) -> float:
    from vitrim.export.runners import OrtCpuRunner
    from vitrim.pipeline.core.data import make_loader

    ok = n = 0
    with OrtCpuRunner(path, 2, "all") as r:
        for x, y in make_loader(ds, batch):
            ok += int((r.infer(x.numpy()).argmax(1) == y.numpy()).sum())
            n += len(y)
    return 100.0 * ok / n


def embedded(cfg_path: str, out: Path, sets: list[str]) -> list[dict]:
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
    ms = _time(paths, base.target.batch, base.target.threads)
    t_ms = ms["teacher fp32"]
    for r, v in zip(rows, ms.values()):
        r.update(ms=v, speedup=t_ms / v, engine_top1=_top1(r.pop("path"), splits.test))
    return rows


def deit_small(out: Path) -> list[dict]:
    import timm

    from vitrim.export.onnx import export_onnx
    from vitrim.export.quantize import quantize_ort, random_calibration, transformer_fusions
    from vitrim.pipeline.core.config import QuantConfig
    from vitrim.pipeline.core.models import describe
    from vitrim.pipeline.core.plan import Plan
    from vitrim.pipeline.core.slicing import slice_model

    torch.manual_seed(0)
    teacher = timm.create_model("deit_small_patch16_224").eval()
    spec = describe(teacher, "deit_small_patch16_224")
    half = Plan.full(spec)
    for b in half.blocks:
        b.heads, b.mlp = b.heads[: spec["num_heads"] // 2], b.mlp[: spec["mlp_hidden"] // 2]
    paths, fusions = {}, {}
    calib = random_calibration((3, 224, 224), 16)  # latency only: the scales do not change the timing
    for name, plan in (("teacher", Plan.full(spec)), ("half-width slice", half)):
        p = export_onnx(slice_model(teacher, plan), out / f"deit_{name[:4]}.onnx", (3, 224, 224))
        fusions[name] = transformer_fusions(p, spec["num_heads"], spec["embed_dim"])
        paths[f"{name} fp32"] = p
        for mode in ("static", "dynamic"):
            q = out / f"deit_{name[:4]}.{mode}.onnx"
            quantize_ort(p, q, QuantConfig(mode=mode), calib)
            paths[f"{name} int8 {mode}"] = q
    ms = _time(paths, 8, 2)
    t = ms["teacher fp32"]
    rows = [{"model": k.rsplit(" ", 1)[0] if "fp32" in k else k.split(" int8")[0],
             "engine": "fp32" if k.endswith("fp32") else "int8 " + k.rsplit(" ", 1)[1], "ms": v, "speedup": t / v}
            for k, v in ms.items()]
    return rows, fusions


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/fmnist_cpu.yaml")
    ap.add_argument("--out", default="runs/int8")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--skip-deit", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from vitrim.export.target import cpu_name
    from vitrim.pipeline.core.io import atomic_write_json, atomic_write_text

    t0 = time.time()
    lines = [f"# INT8 on ORT-CPU ({cpu_name()}, onnxruntime, 2 threads)", ""]
    res = {}
    if not args.skip_deit:
        rows, fusions = deit_small(out)
        res["deit_small"], res["fusions"] = rows, fusions
        lines += ["## deit_small, 224 px, random weights, batch 8 (latency only, one interleaved session)", "",
                  "| model | engine | ms | speedup vs fp32 teacher |", "|---|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['engine']} | {r['ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
        lines += ["", f"ORT transformer-optimizer fusions that apply: {json.dumps(fusions)}", ""]
        atomic_write_text(out / "int8.md", "\n".join(lines) + "\n")  # partial results survive a later failure
        print("\n".join(lines), flush=True)
    rows = embedded(args.config, out, args.set)
    res["embedded"] = rows
    lines += ["## Embedded default (Fashion-MNIST), batch 64 (one interleaved session)", "",
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
