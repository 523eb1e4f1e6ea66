"""Token merging (issue 15): does searching merges pay on the target, and does the LUT predict it?

Part 1, the embedded default (ORT-CPU, latency and test top-1): ``vitrim run`` with
``search.prune_tokens: true`` at each ``--fractions`` budget (the LUT then has a
token axis), against the same search without merges. The no-merge students are
the matched ``knapsack`` rows of a ``compare_baselines.py`` run (``--baseline-dir``,
same config, same KD fine-tune) when given, else searched here. Every ONNX and the
teacher are re-timed in ONE interleaved session at the end.

Part 2, deit_small at 224 px (random weights, ORT-CPU batch 8, latency only): a
LUT with a token axis on a width-free grid, and the measured latency of the
teacher with merges before blocks 4 and 8 against the LUT's prediction.

    python benchmarks/tokens.py configs/fmnist_cpu.yaml --out runs/tokens --baseline-dir runs/bench17

Writes ``OUT/tokens.md`` and ``OUT/tokens.json``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import smoke as smoke_sizes  # benchmarks/smoke.py (a script's own folder is on sys.path)
from vitrim.pipeline.core.config import pct


def embedded(cfg_path: str, out: Path, fractions: list[float], baseline_dir: Path | None, sets: list[str],
             smoke: bool = False) -> dict:
    from vitrim.export.onnx import export_onnx
    from vitrim.export.backends.ort_cpu import OrtCpuRunner
    from vitrim.export.runners import interleaved, time_interleaved
    from vitrim.pipeline.core.config import load_config
    from vitrim.pipeline.core.data import build_splits
    from vitrim.pipeline.core.evaluate import top1
    from vitrim.pipeline.core.plan import Plan
    from vitrim.pipeline.core.rundir import RunDir
    from vitrim.pipeline.stages.run import run_pipeline
    from vitrim.pipeline.stages.teacher import load_teacher

    base = load_config(cfg_path, sets)
    splits = build_splits(base.data, model_cfg=base.model)
    teacher, tinfo = load_teacher(base, splits)
    t_top1 = top1(teacher, splits.test, base.data.eval_batch_size)
    rows, onnx = [], {"teacher": export_onnx(teacher, out / "teacher.onnx", (1, 28, 28))}
    prior = {}
    if baseline_dir is not None:
        for r in json.loads((baseline_dir / "results.json").read_text())["rows"]:
            if r["method"] == base.search.strategy and r.get("onnx"):
                prior[round(r["fraction"], 3)] = r
    for f in fractions:
        for tokens in (False, True):
            name = f"{'merges' if tokens else 'no merges'}@{f:g}"
            if not tokens and round(f, 3) in prior:
                r = prior[round(f, 3)]
                onnx[name] = Path(r["onnx"])
                rows.append({"name": name, "fraction": f, "tokens": False, "top1": r["top1"], "params": r["params"],
                             "source": f"{baseline_dir}/results.json (matched to {pct(f)} measured)", "plan": None})
                continue
            cfg = copy.deepcopy(base)
            cfg.search.budget_fraction, cfg.search.prune_tokens = f, tokens
            cfg.out_dir = str(out / name.replace(" ", "_").replace("@", "_"))
            t0 = time.time()
            s = run_pipeline(cfg, progress=False)
            onnx[name] = RunDir(cfg.out_dir).onnx
            plan = Plan.load(RunDir(cfg.out_dir).plan)
            rows.append({"name": name, "fraction": f, "tokens": tokens, "top1": s["student"]["top1"],
                         "params": s["student"]["params"], "source": "vitrim run", "wall_s": round(time.time() - t0),
                         "plan": plan.summary(), "merges": {str(k): v for k, v in plan.merges.items()},
                         "block_tokens": plan.block_tokens(), "predicted_ms": s["student"]["predicted_ms"]})
            (out / "tokens.partial.json").write_text(json.dumps(rows, indent=1, default=str))
    runners = [OrtCpuRunner(p, base.target.threads, base.target.opt_level) for p in onnx.values()]
    with interleaved(runners):
        ts = time_interleaved(runners, base.target.batch, **smoke_sizes.timing(smoke, 60, 12, 10))
    ms = {k: t.median_ms for k, t in zip(onnx, ts)}
    for r in rows:
        r.update(measured_ms=ms[r["name"]], speedup=ms["teacher"] / ms[r["name"]], delta=r["top1"] - t_top1)
    return {"teacher_ms": ms["teacher"], "teacher_top1": t_top1, "rows": rows}


def deit_small(out: Path, smoke: bool = False) -> dict:
    import timm

    from vitrim.export.target import Target
    from vitrim.pipeline.core.config import ProfileConfig
    from vitrim.pipeline.core.models import canonical_state, describe
    from vitrim.pipeline.core.plan import Floors, Plan
    from vitrim.profiling.table import token_axis
    from vitrim.profiling.build import build_lut
    from vitrim.profiling.validate import measure_plans

    torch.manual_seed(0)
    kwargs = dict(smoke_sizes.DEIT_KW, depth=3) if smoke else {}  # merges before blocks 1 and 2 (4 and 8 at full size)
    teacher = timm.create_model("deit_small_patch16_224", **kwargs).eval()
    spec = describe(teacher, "deit_small_patch16_224", kwargs)
    target = Target(batch=2 if smoke else 8, threads=2)
    axis = token_axis(spec, 3, 2)
    pcfg = ProfileConfig(embed_points=1, head_points=1, qk_points=1, v_points=1, mlp_points=1, warmup=3, repeats=24,
                         rounds=6, checks=1, calibration_plans=1)
    if smoke:
        pcfg = dataclasses.replace(pcfg, warmup=1, repeats=2, rounds=2, min_visit_ms=0, remeasure_spread_pct=0)
    t0 = time.time()
    lut = build_lut(spec, target, pcfg, Floors(), 8, out / "lut-deit_small-tokens.json", progress=False, tokens=axis)
    build_s = time.time() - t0
    full = Plan.full(spec)
    plans = {"teacher": full}
    a, b = (1, 2) if smoke else (4, 8)
    for merges in ({a: "hw"}, {b: "hw"}, {a: "w", b: "h"}, {a: "hw", b: "hw"}):
        plans[", ".join(f"{k}@{i}" for i, k in merges.items())] = full.copy().set_merges(merges)
    rows = []
    state = canonical_state(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in list(plans.items())[1:]:  # each against the teacher, paired in one session
            t, s = measure_plans([full, plan], state, target, 1 if smoke else 3, 4 if smoke else 30, 2 if smoke else 6,
                                 Path(tmp), progress=False, paired=True)
            pred = lut.predict(plan) / lut.predict(full)
            rows.append({"merges": name, "tokens": plan.block_tokens(), "teacher_ms": t["median_ms"],
                         "measured_ms": s["median_ms"], "measured_ratio": s["ratio"], "predicted_ratio": pred,
                         "predicted_ms": lut.predict(plan), "ratio_err_pct": 100 * (pred / s["ratio"] - 1)})
            print(f"[tokens] deit_small {name}: measured {s['ratio']:.1%} of the teacher, LUT {pred:.1%}", flush=True)
    return {"axis": axis, "lut_build_s": round(build_s), "entries": lut.meta.get("entries"),
            "teacher_predicted_ms": lut.predict(full), "rows": rows, "lut": lut.summary()}


def table(emb: dict | None, deit: dict | None) -> str:
    lines = []
    if emb:
        lines += [f"Embedded default, ORT-CPU. Teacher {emb['teacher_ms']:.3f} ms, test top-1 {emb['teacher_top1']:.2f}%; "
                  "all models re-timed in one interleaved session.", "",
                  "| budget | search | merges (before block: type) | tokens per block | params (M) | measured ms | "
                  "speedup | test top-1 (%) | Δ vs teacher (pt) |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in emb["rows"]:
            merges = ", ".join(f"{i}: {k}" for i, k in (r.get("merges") or {}).items()) or "-"
            toks = "/".join(map(str, r["block_tokens"])) if r.get("block_tokens") else "-"
            lines.append(f"| {pct(r['fraction'])} | {'with' if r['tokens'] else 'without'} merges | {merges} | {toks} | "
                         f"{r['params'] / 1e6:.3f} | {r['measured_ms']:.3f} | {r['speedup']:.2f}x | {r['top1']:.2f} | "
                         f"{r['delta']:+.2f} |")
    if deit:
        lines += ["", f"deit_small 224 px, random weights, ORT-CPU batch 8; LUT token axis {deit['axis']} "
                  f"({deit['entries']} entries, {deit['lut_build_s']} s); each plan timed paired with the teacher.", "",
                  "| merges (type@block) | tokens per block | teacher ms | plan ms | measured ratio | LUT ratio | "
                  "ratio error |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in deit["rows"]:
            lines.append(f"| {r['merges']} | {'/'.join(map(str, r['tokens']))} | {r['teacher_ms']:.2f} | "
                         f"{r['measured_ms']:.2f} | {r['measured_ratio']:.1%} | {r['predicted_ratio']:.1%} | "
                         f"{r['ratio_err_pct']:+.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--out", default="runs/tokens")
    ap.add_argument("--fractions", default="0.5,0.35")
    ap.add_argument("--baseline-dir", default=None, help="a compare_baselines.py output with the no-merge students")
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--skip-deit", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (benchmarks/smoke.py); figures mean nothing")
    a = ap.parse_args(argv)
    if a.smoke:
        a.set += smoke_sizes.SETS
        a.fractions = a.fractions.split(",")[0]
    warnings.simplefilter("ignore")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    emb = None if a.skip_embedded else embedded(a.config, out, [float(f) for f in a.fractions.split(",")],
                                                Path(a.baseline_dir) if a.baseline_dir else None, a.set, a.smoke)
    deit = None if a.skip_deit else deit_small(out, a.smoke)
    md = table(emb, deit) + f"\nWall time {(time.time() - t0) / 60:.1f} min.\n"
    (out / "tokens.md").write_text(md)
    (out / "tokens.json").write_text(json.dumps({"embedded": emb, "deit_small": deit}, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
