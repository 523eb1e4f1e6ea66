"""``vitrim run CONFIG``: profile -> search -> slice -> fine-tune -> export -> parity -> manifest -> report.

Every stage's inputs are hashed (config sections plus upstream hashes); a rerun
skips a stage whose hash is unchanged and whose artifacts exist, and resumes an
interrupted fine-tune from its checkpoint.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from vitrim.pipeline.core.config import RunConfig, config_hash, save_resolved
from vitrim.pipeline.core.io import atomic_write_json, atomic_write_text

STAGES_FILE = "stages.json"


class StageCache:
    """``out/stages.json``: the input hash each stage last completed with."""

    def __init__(self, out: Path):
        self.path = out / STAGES_FILE
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def fresh(self, stage: str, h: str, outputs: list[Path]) -> bool:
        return self.data.get(stage, {}).get("hash") == h and all(p.is_file() for p in outputs)

    def done(self, stage: str, h: str, **info) -> None:
        self.data[stage] = {"hash": h, **info}
        atomic_write_json(self.path, self.data)

    def mark(self, key: str, value) -> None:
        self.data[key] = value
        atomic_write_json(self.path, self.data)

    def invalidate(self, stage: str) -> None:
        self.data.pop(stage, None)
        atomic_write_json(self.path, self.data)


def run_pipeline(cfg: RunConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run every stage for one config; returns the summary written to ``summary.json``."""
    from vitrim.pipeline.core.data import build_splits
    from vitrim.pipeline.core.evaluate import top1
    from vitrim.pipeline.stages.finetune import finetune
    from vitrim.pipeline.core.models import describe, read_state_dict
    from vitrim.pipeline.core.plan import Plan
    from vitrim.pipeline.core.slicing import load_compact, slice_model
    from vitrim.export.release import release_from_config
    from vitrim.pipeline.core.io import copy_into
    from vitrim.pipeline.stages.profile import stage_profile
    from vitrim.pipeline.stages.search import stage_search
    from vitrim.pipeline.stages.teacher import load_teacher, teacher_key

    from vitrim.export.target import Target

    t_start = time.time()
    # fail fast: the target and the data are checked before any training or measuring
    from vitrim.pipeline.core.device import resolve_device

    Target.from_config(cfg.target).check_available()
    device = resolve_device(cfg.device)
    splits = build_splits(cfg.data, model_cfg=cfg.model)
    prep = splits.preprocessing
    log(prep.line())
    out = Path(cfg.out_dir)
    for stale in ("summary.json", "report.md"):  # never leave a previous run's verdict beside a failed one
        (out / stale).unlink(missing_ok=True)
    timings: dict = {}

    t0 = time.time()
    teacher, tinfo = load_teacher(cfg, splits, log=log)
    spec = describe(teacher, cfg.model.arch, cfg.model.kwargs)
    teacher_acc = tinfo.get("test_top1")
    if teacher_acc is None or cfg.data.test_limit is not None:
        teacher_acc = top1(teacher.to(device), splits.test, cfg.data.eval_batch_size, workers=cfg.data.workers)
        teacher.cpu()
    log(f"[teacher] {cfg.model.arch}: test top-1 {teacher_acc:.2f}% ({sum(p.numel() for p in teacher.parameters()) / 1e6:.3f}M params)")
    from vitrim.pipeline.core.preprocessing import check_expected_top1

    expected = check_expected_top1(cfg.model, teacher_acc, len(splits.test), prep)  # exit 2 before any artifact
    if expected:
        log(expected)
    timings["teacher_s"] = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out, prep)
    cache = StageCache(out)

    t0 = time.time()
    lut, lut_src = stage_profile(cfg, spec, progress=progress, log=log)
    copy_into(lut_src, out / "lut.json")
    timings["profile_s"] = round(time.time() - t0, 1)

    data_key = {k: getattr(cfg.data, k) for k in ("name", "root", "val_size", "split_seed", "train_limit", "batch_size")}
    data_key["preprocessing"] = prep.key()  # other transforms: another search and fine-tune
    t_hash = _weights_key(tinfo.get("source")) or cfg.model.checkpoint or teacher_key(cfg)
    h_search = config_hash({"teacher": t_hash, "lut": lut.signature.key(), "lut_created": lut.meta.get("created"),
                            "search": cfg.search, "data": data_key, "kd": [cfg.finetune.alpha, cfg.finetune.temperature]})
    search_out = out / "search"
    t0 = time.time()
    if cache.fresh("search", h_search, [search_out / "plan.json", search_out / "search_state.safetensors"]):
        log("[search] inputs unchanged; reusing search/plan.json")
        plan = Plan.load(search_out / "plan.json")
        t0 = None
    else:
        cache.invalidate("finetune")
        # issue 14: ms budgets anchored on the teacher measured now; after the search, the closed loop
        from vitrim.pipeline.core.models import canonical_state
        from vitrim.pipeline.stages import measured

        with measured.PairTimer(cfg, canonical_state(teacher), spec) as timer:
            scfg, anchor = measured.anchor_budget(cfg, timer, log)
            res = stage_search(scfg, teacher, lut, splits, search_out, log=log)
            plan = res.plan
            # uniform width scaling has no per-group scores to correct with: it keeps the search's plan
            if measured.is_latency_budget(cfg.search) and cfg.search.strategy != "uniform":
                plan = measured.stage_closed_loop(scfg, teacher, lut, res, splits, search_out, anchor, timer, log).plan
        cache.done("search", h_search, wall_s=round(res.wall_s, 1))
    timings["search_s"] = round(time.time() - t0, 1) if t0 else "cached"

    h_ft = config_hash({"search": h_search, "finetune": cfg.finetune, "data": data_key})
    t0 = time.time()
    if cache.fresh("finetune", h_ft, [out / "student.safetensors", out / "plan.json"]):
        log("[finetune] inputs unchanged; reusing student.safetensors")
        student = load_compact(out)
        t0 = None
    else:
        state = read_state_dict(search_out / "search_state.safetensors", "slice")
        student = slice_model(state, plan)
        sliced_acc = top1(student.to(device), splits.val, cfg.data.eval_batch_size, workers=cfg.data.workers)
        student.cpu()
        log(f"[slice] {plan.num_params() / 1e6:.3f}M params, val top-1 right after slicing {sliced_acc:.2f}%")
        # an interrupted fine-tune with the same inputs resumes from its checkpoint
        resume = (out / "finetune" / "checkpoint.pt").is_file() and cache.data.get("finetune_started") == h_ft
        cache.mark("finetune_started", h_ft)
        res = finetune(cfg, teacher, student, plan, splits, out, resume=resume, log=log)
        cache.done("finetune", h_ft, wall_s=round(res.wall_s, 1), sliced_val_top1=sliced_acc)
        (out / "finetune" / "checkpoint.pt").unlink(missing_ok=True)
    timings["finetune_s"] = round(time.time() - t0, 1) if t0 else "cached"

    t0 = time.time()
    h_exp = config_hash({"ft": h_ft, "export": cfg.export, "target": cfg.target, "test_limit": cfg.data.test_limit})
    if cache.fresh("export", h_exp, [out / "manifest.json"]):
        log("[export] inputs unchanged; reusing manifest.json")
        exp = json.loads((out / "manifest.json").read_text())
        student_exp = {"parity": exp["parity"], "latency": exp["latency"], "params": exp["model"]["params"],
                       "int8_recovery": exp.get("int8_recovery")}
        texp = json.loads((out / "teacher" / "manifest.json").read_text())
        teacher_exp = {"parity": texp["parity"], "latency": texp["latency"], "params": texp["model"]["params"]}
        t0 = None
    else:
        for stale in (out / "manifest.json", out / "teacher" / "manifest.json"):  # a failed gate leaves none behind
            stale.unlink(missing_ok=True)
        teacher_exp = release_from_config(cfg, teacher, out / "teacher", splits.test, plan=Plan.full(spec),
                                          predicted_ms=lut.predict(Plan.full(spec)),
                                          name=f"teacher {cfg.model.arch}", calib_set=splits.val,
                                          preprocessing=prep, log=log)
        from vitrim.pipeline.stages.qat import release_student  # an int8 engine failing the gate: recovery

        student_exp = release_student(cfg, teacher, student, plan, splits, out, predicted_ms=lut.predict(plan),
                                      device=device, log=log)
        cache.done("export", h_exp)
    timings["export_s"] = round(time.time() - t0, 1) if t0 else "cached"
    onnx_name = f"model.{cfg.target.precision}.onnx" if cfg.target.precision in ("int8", "fp8") else "model.onnx"
    same = retime_pair(cfg, out / "teacher" / onnx_name, out / onnx_name, log)

    summary = make_summary(cfg, spec, plan, lut, teacher_acc, teacher_exp, student_exp, out, timings)
    summary["preprocessing"] = prep.to_dict()
    summary["expected_top1"] = cfg.model.expected_top1
    summary["int8_recovery"] = student_exp.get("int8_recovery")  # None: not needed (or not an int8 target)
    if same is not None:  # the speedup is a ratio measured in one interleaved session
        for key, t in zip(("teacher", "student"), same):
            summary[key]["measured_ms"], summary[key]["p90_ms"] = t.median_ms, t.p90_ms
        summary["speedup"] = same[0].median_ms / same[1].median_ms
        summary["latency_protocol"] = "teacher and student re-timed round-robin in one session"
    from vitrim.pipeline.stages.measured import add_to_summary  # issue 14

    add_to_summary(summary, out, same)
    summary["wall_s"] = round(time.time() - t_start, 1)
    atomic_write_json(out / "summary.json", summary)
    write_report(out, summary)
    log(f"[run] teacher {summary['teacher']['measured_ms']:.2f} ms / {summary['teacher']['top1']:.2f}%  ->  "
        f"student {summary['student']['measured_ms']:.2f} ms / {summary['student']['top1']:.2f}%  "
        f"(measured speedup {summary['speedup']:.2f}x, {summary['delta_top1']:+.2f} pt); report: {out / 'report.md'}")
    return summary


