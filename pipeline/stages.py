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
from pipeline.plan import Floors


def floors(cfg: RunConfig) -> Floors:
    s = cfg.search
    return Floors(heads=s.min_heads, qk=s.min_qk, v=s.min_v, mlp=s.min_mlp)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]


def lut_path(cfg: RunConfig, spec: dict, target: Target) -> Path:
    if cfg.profile.lut:
        return Path(cfg.profile.lut)
    from pipeline.plan import Plan

    sig = target.signature(Plan.full(spec).num_tokens)
    return Path(cfg.cache_dir) / f"lut-{sig.key()}-{spec_hash(spec)}.json"


def stage_profile(cfg: RunConfig, spec: dict, rebuild: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print):
    """Reuse a LUT whose signature matches this target and teacher, else build one."""
    from profiling.lut import LatencyTable, build_lut

    target = Target.from_config(cfg.target)
    path = lut_path(cfg, spec, target)
    from pipeline.plan import Plan

    want = target.signature(Plan.full(spec).num_tokens)
    if path.is_file() and not rebuild:
        lut = LatencyTable.load(path, expect=want)
        if lut.spec != spec:
            if cfg.profile.lut:
                raise UserError("profile", f"LUT '{path}' was built for another teacher", "set profile.lut to null to build one")
        else:
            log(f"[profile] reusing LUT {path} ({want.key()})")
            return lut, path
    lut = build_lut(spec, target, cfg.profile, floors(cfg), cfg.search.align, path, progress=progress, log=log)
    return lut, path


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
    res.plan.spec = dict(lut.spec)
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
