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
