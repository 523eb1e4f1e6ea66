"""Calibrate the parity gate's thresholds: correct engines' worst figures against planted faults' best.

For each model and precision, a correct engine (ONNX Runtime on the fp32, fp16 or int8 ONNX,
static and dynamic int8) is gated against the torch model, and so is each planted fault of
:mod:`vitrim.export.planted` on top of the correct engine. The table lists, per statistic, the
default threshold, the worst value any correct engine reached and the best (least detectable)
value among the planted engines that the statistic catches; a threshold sits between them with
margin. Models: the embedded default's teacher (``configs/fmnist_cpu.yaml``, trained and cached
by ``vitrim train-teacher``) on the Fashion-MNIST test images, and a DeiT-shaped model (DeiT-Tiny
layout at 224 px, timm's random init) on Fashion-MNIST images resized to 224 px, 3 channels.

    .venv/bin/python benchmarks/parity_calibration.py --out runs/parity_calibration   # 2000 + 128 images a gate
    .venv/bin/python benchmarks/parity_calibration.py --smoke --out /tmp/pc   # seconds: tiny model, few images
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

STATS = [  # (report figure, tolerance key, direction)
    ("max_rel_l2", "max_rel_l2", "<="), ("mean_rel_l2", "max_mean_rel_l2", "<="),
    ("q_prob_js", "max_prob_js", "<="), ("mean_prob_js", "max_mean_prob_js", "<="),
    ("class_shift", "max_class_shift", "<="), ("top1_agreement", "min_top1_agreement", ">="),
]


def figures(rep) -> dict:
    o = next(iter(rep.outputs.values()))
    big = lambda v: float("inf") if v is None else v  # noqa: E731 - a non-finite figure is as bad as it gets
    return {"max_rel_l2": big(o["max_rel_l2"]), "mean_rel_l2": big(o["mean_rel_l2"]), "q_prob_js": big(o["q_prob_js"]),
            "mean_prob_js": big(o["mean_prob_js"]), "class_shift": rep.class_shift["max_abs_shift"],
            "top1_agreement": rep.top1_agreement, "loss_pt": rep.accuracy["loss_pt"],
            "ci_pt": rep.accuracy["ci_pt"], "outcome": rep.outcome, "failures": rep.failures}


def engines_for(model, shape, calib, workdir: Path, smoke: bool) -> dict:
    """Correct engines per precision, as (precision, runner factory, what it is): ONNX Runtime on the fp32 and
    fp16 ONNX and on static and dynamic int8 QDQ; OpenVINO fp32 (precision pinned), bf16 (where the CPU has bf16
    units) and NNCF int8. One more OpenVINO engine is not correct by design: compiled without the precision hint,
    it computes in bf16 on such CPUs while claiming fp32 (a planted engine, judged as fp32)."""
    from vitrim.export.backends.openvino import OpenVinoRunner
    from vitrim.export.onnx import export_onnx, to_fp16
    from vitrim.export.quantize import quantize_for_target
    from vitrim.export.target import Target
    from vitrim.pipeline.core.config import QuantConfig

    fp32 = export_onnx(model, workdir / "m.onnx", shape)
    ort = Target(backend="ort-cpu", threads=2)
    out = {"fp32": ("fp32", lambda: ort.impl.onnx_runner(fp32, ort), "correct"),
           "fp16": ("fp16", lambda p=to_fp16(fp32, workdir / "m.fp16.onnx"): ort.impl.onnx_runner(p, ort), "correct")}
    for mode in ("static", "dynamic"):
        dst = workdir / f"m.int8.{mode}.onnx"
        quantize_for_target(fp32, dst, Target(precision="int8", threads=2, quant=QuantConfig(mode=mode)),
                            calib if mode == "static" else None)
        out[f"int8-{mode}"] = ("int8", lambda p=dst: ort.impl.onnx_runner(p, ort), "correct")
    ov = Target(backend="openvino", threads=2)
    if ov.impl.availability() is None:
        for prec in ov.impl.supported_precisions():
            t = Target(backend="openvino", precision=prec, threads=2)
            if prec == "int8":
                dst = workdir / "m.ov.int8.xml"
                ov.impl.quantize(fp32, dst, t, calib)
                out["ov-int8"] = ("int8", lambda p=dst, t=t: t.impl.engine_runner(p, t), "correct")
            else:
                out[f"ov-{prec}"] = (prec, lambda t=t: t.impl.onnx_runner(fp32, t), "correct")
        if "bf16" in ov.impl.supported_precisions():
            out["ov-unpinned"] = ("fp32", lambda: OpenVinoRunner(fp32, 2, None), "precision hint left at default")
    return out


def gate_all(name, model, shape, loader_fn, calib, workdir: Path, smoke: bool, log) -> list[dict]:
    from vitrim.export.parity import Tolerances, check_parity
    from vitrim.export.planted import FAULTS, Planted
    from vitrim.export.runners import TorchRunner
    from vitrim.pipeline.core.config import ExportConfig

    rows = []
    workdir.mkdir(parents=True, exist_ok=True)
    engines = engines_for(model, shape, calib, workdir, smoke)
    for eng_name, (precision, make_runner, kind) in engines.items():
        if smoke and eng_name not in ("fp32", "int8-static", "ov-int8", "ov-unpinned"):
            continue
        tol = Tolerances.for_precision(ExportConfig(), precision)
        planted = (("scale_1.2", "zero_1_in_64") if smoke else FAULTS) if kind == "correct" else ()
        for fault in (None, *planted):
            t0 = time.time()
            with TorchRunner(model, shape, threads=2) as ref, make_runner() as eng:
                run = Planted(eng, fault) if fault else eng
                rep = check_parity(ref, run, loader_fn(), tol, precision)
            row = {"model": name, "engine": eng_name, "precision": precision,
                   "fault": fault or (kind if kind != "correct" else "correct"), "images": rep.images, **figures(rep)}
            rows.append(row)
            log(f"{name:8s} {eng_name:13s} {row['fault']:14s} {rep.outcome:12s} rel_l2 max {row['max_rel_l2']:.3g} "
                f"mean {row['mean_rel_l2']:.3g}  js q {row['q_prob_js']:.3g} mean {row['mean_prob_js']:.3g}  "
                f"shift {row['class_shift']:.4f} agree {row['top1_agreement']:.4f} loss {row['loss_pt']:+.2f} "
                f"({time.time() - t0:.1f}s)")
    return rows


def table(rows: list[dict]) -> str:
    from vitrim.pipeline.core.config import ExportConfig

    e = ExportConfig()
    lines = ["| precision | statistic | threshold | correct engines' worst | planted engines' best (caught by it) |",
             "|---|---|---:|---:|---:|"]
    for prec in ("fp32", "fp16", "bf16", "int8"):
        tol = e.tolerance(prec)
        mine = [r for r in rows if r["precision"] == prec]
        for fig, key, op in STATS:
            thr = getattr(tol, key)
            good = [r[fig] for r in mine if r["fault"] == "correct"]
            worst = (max(good) if op == "<=" else min(good)) if good else float("nan")
            caught = [r[fig] for r in mine if r["fault"] != "correct" and (r[fig] > thr if op == "<=" else r[fig] < thr)]
            best = (min(caught) if op == "<=" else max(caught)) if caught else float("nan")
            lines.append(f"| {prec} | {fig} | {op} {thr:g} | {worst:.3g} | {best:.3g} |")
    unpinned = [r for r in rows if r["fault"] == "precision hint left at default"]
    for r in unpinned:
        lines.append(f"\n{r['model']}: OpenVINO with its default precision, judged as fp32: {r['outcome'].upper()} "
                     f"(max rel L2 {r['max_rel_l2']:.3g}, agreement {r['top1_agreement']:.4f}; "
                     f"failed: {', '.join(r['failures']) or 'nothing'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/fmnist_cpu.yaml")
    ap.add_argument("--out", default="runs/parity_calibration")
    ap.add_argument("--images", type=int, default=2000, help="test images of the embedded default per gate")
    ap.add_argument("--deit-images", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model on 128 images (seconds)")
    args = ap.parse_args(argv)
    import timm

    from vitrim.export.quantize import collect_calibration
    from vitrim.pipeline.core.config import load_config
    from vitrim.pipeline.core.data import build_splits, make_loader

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = print
    rows = []
    if args.smoke:
        cfg = load_config(args.config, ["data.test_limit=128", "data.train_limit=256", "data.val_size=64"])
        kw = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
        model = timm.create_model("vit_tiny_patch16_224", **kw).eval()
        splits = build_splits(cfg.data)
        calib = collect_calibration(make_loader(splits.train, 32), 32)
        rows += gate_all("smoke", model, (1, 28, 28), lambda: make_loader(splits.test, 64), calib, out / "smoke",
                         True, log)
    else:
        from vitrim.pipeline.stages.teacher import load_teacher

        cfg = load_config(args.config, [f"data.test_limit={args.images}"])
        splits = build_splits(cfg.data)
        teacher, _ = load_teacher(cfg, splits, train_if_missing=False, log=log)
        calib = collect_calibration(make_loader(splits.train, 32, shuffle=True, seed=0), cfg.target.quant.calib_images)
        shape = tuple(next(iter(make_loader(splits.test, 1)))[0].shape[1:])
        rows += gate_all("demo", teacher, shape, lambda: make_loader(splits.test, 64), calib, out / "demo", False, log)
        deit = timm.create_model("deit_tiny_patch16_224", num_classes=10).eval()
        n = args.deit_images

        def deit_batches(split=splits.test, limit=n):
            k = 0
            for x, y in make_loader(split, 32):
                x = torch.nn.functional.interpolate(x, size=224, mode="bilinear").repeat(1, 3, 1, 1)
                yield x[: limit - k], y[: limit - k]
                k += len(x)
                if k >= limit:
                    return

        dcalib = np.concatenate([x.numpy() for x, _ in deit_batches(splits.train, 64)])
        rows += gate_all("deit", deit, (3, 224, 224), deit_batches, dcalib, out / "deit", False, log)
    (out / "calibration.json").write_text(json.dumps(rows, indent=1, default=float))
    md = table(rows)
    (out / "calibration.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