def preprocessing_lines(s: dict) -> list[str]:
    """The report's preprocessing section (issue 21): what the teacher, the student and the engine expect."""
    p = s.get("preprocessing")
    if not p:
        return []
    lines = ["## Preprocessing", "",
             "Every figure above was measured with this input; the engine expects it too (also in `manifest.json`).",
             "", "| field | value | from |", "|---|---|---|"]
    for k in ("input_size", "resize", "crop_pct", "crop_mode", "interpolation", "mean", "std", "channels", "layout",
              "dtype", "value_range"):
        v = p.get(k)
        v = "x".join(str(a) for a in v) if k in ("input_size", "resize") and v else v
        src = p["sources"].get(k, "derived" if k in ("resize", "channels") else "vitrim")
        lines.append(f"| {k} | `{v}` | {src} |")
    lines += ["", "Steps: " + "; ".join(p["steps"]) + "."]
    if s.get("expected_top1") is not None:
        lines.append(f"The teacher's test top-1 ({s['teacher']['top1']:.2f}%) was checked against "
                     f"model.expected_top1 = {s['expected_top1']:g}%.")
    return lines + [""]


def recovery_lines(s: dict) -> list[str]:
    """The report's int8-recovery paragraph (issue 16), when the target is int8."""
    if s["signature"].get("precision") != "int8":
        return []
    r = s.get("int8_recovery")
    if not r:
        return ["## int8 recovery", "", "Not needed: the int8 engine passed the gate as quantized.", ""]
    b = r["before"]
    return ["## int8 recovery", "",
            f"The first int8 engine failed the gate (engine top-1 {b['engine_top1']:.2f}% against "
            f"{b['torch_top1']:.2f}% in fp32 torch): {'; '.join(b['failures'])}. {r['steps']} KD steps with int8 "
            f"fake-quant on {r['linear_layers']} Linear layers ({r['wall_s']:.0f} s) made the released engine "
            "(weights in `int8_recovery/`).", ""]


