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
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.rundir import RunDir


class StageCache:
    """The run's ``stages`` file: the input hash each stage last completed with."""

    def __init__(self, rd: RunDir):
        self.path = rd.stages
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
    """Run every stage for one config; returns the summary it writes.

    An I/O fault (exit 2) takes back what the release steps wrote (engines, manifests, verdicts, report), and
    keeps what a rerun resumes from (:meth:`RunDir.resumable`: the search, the fine-tuned student).
    """
    from vitrim.pipeline.core.io import undo_on_fault
    from vitrim.pipeline.stages.cache import check_out_dir

    rd = RunDir(cfg.out_dir)
    check_out_dir(rd.root, "out_dir")  # a read-only output directory: refused before any work
    with undo_on_fault(rd.root, rd.release_claims(), keep=rd.resumable(), what="release"):
        return _run_pipeline(cfg, log, progress)


def _run_pipeline(cfg: RunConfig, log: Callable[[str], None], progress: bool) -> dict:
    from vitrim.pipeline.core.data import build_splits
    from vitrim.pipeline.core.evaluate import top1
    from vitrim.pipeline.stages.finetune import finetune
    from vitrim.pipeline.core.models import describe, read_state_dict
    from vitrim.pipeline.core.plan import Plan
    from vitrim.pipeline.core.slicing import load_compact, slice_model
    from vitrim.export.release import release_from_config
    from vitrim.export.verdict import raise_for, write_run_verdict
    from vitrim.pipeline.core.errors import GateError, UserError
    from vitrim.pipeline.core.io import copy_into
    from vitrim.pipeline.report import add_measured_budget, make_summary, prediction_line, write_summary
    from vitrim.pipeline.stages.profile import stage_profile
    from vitrim.pipeline.stages.search import (PairTimer, anchor_budget, stage_closed_loop, stage_search, start_key,
                                               wants_closed_loop)
    from vitrim.pipeline.stages.teacher import load_teacher, teacher_key

    from vitrim.export.backends import BACKENDS
    from vitrim.export.target import Target

    t_start = time.time()
    # fail fast: the target and the data are checked before any training or measuring
    from vitrim.pipeline.core.device import resolve_device

    target = Target.from_config(cfg.target)
    target.check_available()
    from vitrim.pipeline.search import check_start

    check_start(cfg.search)  # a strategy that cannot continue search.start_from: refused before any training
    from vitrim.pipeline.stages.cache import prepare_cache

    prepare_cache(cfg, lut=True, log=log)  # a read-only cache lacking the teacher or table: refused before any work
    device = resolve_device(cfg.device)
    splits = build_splits(cfg.data, model_cfg=cfg.model)
    prep = splits.preprocessing
    log(prep.line())
    log(splits.line())
    rd = RunDir(cfg.out_dir)
    for stale in (rd.summary, rd.report, rd.verdict, rd.compare):  # never leave a previous run's verdict beside a failed one
        stale.unlink(missing_ok=True)
    if cfg.export.require_budget and not wants_closed_loop(cfg):  # issue 24: the gate needs the delivered ratio
        raise UserError("run", f"export.require_budget needs the measured closed loop, which strategy "
                        f"'{cfg.search.strategy}' with this budget does not run",
                        "use a latency budget with a correctable strategy (e.g. knapsack), or export.require_budget=false")
    if cfg.export.require_budget and not target.impl.times_onnx:  # the gate wants both engines in one session
        onnx_timed = ", ".join(n for n, b in BACKENDS.items() if b.times_onnx)
        raise UserError("run", f"export.require_budget times teacher and student round-robin in one session, which "
                        f"vitrim run does on {onnx_timed}; the target is {cfg.target.backend}",
                        "gate the latency with `vitrim compare` against a baseline release, or export.require_budget=false")
    if cfg.export.baseline is not None:  # checked now, not after minutes of search and fine-tuning
        from vitrim.export.manifest import verify_manifest

        if not RunDir(cfg.export.baseline).manifest.is_file():
            raise UserError("run", f"export.baseline='{cfg.export.baseline}' holds no release (no "
                            f"{RunDir(cfg.export.baseline).manifest.name})",
                            "point it at the last release's directory, or leave export.baseline unset for a first release")
        verify_manifest(cfg.export.baseline)
    if cfg.search.merges:  # fixed token merges checked on the architecture, before the teacher (it may train) and LUT
        from vitrim.pipeline.core.models import create_model
        from vitrim.pipeline.search import fixed_merge_plan

        fixed_merge_plan(describe(create_model(cfg.model, load_checkpoint=False, pretrained=False), cfg.model.arch,
                                  cfg.model.kwargs), cfg.search)
    timings: dict = {}

    t0 = time.time()
    teacher, tinfo = load_teacher(cfg, splits, log=log)
    spec = describe(teacher, cfg.model.arch, cfg.model.kwargs)
    teacher_acc = tinfo.get("test_top1")
    if teacher_acc is None or cfg.data.test_limit is not None:
        teacher_acc = top1(teacher.to(device), splits.test, cfg.data.eval_batch_size, workers=cfg.data.workers)
        teacher.cpu()
    log(f"[teacher] {cfg.model.arch}: test top-1 {teacher_acc:.2f}% ({sum(p.numel() for p in teacher.parameters()) / 1e6:.3f}M params)")
    from vitrim.pipeline.core.preprocessing import check_chance, check_expected_top1

    expected = check_expected_top1(cfg.model, teacher_acc, len(splits.test), prep)  # exit 2 before any artifact
    if expected:
        log(expected)
    log(check_chance(cfg.model, teacher_acc, len(splits.test), splits.num_classes, splits.augment, prep))
    timings["teacher_s"] = round(time.time() - t0, 1)
    rd.mkdir()
    save_resolved(cfg, rd.root, prep)
    cache = StageCache(rd)

    t0 = time.time()
    lut, lut_src = stage_profile(cfg, spec, progress=progress, log=log)
    copy_into(lut_src, rd.lut)
    timings["profile_s"] = round(time.time() - t0, 1)

    data_key = {k: getattr(cfg.data, k) for k in ("name", "root", "val_size", "split_seed", "train_limit", "batch_size")}
    data_key["preprocessing"] = prep.key()  # other transforms: another search and fine-tune
    if splits.augment is not None:
        data_key["augment"] = splits.augment
    t_hash = _weights_key(tinfo.get("source")) or cfg.model.checkpoint or teacher_key(cfg)
    h_search = config_hash({"teacher": t_hash, "lut": lut.signature.key(), "lut_created": lut.meta.get("created"),
                            "search": cfg.search, "data": data_key, "kd": [cfg.finetune.alpha, cfg.finetune.temperature],
                            "start": start_key(cfg)})
    search_rd = rd.search_dir
    t0 = time.time()
    if cache.fresh("search", h_search, [search_rd.plan, search_rd.search_state]):
        log(f"[search] inputs unchanged; reusing {search_rd.plan.relative_to(rd.root)}")
        plan = Plan.load(search_rd.plan)
        t0 = None
    else:
        cache.invalidate("finetune")
        # issue 14: ms budgets anchored on the teacher measured now; after the search, the closed loop
        from vitrim.pipeline.core.models import canonical_state

        with PairTimer(cfg, canonical_state(teacher), spec) as timer:
            scfg, anchor = anchor_budget(cfg, timer, log)
            res = stage_search(scfg, teacher, lut, splits, search_rd.root, log=log)
            plan = res.plan
            if wants_closed_loop(cfg):  # (a strategy without per-group scores keeps the search's plan)
                plan = stage_closed_loop(scfg, teacher, lut, res, splits, search_rd.root, anchor, timer, log).plan
        cache.done("search", h_search, wall_s=round(res.wall_s, 1), took_s=round(time.time() - t0, 1))
    timings["search_s"] = round(time.time() - t0, 1) if t0 else "cached"

    h_ft = config_hash({"search": h_search, "finetune": cfg.finetune, "data": data_key})
    t0 = time.time()
    if cache.fresh("finetune", h_ft, [rd.student, rd.plan]):
        log(f"[finetune] inputs unchanged; reusing {rd.student.name}")
        student = load_compact(rd.root)
        t0 = None
    else:
        state = read_state_dict(search_rd.search_state, "slice")
        student = slice_model(state, plan)
        sliced_acc = top1(student.to(device), splits.val, cfg.data.eval_batch_size, workers=cfg.data.workers)
        student.cpu()
        log(f"[slice] {plan.num_params() / 1e6:.3f}M params, holdout top-1 right after slicing {sliced_acc:.2f}%")
        # an interrupted fine-tune with the same inputs resumes from its checkpoint
        ckpt = rd.finetune_dir.checkpoint
        resume = ckpt.is_file() and cache.data.get("finetune_started") == h_ft
        cache.mark("finetune_started", h_ft)
        res = finetune(cfg, teacher, student, plan, splits, rd.root, resume=resume, log=log)
        cache.done("finetune", h_ft, wall_s=round(res.wall_s, 1), sliced_val_top1=sliced_acc,
                   took_s=round(time.time() - t0, 1))
        ckpt.unlink(missing_ok=True)
    timings["finetune_s"] = round(time.time() - t0, 1) if t0 else "cached"

    t0 = time.time()
    from vitrim.pipeline.stages.compare import export_key, finish_release  # issue 24: the release workflow

    h_exp = config_hash({"ft": h_ft, "export": export_key(cfg.export), "target": cfg.target,
                         "test_limit": cfg.data.test_limit})
    if cache.fresh("export", h_exp, [rd.manifest, rd.teacher_dir.manifest]):
        log(f"[export] inputs unchanged; reusing {rd.manifest.name}")
        exp = json.loads(rd.manifest.read_text())
        student_exp = {"parity": exp["parity"], "latency": exp["latency"], "params": exp["model"]["params"],
                       "int8_recovery": exp.get("int8_recovery")}
        texp = json.loads(rd.teacher_dir.manifest.read_text())
        teacher_exp = {"parity": texp["parity"], "latency": texp["latency"], "params": texp["model"]["params"]}
        t0 = None
    else:
        for stale in (rd.manifest, rd.teacher_dir.manifest):  # a failed gate leaves none behind
            stale.unlink(missing_ok=True)
        teacher_exp = None
        try:
            teacher_exp = release_from_config(cfg, teacher, rd.teacher_dir.root, splits.test, plan=Plan.full(spec),
                                              predicted_ms=lut.predict(Plan.full(spec)),
                                              name=f"teacher {cfg.model.arch}", calib_set=splits.val,
                                              preprocessing=prep, log=log)
            from vitrim.pipeline.stages.qat import release_student  # an int8 engine failing the gate: recovery

            student_exp = release_student(cfg, teacher, student, plan, splits, rd.root,
                                          predicted_ms=lut.predict(plan), device=device, log=log)
        except GateError as e:  # the run's verdict.json keeps the failed gate's figures (issue 24)
            write_run_verdict(rd.verdict, teacher_exp["parity"] if teacher_exp else e.report,
                              e.report if teacher_exp else None, error=str(e))
            raise
        cache.done("export", h_exp, took_s=round(time.time() - t0, 1))
    timings["export_s"] = round(time.time() - t0, 1) if t0 else "cached"
    p = cfg.target.precision  # the graph each engine was built from (export.release names it)
    graph = (lambda d: target.impl.quantized_path(d, p)) if target.quantized else (lambda d: d.engine_onnx(p))
    same = retime_pair(cfg, graph(rd.teacher_dir), graph(rd), log)

    summary = make_summary(cfg, spec, plan, lut, teacher_acc, teacher_exp, student_exp, rd, timings)
    summary["preprocessing"] = prep.to_dict()
    summary["expected_top1"] = cfg.model.expected_top1
    summary["int8_recovery"] = student_exp.get("int8_recovery")  # None: not needed (or not an int8 target)
    if same is not None:  # the speedup is a ratio measured in one interleaved session
        for key, t in zip(("teacher", "student"), same):
            summary[key]["measured_ms"], summary[key]["p90_ms"] = t.median_ms, t.p90_ms
        summary["speedup"] = same[0].median_ms / same[1].median_ms
        summary["latency_protocol"] = "teacher and student re-timed round-robin in one session"
    warning = add_measured_budget(summary, rd, same)  # issue 14
    if warning:
        log(warning)
    if prediction_line(summary):
        log(f"[run] {prediction_line(summary)}")
    verdict = write_run_verdict(rd.verdict, teacher_exp["parity"], student_exp["parity"],  # issue 24
                                measured_budget=summary.get("measured_budget"),
                                require_budget=cfg.export.require_budget)
    from vitrim.export.manifest import seal_manifest

    seal_manifest(rd.root, log=log)  # the run's verdict (and a rerun's rewritten files): Triton and compare verify the release
    try:
        verdict = finish_release(cfg, rd, summary, verdict, log)  # the card with the speedup, export.triton, .baseline
    except UserError:
        rd.verdict.unlink(missing_ok=True)  # the run stopped on a user error: no verdict of it stands
        rd.manifest.unlink(missing_ok=True)  # nor a release that lists it
        raise
    summary["wall_s"] = round(time.time() - t_start, 1)
    # what the run cost, a rerun that reused stages included: this call's time plus the time each reused stage took
    # when it ran (its stage record); unknown (None) when a reused stage's record predates took_s
    took = [cache.data.get(st, {}).get("took_s") for st in ("search", "finetune", "export")
            if timings.get(f"{st}_s") == "cached"]
    summary["work_s"] = None if None in took else round(summary["wall_s"] + sum(took), 1)
    write_summary(rd, summary)
    seal_manifest(rd.root, log=log)  # the report, summary, card and Triton files written after the release are listed too
    log(f"[run] teacher {summary['teacher']['measured_ms']:.2f} ms / {summary['teacher']['top1']:.2f}%  ->  "
        f"student {summary['student']['measured_ms']:.2f} ms / {summary['student']['top1']:.2f}%  "
        f"(measured speedup {summary['speedup']:.2f}x, {summary['delta_top1']:+.2f} pt); report: {rd.report}")
    raise_for(verdict)  # export.require_budget: a missed budget exits 4, after the summary and report are written
    return summary


def _weights_key(source) -> str | None:
    """The teacher weights actually loaded (path, size, mtime): a retrained teacher invalidates later stages."""
    import os

    if not source or not os.path.isfile(source):
        return None
    st = os.stat(source)
    return f"{os.path.abspath(source)}:{st.st_size}:{st.st_mtime_ns}"


def retime_pair(cfg: RunConfig, teacher_onnx: Path, student_onnx: Path, log):
    """Median latency of teacher and student timed round-robin in one session (a backend that times ONNX files)."""
    from vitrim.export.target import Target

    target = Target.from_config(cfg.target)
    if not target.impl.times_onnx or not (teacher_onnx.is_file() and student_onnx.is_file()):
        return None
    from vitrim.export.runners import interleaved, time_interleaved

    runners = [target.impl.onnx_runner(teacher_onnx, target), target.impl.onnx_runner(student_onnx, target)]
    with interleaved(runners) as rs:
        t, s = time_interleaved(rs, cfg.target.batch, max(60, cfg.profile.repeats), max(12, cfg.profile.rounds),
                                cfg.profile.warmup)
    log(f"[run] interleaved timing at batch {cfg.target.batch}: teacher {t.median_ms:.3f} ms, student {s.median_ms:.3f} ms")
    return t, s
