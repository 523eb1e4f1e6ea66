"""Stage functions with plain inputs and outputs; the CLI and ``vitrim run`` call these.

Each takes the resolved :class:`~pipeline.config.RunConfig` plus what the previous
stage produced, and writes its artifacts atomically.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from export.target import Target
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.plan import Floors, Plan


def floors(cfg: RunConfig) -> Floors:
    s = cfg.search
    return Floors(heads=s.min_heads, qk=s.min_qk, v=s.min_v, mlp=s.min_mlp)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]


def lut_path(cfg: RunConfig, spec: dict, target: Target) -> Path:
    if cfg.profile.lut:
        return Path(cfg.profile.lut)
    sig = target.signature(Plan.full(spec).num_tokens)
    return Path(cfg.cache_dir) / f"lut-{sig.key()}-{spec_hash(spec)}.json"


def stage_profile(cfg: RunConfig, spec: dict, rebuild: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print):
    """Reuse a LUT whose signature matches this target and teacher, else build one."""
    from profiling.lut import LatencyTable, build_lut

    target = Target.from_config(cfg.target)
    path = lut_path(cfg, spec, target)
    want = target.signature(Plan.full(spec).num_tokens)
    if path.is_file() and not rebuild:
        if cfg.profile.lut:  # the user's file: it must fit, or we say why
            lut = LatencyTable.load(path, expect=want)
            lut.check_plan(Plan.full(spec))
            log(f"[profile] using LUT {path} ({want.key()})")
            return lut, path
        stale = _stale_reason(path, cfg, spec, target, want)
        if stale is None:
            log(f"[profile] reusing LUT {path} ({want.key()})")
            return LatencyTable.load(path, expect=want), path
        log(f"[profile] rebuilding cached LUT {path}: {stale}")
    lut = build_lut(spec, target, cfg.profile, floors(cfg), cfg.search.align, path, progress=progress, log=log)
    return lut, path


def _stale_reason(path: Path, cfg: RunConfig, spec: dict, target: Target, want) -> Optional[str]:
    """Why a cached LUT no longer fits the config (None when it does)."""
    from dataclasses import asdict

    from profiling.lut import Grid, LatencyTable

    try:
        lut = LatencyTable.load(path, expect=want)
    except UserError as e:
        return str(e).splitlines()[0]
    if lut.spec != spec:
        return "built for another teacher"
    grid = Grid.for_spec(spec, cfg.profile, floors(cfg), max(cfg.search.align, target.align))
    if asdict(lut.grid) != asdict(grid):
        return "the profile grid settings changed"
    m = lut.meta
    if (m.get("warmup"), m.get("repeats"), m.get("rounds")) != (cfg.profile.warmup, cfg.profile.repeats, cfg.profile.rounds):
        return "the measurement settings changed"
    return None


def copy_into(src: Path, dst: Path) -> Path:
    from pipeline.io import atomic_path

    if Path(src).resolve() == Path(dst).resolve():
        return dst
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def stage_search(cfg: RunConfig, teacher, lut, splits, out_dir: Path, log: Callable[[str], None] = print):
    """Search a plan; writes plan.json, search_log.json, widths.png and search_state.safetensors."""
    from pipeline.io import atomic_write_json
    from pipeline.models import save_weights
    from pipeline.search import plot_widths, run_search
    from pipeline.slicing import full_size_compact

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student, _ = full_size_compact(teacher)
    res = run_search(teacher, student, lut, cfg.search, splits.train, splits.val, batch_size=cfg.data.batch_size,
                     kd_alpha=cfg.finetune.alpha, kd_T=cfg.finetune.temperature, log=log)
    res.plan.save(out_dir / "plan.json")
    atomic_write_json(out_dir / "search_log.json", {"strategy": cfg.search.strategy, "budget": res.budget,
                                                     "unit": res.unit, "budget_desc": res.budget_desc,
                                                     "wall_s": round(res.wall_s, 1), "steps": res.log})
    save_weights(res.state, out_dir / "search_state.safetensors")
    plot_widths(res.plan, out_dir / "widths.png", f"{cfg.search.strategy}: kept widths per block "
                f"(embed {res.plan.embed_dim}/{lut.spec['embed_dim']})")
    log(f"[search] done in {res.wall_s:.0f}s: predicted {lut.predict(res.plan):.3f} ms, "
        f"{res.plan.num_params() / 1e6:.3f}M params; wrote {out_dir / 'plan.json'}")
    return res


def check_plan_matches_teacher(plan, teacher, cfg: RunConfig) -> None:
    from pipeline.models import describe

    t = describe(teacher, cfg.model.arch, cfg.model.kwargs)
    keys = [k for k in t if k not in ("arch", "kwargs")]
    bad = [k for k in keys if plan.spec.get(k) != t[k]]
    if bad:
        raise UserError("finetune", f"the student's plan was made for another teacher ({bad[0]}: plan "
                        f"{plan.spec.get(bad[0])!r}, teacher {t[bad[0]]!r})",
                        "use the config of the teacher the plan was searched on")


def stage_export(cfg: RunConfig, model, out_dir: Path, splits, plan=None, lut=None, onnx_path: Optional[Path] = None,
                 name: str = "student", log: Callable[[str], None] = print) -> dict:
    """Export ONNX, build the target engine, gate on parity, measure, write the manifest.

    Raises :class:`export.parity.ParityError` (after writing ``parity.json``) when
    the engine diverges; no manifest is written then.
    """
    import numpy as np

    from export.engine import build_engine
    from export.manifest import write_manifest
    from export.onnx import export_onnx, to_fp16
    from export.parity import ParityError, Tolerances, check_parity
    from export.runners import TorchRunner, make_runner
    from pipeline.config import config_hash
    from pipeline.io import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = Target.from_config(cfg.target)
    model = model.eval().cpu()
    if plan is not None:
        shape = (plan.spec["in_chans"], *plan.spec["img_size"])
        tokens = plan.num_tokens
    else:
        from pipeline.models import describe

        spec = describe(model, cfg.model.arch, cfg.model.kwargs)
        shape = (spec["in_chans"], *spec["img_size"])
        tokens = Plan.full(spec).num_tokens
    sig = target.signature(tokens)
    for stale in ("manifest.json", "parity.json"):
        (out / stale).unlink(missing_ok=True)
    if onnx_path is None:
        onnx_path = export_onnx(model, out / "model.onnx", shape, opset=cfg.export.opset, simplify=cfg.export.simplify)
        log(f"[export] {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB)")
    else:
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise UserError("export", f"ONNX file '{onnx_path}' not found", "pass the path of an existing .onnx file")
        log(f"[export] verifying the given ONNX {onnx_path}")
    src = onnx_path
    if target.precision == "fp16" and target.backend == "tensorrt":
        from export.target import trt_major

        if trt_major() >= 11:  # strongly typed: fp16 lives in the ONNX
            src = to_fp16(onnx_path, out / "model.fp16.onnx")
    engine = build_engine(src, out, target, shape)
    log(f"[export] engine: {engine.backend} {engine.path or '(eager)'}")
    # parity: torch on the CPU (fp32) against the engine, on real data
    test = splits.test
    xs, ys = [], []
    from pipeline.data import make_loader

    for x, y in make_loader(test, 1024):
        xs.append(x.numpy())
        ys.append(y.numpy())
    images, labels = np.concatenate(xs), np.concatenate(ys)
    tol = Tolerances.for_precision(cfg.export, target.precision)
    reference = TorchRunner(model, shape, "cpu", threads=target.threads)
    eng_runner = engine.runner(target, model, shape)
    with reference, eng_runner:
        report = check_parity(reference, eng_runner, images, labels, tol, target.precision,
                              cfg.export.parity_batches, batch_size=target.batch)
    rep = report.to_dict()
    rep["onnx"] = str(onnx_path)
    atomic_write_json(out / "parity.json", rep)
    if not report.passed:
        raise ParityError(f"[export] parity gate FAILED for {name} on {target.backend}/{target.precision}:\n  "
                          + "\n  ".join(report.failures) + f"\n  details: {out / 'parity.json'}; no manifest written",
                          rep)
    log(f"[export] parity passed: top-1 agreement {100 * report.top1_agreement:.2f}% over {report.images} images, "
        f"max |diff| {max(s['max_absdiff'] for s in report.outputs.values()):.2e}, "
        f"top-1 torch {report.torch_top1:.2f}% / engine {report.engine_top1:.2f}%")
    # latency with the same runner code as the LUT
    if target.backend == "ort-cpu":
        timer = make_runner("ort-cpu", onnx_path=src, threads=target.threads, opt_level=target.opt_level)
    else:
        timer = engine.runner(target, model, shape)
    with timer:
        t = timer.time(target.batch, warmup=cfg.profile.warmup, repeats=max(30, cfg.profile.repeats))
    predicted = lut.predict(plan) if (lut is not None and plan is not None) else None
    latency = {"batch": target.batch, "median_ms": t.median_ms, "p90_ms": t.p90_ms, "repeats": t.repeats,
               "predicted_ms": predicted,
               "images_per_s": 1000.0 * target.batch / t.median_ms}
    log(f"[export] latency at batch {target.batch}: median {t.median_ms:.3f} ms, p90 {t.p90_ms:.3f} ms"
        + (f" (LUT predicted {predicted:.3f} ms)" if predicted is not None else ""))
    artifacts = {"onnx": onnx_path, "parity": out / "parity.json"}
    if engine.path is not None:
        artifacts["engine"] = engine.path
    if src != onnx_path:
        artifacts["onnx_fp16"] = src
    for key, fname in (("student", "student.safetensors"), ("plan", "plan.json"), ("lut", "lut.json")):
        if (out / fname).is_file():
            artifacts[key] = out / fname
    n_params = sum(p.numel() for p in model.parameters())
    manifest = write_manifest(out, artifacts, parity=rep, signature=sig.to_dict(),
                              accuracy={"split": "test", "images": report.images, "torch_top1": report.torch_top1,
                                        "engine_top1": report.engine_top1},
                              latency=latency, config_hash=config_hash(cfg),
                              extra={"model": {"name": name, "params": n_params,
                                               "macs": plan.macs() if plan is not None else None},
                                     "engine_options": engine.options})
    log(f"[export] manifest {manifest}")
    return {"parity": rep, "latency": latency, "manifest": str(manifest), "params": n_params}