def _weights_key(source) -> str | None:
    """The teacher weights actually loaded (path, size, mtime): a retrained teacher invalidates later stages."""
    import os

    if not source or not os.path.isfile(source):
        return None
    st = os.stat(source)
    return f"{os.path.abspath(source)}:{st.st_size}:{st.st_mtime_ns}"


def retime_pair(cfg: RunConfig, teacher_onnx: Path, student_onnx: Path, log):
    """Median latency of teacher and student timed round-robin in one session (ORT-CPU)."""
    if cfg.target.backend != "ort-cpu" or not (teacher_onnx.is_file() and student_onnx.is_file()):
        return None
    from vitrim.export.runners import OrtCpuRunner, time_interleaved

    runners = [OrtCpuRunner(teacher_onnx, cfg.target.threads, cfg.target.opt_level),
               OrtCpuRunner(student_onnx, cfg.target.threads, cfg.target.opt_level)]
    for r in runners:
        r.activate()
    try:
        t, s = time_interleaved(runners, cfg.target.batch, max(60, cfg.profile.repeats), max(12, cfg.profile.rounds),
                                cfg.profile.warmup)
    finally:
        for r in runners:
            r.deactivate()
    log(f"[run] interleaved timing at batch {cfg.target.batch}: teacher {t.median_ms:.3f} ms, student {s.median_ms:.3f} ms")
    return t, s


