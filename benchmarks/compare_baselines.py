"""Compare vitrim's search with baselines on the embedded default, at matched latency.

Methods (all fine-tuned with the same KD recipe and epochs from the config):

* vitrim strategies through the real pipeline (``vitrim run``): ``knapsack``
  (default), ``nvit``, ``magnitude`` (L1 with the same loop), ``uniform``
  (one width fraction for every block);
* ``torch-pruning``: Torch-Pruning's MetaPruner with Taylor importance, a
  uniform ratio and ``round_to=8`` on the timm teacher, the ratio bisected so
  its *measured* latency matches vitrim's student.

At the end every model's ONNX is re-timed in one interleaved session (teacher
included), so speedups are ratios measured in the same run.

    python benchmarks/compare_baselines.py configs/fmnist_cpu.yaml \
        --strategies knapsack,nvit,magnitude,uniform --torch-pruning --out runs/bench
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch


from vitrim.export.onnx import export_onnx
from vitrim.export.runners import OrtCpuRunner
from vitrim.pipeline.core.config import load_config
from vitrim.pipeline.core.data import build_splits
from vitrim.pipeline.core.evaluate import top1
from vitrim.pipeline.core.io import atomic_write_json, atomic_write_text
from vitrim.pipeline.stages.run import run_pipeline


def speedup_vs(teacher_onnx: Path, onnx_path: Path, batch: int, threads: int) -> float:
    """Measured speedup of a model over the teacher, both timed round-robin in one session."""
    from vitrim.export.runners import time_interleaved

    runners = [OrtCpuRunner(teacher_onnx, threads), OrtCpuRunner(onnx_path, threads)]
    for r in runners:
        r.activate()
    t, m = time_interleaved(runners, batch, repeats=40, rounds=8, warmup=5)
    for r in runners:
        r.deactivate()
    return t.median_ms / m.median_ms


def torch_pruning_baseline(cfg, teacher, splits, teacher_onnx: Path, target_speedup: float, out: Path, log=print) -> dict:
    """Taylor importance, uniform ratio, round_to=8; the ratio is bisected until its measured
    speedup over the teacher (timed in the same session) matches vitrim's."""
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    from vitrim.pipeline.stages.distill import make_kd_fn
    from vitrim.pipeline.core.trainer import TrainSpec, train

    shape = (1, 28, 28) if cfg.data.name == "fmnist" else None
    x_cal = torch.stack([splits.train[i][0] for i in range(256)]) if not hasattr(splits.train, "images") else \
        splits.train[list(range(256))][0]
    y_cal = splits.train[list(range(256))][1]

    def prune(ratio: float):
        m = copy.deepcopy(teacher).train()
        heads = {a.qkv: a.num_heads for a in m.modules() if isinstance(a, Attention)}
        pr = tp.pruner.MetaPruner(m, x_cal[:2], importance=tp.importance.GroupTaylorImportance(), pruning_ratio=ratio,
                                  ignored_layers=[m.head], num_heads=heads, prune_head_dims=True,
                                  prune_num_heads=False, round_to=8, global_pruning=False)
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x_cal), y_cal).backward()
        pr.step()
        for a in m.modules():
            if isinstance(a, Attention):
                a.num_heads = pr.num_heads[a.qkv]
                a.head_dim = a.qkv.out_features // (3 * a.num_heads)
                a.attn_dim = a.num_heads * a.head_dim
        m.zero_grad(set_to_none=True)
        return m.eval()

    lo, hi, best = 0.0, 0.95, None
    for _ in range(7):
        mid = (lo + hi) / 2
        m = prune(mid)
        path = export_onnx(m, out / "tp_probe.onnx", shape)
        sp = speedup_vs(teacher_onnx, path, cfg.target.batch, cfg.target.threads)
        log(f"[torch-pruning] ratio {mid:.3f}: measured speedup {sp:.2f}x (target {target_speedup:.2f}x)")
        if best is None or abs(sp - target_speedup) < abs(best[1] - target_speedup):
            best = (mid, sp)
        if sp < target_speedup:
            lo = mid
        else:
            hi = mid
    ratio = best[0]
    student = prune(ratio)
    kd = make_kd_fn(teacher, cfg.finetune.alpha, cfg.finetune.temperature, cfg.finetune.label_smoothing)
    f = cfg.finetune
    spec = TrainSpec(epochs=f.epochs, batch_size=cfg.data.batch_size, lr=f.lr, min_lr=f.min_lr,
                     weight_decay=f.weight_decay, warmup_epochs=f.warmup_epochs, clip_grad=f.clip_grad, seed=f.seed)
    t0 = time.time()
    train(student, kd, splits.train, spec, out / "tp_ft", val_fn=lambda m: top1(m, splits.val, 512), desc="tp-finetune",
          log=log)
    student.eval()
    onnx_path = export_onnx(student, out / "torch_pruning.onnx", shape)
    return {"method": "torch-pruning (Taylor, uniform ratio)", "ratio": ratio, "onnx": str(onnx_path),
            "top1": top1(student, splits.test, 512), "params": sum(p.numel() for p in student.parameters()),
            "finetune_s": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--strategies", default="knapsack,uniform")
    ap.add_argument("--torch-pruning", action="store_true")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds for the final table")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cfg = load_config(args.config, args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, summaries = [], {}
    for strat in [s for s in args.strategies.split(",") if s]:
        c = copy.deepcopy(cfg)
        c.search.strategy = strat
        c.out_dir = str(out / strat)
        c.name = f"bench/{strat}"
        s = run_pipeline(c)
        summaries[strat] = s
        atomic_write_json(out / "partial.json", {k: {"speedup": v["speedup"], "top1": v["student"]["top1"]}
                                                 for k, v in summaries.items()})
        results.append({"method": f"vitrim {strat}", "onnx": str(Path(c.out_dir) / "model.onnx"),
                        "top1": s["student"]["top1"], "params": s["student"]["params"],
                        "predicted_ms": s["student"]["predicted_ms"],
                        "search_s": s["timings"]["search_s"], "finetune_s": s["timings"]["finetune_s"]})
    first = next(iter(summaries.values()))
    teacher_onnx = Path(cfg.out_dir if not summaries else out / next(iter(summaries))) / "teacher" / "model.onnx"
    if args.torch_pruning:
        from vitrim.pipeline.stages.teacher import load_teacher

        splits = build_splits(cfg.data)
        teacher, _ = load_teacher(cfg, splits)
        try:
            results.append(torch_pruning_baseline(cfg, teacher, splits, teacher_onnx, first["speedup"], out))
        except Exception as e:  # report, don't lose the other rows
            print(f"[torch-pruning] failed: {type(e).__name__}: {e}")
    # final timing: every model in one interleaved session
    models = [("teacher", teacher_onnx)] + [(r["method"], Path(r["onnx"])) for r in results]
    samples = {name: [] for name, _ in models}
    runners = {name: OrtCpuRunner(p, cfg.target.threads) for name, p in models}
    for r in runners.values():
        r.activate()
    for rnd in range(args.rounds):
        for name, r in runners.items():
            samples[name] += r.time_samples(cfg.target.batch, 20, warmup=10 if rnd == 0 else 2)
    for r in runners.values():
        r.deactivate()
    med = {k: float(np.median(v)) for k, v in samples.items()}
    t_top1 = first["teacher"]["top1"]
    rows = [{"method": "teacher", "measured_ms": med["teacher"], "speedup": 1.0, "top1": t_top1, "delta": 0.0,
             "params": first["teacher"]["params"]}]
    for r in results:
        rows.append({**r, "measured_ms": med[r["method"]], "speedup": med["teacher"] / med[r["method"]],
                     "delta": r["top1"] - t_top1})
    sig = first["signature"]
    lines = [f"Target: `{sig['backend']}` on {sig['device']} ({sig['engine_version']}), batch {sig['batch']}, "
             f"{sig['threads']} threads. Budget: {first['budget']}. Fine-tune: {cfg.finetune.epochs} epochs KD for "
             f"every method. Latency: median of {args.rounds} interleaved rounds x 20 runs, all models in one session.",
             "", "| method | params (M) | measured ms | speedup | test top-1 (%) | Δ vs teacher (pt) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['params'] / 1e6:.3f} | {r['measured_ms']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['top1']:.2f} | {r['delta']:+.2f} |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", table)
    atomic_write_json(out / "results.json", rows)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
