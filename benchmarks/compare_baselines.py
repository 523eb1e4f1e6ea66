"""Compare vitrim's default search with baselines at equal *measured* latency.

For each latency target (default: 50% and 35% of the teacher's measured
ORT-CPU latency) every method is matched to the same measured latency:

1. The default strategy (``search.strategy``, knapsack: HALP-style importance
   per ms saved over NViT Hessian-aware saliency) has its budget bisected until
   its sliced model runs at ``fraction x teacher`` (measured).
2. Every baseline is then bisected to the default's measured latency, within
   ``--tol`` (3%):

   * ``nvit``: vitrim's NViT ``S - eta*dLat`` penalty (budget bisected);
   * ``slim``, ``uvc``: vitrim's learned-mask strategies (ViT-Slim's l1 masks, UVC's
     primal-dual budget with block skipping; budget bisected);
   * ``magnitude``: L1 weight magnitude in the same loop (budget bisected);
   * ``uniform``: one width fraction for every block (budget bisected);
   * ``compound``: one fraction for the depth (evenly spaced blocks), every width and the embedding: the
     block-skipping baseline of the deep end (budget bisected);
   * ``torch-pruning``: Torch-Pruning's MetaPruner, Taylor importance, one
     ratio for every layer, ``round_to=8`` (ratio bisected).

Latency does not depend on the weights, so the bisection works on the
architecture only (search -> slice -> ONNX -> time against the teacher,
round-robin, so drift hits both alike); only each matched model is
fine-tuned, with the same KD recipe (``finetune.*``) for every method. At the
end all matched models of all fractions and the teacher are re-timed in ONE
interleaved session; that session's medians are the table's latencies.

    python benchmarks/compare_baselines.py configs/fmnist_cpu.yaml --out runs/bench

Writes ``OUT/results.md`` (the table), ``OUT/results.json`` (with the command,
the machine and the date) and ``OUT/probes.json`` (every bisection probe).

Issue 25: ``--methods`` names the rows instead (the first is the reference the
others are matched to). Besides the strategies, four variants of the knapsack:

* ``widths``: knapsack widths, no token merges;
* ``merges``: widths and searched merges, priced after adaptation (``search.merge_scoring: adapted``);
* ``merges-unadapted``: the same, merges priced on the weights as they are;
* ``forced-merge``: one ``hw`` merge before the middle block (``search.merges``), then the width search.

The Torch-Pruning row is fine-tuned with logit KD only (``finetune.hidden_weight``
needs a sliced vitrim student).

    python benchmarks/compare_baselines.py configs/fmnist_tokens_cpu.yaml --out runs/bench49 \
        --fractions 0.35,0.2,0.1 --methods merges,widths,merges-unadapted,forced-merge,uniform,compound,magnitude,torch-pruning
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

import smoke as smoke_sizes  # benchmarks/smoke.py (a script's own folder is on sys.path)
from vitrim.export.onnx import export_onnx
from vitrim.export.backends.ort_cpu import OrtCpuRunner
from vitrim.export.runners import interleaved, time_interleaved
from vitrim.pipeline.core.config import load_config, pct
from vitrim.pipeline.core.data import build_splits
from vitrim.pipeline.core.errors import UnreachableBudget, UserError
from vitrim.pipeline.core.evaluate import top1
from vitrim.pipeline.core.io import atomic_write_json, atomic_write_text
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.slicing import full_size_compact, slice_model
from vitrim.pipeline.stages.profile import stage_profile
from vitrim.pipeline.search import run_search
from vitrim.pipeline.stages.teacher import load_teacher


class PairTimer:
    """Measured latency of a model relative to the teacher, both timed round-robin in one session."""

    def __init__(self, teacher_onnx: Path, batch: int, threads: int, opt_level: str, repeats: int = 60, rounds: int = 12):
        self.teacher_onnx, self.batch, self.threads, self.opt = teacher_onnx, batch, threads, opt_level
        self.repeats, self.rounds = repeats, rounds

    def ratio(self, onnx_path: Path) -> float:
        runners = [OrtCpuRunner(self.teacher_onnx, self.threads, self.opt), OrtCpuRunner(onnx_path, self.threads, self.opt)]
        with interleaved(runners):
            t, m = time_interleaved(runners, self.batch, self.repeats, self.rounds, warmup=5)
        return m.median_ms / t.median_ms


def match(make: Callable[[float], Optional[Path]], timer: PairTimer, target: float, lo: float, hi: float, p0: float,
          tol: float, max_probes: int, log: Callable[[str], None], name: str) -> tuple[Optional[float], list[dict]]:
    """Find the parameter p in [lo, hi] whose model runs at ``target`` x the teacher (measured).

    Latency must grow with p. Regula falsi on log-ratio inside a shrinking
    bracket, with a proportional first step; ``make(p)`` returns an ONNX path or
    None when p is infeasible (treated as too small). Returns the best p found.
    """
    probes: list[dict] = []
    below: Optional[tuple[float, float]] = None  # (p, ratio) with ratio < target
    above: Optional[tuple[float, float]] = None
    p = p0
    best = None
    for _ in range(max_probes):
        t0 = time.time()
        path = make(p)
        r = timer.ratio(path) if path is not None else None
        probes.append({"method": name, "p": p, "ratio": r, "target": target, "s": round(time.time() - t0, 1)})
        log(f"[bench] {name}: p={p:.4f} -> " + (f"measured {r:.3f} x teacher (target {target:.3f})" if r else "infeasible"))
        if r is None:
            lo = p
            p = (p + hi) / 2
            continue
        err = abs(r / target - 1)
        if best is None or err < best[1]:
            best = (p, err)
        if err <= tol:
            break
        if r < target:
            below, lo = (p, r), p
        else:
            above, hi = (p, r), p
        if below and above:  # interpolate log-ratio linearly in p
            import math

            (pa, ra), (pb, rb) = below, above
            w = (math.log(target) - math.log(ra)) / (math.log(rb) - math.log(ra))
            nxt = pa + w * (pb - pa)
        else:  # latency ~ proportional to p near the target
            nxt = p * target / r
        # stay strictly inside the bracket; fall back to bisection when the step leaves it
        p = nxt if lo < nxt < hi else (lo + hi) / 2
    return (best[0] if best else None), probes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--fractions", default="0.5,0.35", help="targets as fractions of the teacher's measured latency")
    ap.add_argument("--baselines", default="nvit,slim,uvc,magnitude,uniform,torch-pruning")
    ap.add_argument("--methods", default=None, help="rows, the first the reference (default: the config's strategy, "
                    "then --baselines); strategies, torch-pruning, or widths / merges / merges-unadapted / forced-merge")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tol", type=float, default=0.03, help="relative latency tolerance of the match")
    ap.add_argument("--max-probes", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=60, help="timed runs per model in the final session")
    ap.add_argument("--rounds", type=int, default=12, help="round-robin visits in the final session")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (benchmarks/smoke.py): the first "
                    "fraction only, one probe per row; figures mean nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.set += smoke_sizes.SETS
        args.fractions, args.max_probes = args.fractions.split(",")[0], 1
        t = smoke_sizes.timing(True, args.repeats, args.rounds, 0)
        args.repeats, args.rounds = t["repeats"], t["rounds"]
    warnings.simplefilter("ignore")
    t_start = time.time()
    cfg = load_config(args.config, args.set)
    from vitrim.export.backends import get_backend
    from vitrim.export.backends.ort_cpu import OrtCpu

    if not isinstance(get_backend(cfg.target.backend), OrtCpu):
        raise UserError("bench", f"target.backend is {cfg.target.backend}", "this benchmark times ORT-CPU; use an ort-cpu config")
    out = Path(args.out)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if args.methods:
        from vitrim.pipeline.core.config import STRATEGIES

        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in (*STRATEGIES, *VARIANTS, "torch-pruning")]
        if unknown or methods[0] == "torch-pruning":
            raise UserError("bench", f"--methods {args.methods}: " + (f"unknown {unknown}" if unknown else
                            "the reference (first) must be a vitrim search"),
                            f"use {', '.join((*STRATEGIES, *VARIANTS))} or torch-pruning (not first)")
        if any(m in VARIANTS[1:] for m in methods) and not (cfg.search.prune_tokens or cfg.search.merges):
            raise UserError("bench", "token-merge rows need a LUT with a token axis",
                            "use a config with search.prune_tokens: true (e.g. configs/fmnist_tokens_cpu.yaml)")
        reference, baselines = methods[0], methods[1:]
    else:
        reference = cfg.search.strategy
        baselines = [b for b in args.baselines.split(",") if b and b != cfg.search.strategy]
    log = print
    splits = build_splits(cfg.data)
    teacher, tinfo = load_teacher(cfg, splits, log=log)
    spec = describe(teacher, cfg.model.arch, cfg.model.kwargs)
    lut, _ = stage_profile(cfg, spec, progress=False, log=log)
    shape = (splits.in_chans, splits.img_size, splits.img_size)
    teacher_onnx = export_onnx(teacher, out / "onnx" / "teacher.onnx", shape)
    timer = PairTimer(teacher_onnx, cfg.target.batch, cfg.target.threads, cfg.target.opt_level,
                      **({"repeats": args.repeats, "rounds": args.rounds} if args.smoke else {}))
    artifacts: dict[tuple[str, float], dict] = {}  # (method, p) -> {"onnx", "plan"/"model", ...}
    quiet = lambda m: None  # noqa: E731

    def vitrim_maker(strategy: str) -> Callable[[float], Optional[Path]]:
        over = method_overrides(strategy, cfg.search, spec)

        def make(p: float) -> Optional[Path]:
            c = dataclasses.replace(cfg.search, **over, budget_fraction=p, budget_ms=None,
                                    flops_fraction=None, params_fraction=None)
            student, _ = full_size_compact(teacher)
            try:
                res = run_search(teacher, student, lut, c, splits.train, splits.val, batch_size=cfg.data.batch_size,
                                 kd_alpha=cfg.finetune.alpha, kd_T=cfg.finetune.temperature, log=quiet)
            except UnreachableBudget:  # below this method's reachable floor; any other error is shown
                return None
            path = export_onnx(slice_model(res.state, res.plan), out / "onnx" / f"{strategy}_{p:.5f}.onnx", shape)
            artifacts[(strategy, p)] = {"onnx": path, "plan": res.plan, "state": res.state, "search_s": res.wall_s}
            return path
        return make

    def tp_maker() -> Callable[[float], Optional[Path]]:
        x_cal = splits.train[list(range(256))][0]
        y_cal = splits.train[list(range(256))][1]

        def make(keep: float) -> Optional[Path]:
            t0 = time.time()
            try:
                m = torch_pruning_model(teacher, 1.0 - keep, x_cal, y_cal)
            except Exception as e:  # e.g. a ratio that leaves a layer without channels
                log(f"[bench] torch-pruning keep {keep:.3f} failed: {type(e).__name__}: {e}")
                return None
            path = export_onnx(m, out / "onnx" / f"torch-pruning_{keep:.5f}.onnx", shape)
            artifacts[("torch-pruning", keep)] = {"onnx": path, "model": m, "search_s": time.time() - t0}
            return path
        return make

    probes: list[dict] = []
    chosen: dict[float, dict[str, Optional[float]]] = {}
    for f in fractions:
        chosen[f] = {}
        d = reference
        p, pr = match(vitrim_maker(d), timer, f, 0.05, 1.0, f, args.tol, args.max_probes, log, f"{d}@{f:g}")
        probes += pr
        chosen[f][d] = p
        if p is None:
            log(f"[bench] {d} cannot reach {f:g} of the teacher's latency; skipping this target")
            continue
        ratio_d = next(q["ratio"] for q in pr if q["p"] == p)  # the default's measured latency is the target
        for b in baselines:
            if b == "torch-pruning":
                keep0 = f ** 0.5  # MACs ~ width^2 for the linear layers
                p, pr = match(tp_maker(), timer, ratio_d, 0.02, 1.0, keep0, args.tol, args.max_probes, log, f"{b}@{f:g}")
            else:
                # every LUT-driven strategy starts from the budget that gave the default its latency
                p, pr = match(vitrim_maker(b), timer, ratio_d, 0.05, 1.0, chosen[f][d], args.tol, args.max_probes, log,
                              f"{b}@{f:g}")
            probes += pr
            chosen[f][b] = p
        atomic_write_json(out / "probes.json", probes)

    # Fine-tune every matched architecture with the same KD recipe.
    from vitrim.pipeline.core.distill import make_kd_fn
    from vitrim.pipeline.stages.finetune import finetune, train_spec
    from vitrim.pipeline.core.trainer import train

    rows = []
    for f in fractions:
        for method, p in chosen[f].items():
            if p is None:
                rows.append({"fraction": f, "method": method, "onnx": None})
                continue
            a = artifacts[(method, p)]
            run_dir = out / f"{method}_{f:g}"
            t0 = time.time()
            if method == "torch-pruning":
                student = a["model"].train()
                kd = make_kd_fn(teacher, cfg.finetune.alpha, cfg.finetune.temperature, cfg.finetune.label_smoothing)
                train(student, kd, splits.train, train_spec(cfg), run_dir / "finetune",
                      val_fn=lambda m: top1(m, splits.val, cfg.data.eval_batch_size), desc=f"tp@{f:g}", log=log)
                student.eval()
                params = sum(q.numel() for q in student.parameters())
            else:
                student = slice_model(a["state"], a["plan"])
                finetune(cfg, teacher, student, a["plan"], splits, run_dir, log=log)
                params = a["plan"].num_params()
            acc = top1(student, splits.test, cfg.data.eval_batch_size)
            onnx_path = export_onnx(student.eval(), out / "onnx" / f"final_{method}_{f:g}.onnx", shape)
            merges = "" if method == "torch-pruning" else ", ".join(f"{t}@{i}" for i, t in sorted(a["plan"].merges.items()))
            rows.append({"fraction": f, "method": method, "p": p, "onnx": str(onnx_path), "top1": acc, "params": params,
                         "merges": merges, "search_s": round(a["search_s"], 1), "finetune_s": round(time.time() - t0, 1)})
            log(f"[bench] {method}@{f:g}: test top-1 {acc:.2f}% ({params / 1e6:.3f}M params)")
            atomic_write_json(out / "results.json", rows)

    # One interleaved timing session: the teacher and every matched model.
    models = [("teacher", teacher_onnx)] + [(f"{r['method']}@{r['fraction']:g}", Path(r["onnx"])) for r in rows if r["onnx"]]
    runners = [OrtCpuRunner(path, cfg.target.threads, cfg.target.opt_level) for _, path in models]
    with interleaved(runners):
        timings = time_interleaved(runners, cfg.target.batch, args.repeats, args.rounds, warmup=10)
    med = {name: t.median_ms for (name, _), t in zip(models, timings)}
    t_ms = med["teacher"]
    t_top1 = tinfo.get("test_top1") if cfg.data.test_limit is None and tinfo.get("test_top1") is not None \
        else top1(teacher, splits.test, cfg.data.eval_batch_size)
    d = reference
    for r in rows:
        if not r["onnx"]:
            continue
        key = f"{r['method']}@{r['fraction']:g}"
        r["measured_ms"] = med[key]
        r["speedup"] = t_ms / med[key]
        r["delta"] = r["top1"] - t_top1
        ref = next(x for x in rows if x["fraction"] == r["fraction"] and x["method"] == d)
        if ref["onnx"]:
            r["vs_default_latency"] = med[key] / med[f"{d}@{r['fraction']:g}"] - 1
            r["vs_default_top1"] = ref["top1"] - r["top1"]
    sig = lut.signature
    lines = [f"Target: `{sig.backend}` on {sig.device} ({sig.engine_version}), batch {cfg.target.batch}, "
             f"{cfg.target.threads} threads. Teacher: {t_ms:.3f} ms, test top-1 {t_top1:.2f}%. Every method is matched "
             f"to the measured latency of `{d}` (within {pct(args.tol)} in the bisection; column 'lat. vs {d}' is from the "
             f"final session) and fine-tuned with the same KD recipe ({cfg.finetune.epochs} epochs). Latency: median "
             f"of {args.repeats} runs per model over {args.rounds} round-robin visits, every model in one session.", "",
             f"| target | method | params (M) | measured ms | speedup | lat. vs {d} | test top-1 (%) | Δ vs teacher (pt) "
             f"| {d} ahead by (pt) | merges (type@block) | search (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if not r["onnx"]:
            lines.append(f"| {pct(r['fraction'])} | {r['method']} | - | - | - | not reached | - | - | - | - | - |")
            continue
        name = r["method"] + (" (default)" if r["method"] == d else "")
        vs = r.get("vs_default_latency")
        ahead = "" if r["method"] == d else f"{r.get('vs_default_top1', float('nan')):+.2f}"
        lines.append(f"| {pct(r['fraction'])} | {name} | {r['params'] / 1e6:.3f} | {r['measured_ms']:.3f} | "
                     f"{r['speedup']:.2f}x | {'' if vs is None or r['method'] == d else f'{vs:+.1%}'} | {r['top1']:.2f} | "
                     f"{r['delta']:+.2f} | {ahead} | {r.get('merges') or '-'} | {r['search_s']:.0f} |")
    lines += ["", f"Wall time: {(time.time() - t_start) / 60:.1f} min."]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", table)
    atomic_write_json(out / "results.json", {"teacher_ms": t_ms, "teacher_top1": t_top1, "rows": rows,
                                             "command": " ".join(["python"] + sys.argv), "machine": sig.device,
                                             "engine": sig.engine_version, "finetune": dataclasses.asdict(cfg.finetune),
                                             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                             "wall_min": round((time.time() - t_start) / 60, 1)})
    print(table)
    return 0


VARIANTS = ("widths", "merges", "merges-unadapted", "forced-merge")


def method_overrides(method: str, search, spec: dict) -> dict:
    """The search config changes of a row: a strategy (token merges only where it searches them and the config
    asks), or one of the knapsack VARIANTS."""
    from vitrim.pipeline.search import for_strategy

    if method == "widths":
        return {"strategy": "knapsack", "prune_tokens": False, "merges": None}
    if method in ("merges", "merges-unadapted"):
        return {"strategy": "knapsack", "prune_tokens": True, "merges": None,
                "merge_scoring": "adapted" if method == "merges" else "unadapted"}
    if method == "forced-merge":
        return {"strategy": "knapsack", "prune_tokens": False, "merges": [{"block": spec["depth"] // 2, "type": "hw"}]}
    c = for_strategy(search, method)
    return {"strategy": method, "prune_tokens": c.prune_tokens, "merges": None, "step_epochs": c.step_epochs}


def torch_pruning_model(teacher: torch.nn.Module, ratio: float, x_cal: torch.Tensor, y_cal: torch.Tensor):
    """Torch-Pruning MetaPruner on a copy of the timm teacher: Taylor importance, one ratio, round_to=8."""
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    m = copy.deepcopy(teacher).train().requires_grad_(True)  # the KD code freezes the teacher it is given
    heads = {a.qkv: a.num_heads for a in m.modules() if isinstance(a, Attention)}
    pr = tp.pruner.MetaPruner(m, x_cal[:2], importance=tp.importance.GroupTaylorImportance(), pruning_ratio=ratio,
                              ignored_layers=[m.head], num_heads=heads, prune_head_dims=True,
                              prune_num_heads=False, round_to=8, global_pruning=False)
    m.zero_grad()
    torch.nn.functional.cross_entropy(m(x_cal), y_cal).backward()
    pr.step()
    for a in m.modules():  # timm's attention keeps its own head metadata (Torch-Pruning #101/#340)
        if isinstance(a, Attention):
            a.num_heads = pr.num_heads[a.qkv]
            a.head_dim = a.qkv.out_features // (3 * a.num_heads)
            a.attn_dim = a.num_heads * a.head_dim
    m.zero_grad(set_to_none=True)
    return m.eval()


if __name__ == "__main__":
    sys.exit(main())