def make_summary(cfg, spec, plan, lut, teacher_acc, teacher_exp, student_exp, out: Path, timings: dict) -> dict:
    from vitrim.pipeline.core.plan import Plan

    full = Plan.full(spec)
    t_ms, s_ms = teacher_exp["latency"]["median_ms"], student_exp["latency"]["median_ms"]
    s_acc = student_exp["parity"]["torch_top1"]
    search_log = json.loads((out / "search" / "search_log.json").read_text()) if (out / "search" / "search_log.json").is_file() else {}
    return {
        "name": cfg.name, "signature": lut.signature.to_dict(), "budget": search_log.get("budget_desc"),
        "strategy": cfg.search.strategy,
        "teacher": {"params": full.num_params(), "macs": full.macs(), "predicted_ms": lut.predict(full),
                    "measured_ms": t_ms, "p90_ms": teacher_exp["latency"]["p90_ms"], "top1": teacher_acc,
                    "engine_top1": teacher_exp["parity"]["engine_top1"],
                    "parity_agreement": teacher_exp["parity"]["top1_agreement"]},
        "student": {"params": plan.num_params(), "macs": plan.macs(), "predicted_ms": lut.predict(plan),
                    "measured_ms": s_ms, "p90_ms": student_exp["latency"]["p90_ms"], "top1": s_acc,
                    "engine_top1": student_exp["parity"]["engine_top1"],
                    "parity_agreement": student_exp["parity"]["top1_agreement"],
                    "parity_max_absdiff": max(o["max_absdiff"] for o in student_exp["parity"]["outputs"].values())},
        "speedup": t_ms / s_ms, "delta_top1": s_acc - teacher_acc, "timings": timings,
        "search_log": search_log.get("steps", []), "plan_summary": plan.summary(),
    }


def write_report(out: Path, s: dict) -> None:
    from vitrim.pipeline.stages.measured import report_lines  # issue 14

    t, st = s["teacher"], s["student"]
    sig = s["signature"]
    rows = [
        ("params (M)", f"{t['params'] / 1e6:.3f}", f"{st['params'] / 1e6:.3f}"),
        ("MACs / image (M)", f"{t['macs'] / 1e6:.1f}", f"{st['macs'] / 1e6:.1f}"),
        ("predicted latency (ms, LUT)", f"{t['predicted_ms']:.3f}", f"{st['predicted_ms']:.3f}"),
        ("measured latency (ms, median)", f"{t['measured_ms']:.3f}", f"{st['measured_ms']:.3f}"),
        ("measured latency (ms, p90)", f"{t['p90_ms']:.3f}", f"{st['p90_ms']:.3f}"),
        ("test top-1 (%, torch)", f"{t['top1']:.2f}", f"{st['top1']:.2f}"),
        ("test top-1 (%, engine)", f"{t['engine_top1']:.2f}", f"{st['engine_top1']:.2f}"),
        ("engine/torch top-1 agreement (%)", f"{100 * t['parity_agreement']:.2f}", f"{100 * st['parity_agreement']:.2f}"),
    ]
    lines = [f"# vitrim report: {s['name']}", "",
             f"Target: `{sig['backend']}/{sig['precision']}` on **{sig['device']}** ({sig['engine_version']}), "
             f"batch {sig['batch']}, {sig['tokens']} tokens, {sig['threads']} threads.  ",
             f"Strategy `{s['strategy']}`, budget {s['budget']}.", "",
             f"**Measured speedup {s['speedup']:.2f}x at {s['delta_top1']:+.2f} pt top-1.**", "",
             "| | teacher | student |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "## Where the widths survived", "", "![widths](search/widths.png)", "",
              "```", s["plan_summary"], "```", "", "## Search log", "",
              "| step | predicted (ms) | val top-1 after short KD (%) | removed groups |", "|---:|---:|---:|---|"]
    for r in s["search_log"]:
        acc = "" if r.get("val_top1") is None else f"{r['val_top1']:.2f}"
        lines.append(f"| {r['step']} | {r['cost']:.3f} | {acc} | {r.get('removed') or ''} |")
    lines += ["", "## Predicted vs measured", "",
              f"Teacher: predicted {t['predicted_ms']:.3f} ms, measured {t['measured_ms']:.3f} ms "
              f"({100 * (t['predicted_ms'] - t['measured_ms']) / t['measured_ms']:+.1f}%).  ",
              f"Student: predicted {st['predicted_ms']:.3f} ms, measured {st['measured_ms']:.3f} ms "
              f"({100 * (st['predicted_ms'] - st['measured_ms']) / st['measured_ms']:+.1f}%).", "",
              *report_lines(s), "",  # issue 14
              *recovery_lines(s),
              *preprocessing_lines(s),
              "## Stage times (s)", "", "| " + " | ".join(s["timings"]) + " |",
              "|" + "---:|" * len(s["timings"]), "| " + " | ".join(str(v) for v in s["timings"].values()) + " |", "",
              "Artifacts: `model.onnx`, `model.ort.onnx` (engine), `student.safetensors`, `plan.json`, `lut.json`, "
              "`parity.json`, `manifest.json` (verify with `vitrim verify-manifest`), `resolved_config.yaml`."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def run_curve(cfg: RunConfig, budgets: list[float], baselines: list[str], log: Callable[[str], None] = print) -> list[dict]:
    """Run the pipeline per budget (and per baseline strategy), sharing the teacher and the LUT.

    Writes ``<out_dir>/curve.csv`` and ``curve.png``.
    """
    import copy

    from vitrim.profiling.curve import write_curve

    base = Path(cfg.out_dir)
    rows: list[dict] = []
    teacher_row = None
    for method in [cfg.search.strategy] + [b for b in baselines if b != cfg.search.strategy]:
        for b in budgets:
            c = copy.deepcopy(cfg)
            c.search.strategy = method
            c.search.prune_tokens = cfg.search.prune_tokens and method in ("knapsack", "nvit")  # others merge none
            c.search.budget_fraction, c.search.budget_ms = b, None
            c.search.flops_fraction = c.search.params_fraction = None
            c.out_dir = str(base / f"{method}_{b:g}")
            c.name = f"{cfg.name}/{method}@{b:g}"
            log(f"[curve] {method} at {b:g} of the teacher's latency -> {c.out_dir}")
            try:
                s = run_pipeline(c, log=log)
            except Exception as e:  # one unreachable point (e.g. uniform at a tiny budget) must not sink the curve
                from vitrim.pipeline.core.errors import UserError

                if not isinstance(e, UserError):
                    raise
                log(f"[curve] skipped {method}@{b:g}: {e}")
                continue
            rows.append({"method": method, "budget": b, "predicted_ms": s["student"]["predicted_ms"],
                         "measured_ms": s["student"]["measured_ms"], "p90_ms": s["student"]["p90_ms"],
                         "top1": s["student"]["top1"], "params": s["student"]["params"],
                         "macs": s["student"]["macs"], "speedup": s["speedup"], "delta_top1": s["delta_top1"]})
            t = s["teacher"]
            teacher_row = {"method": "teacher", "budget": 1.0, "predicted_ms": t["predicted_ms"],
                           "measured_ms": t["measured_ms"], "p90_ms": t["p90_ms"], "top1": t["top1"],
                           "params": t["params"], "macs": t["macs"], "speedup": 1.0, "delta_top1": 0.0}
    if teacher_row:
        rows.insert(0, teacher_row)
    csv_p, png_p = write_curve(rows, base, f"{cfg.name}: measured latency vs test top-1")
    log(f"[curve] wrote {csv_p} and {png_p}")
    return rows
