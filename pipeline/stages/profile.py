"""The profile stage: reuse the latency table (LUT) that matches this target and teacher, or build one.

The measuring itself is :mod:`vitrim.profiling.build`; this stage decides where the
table lives, whether a cached one is stale, and finds one for ``vitrim export``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

from vitrim.export.target import Target
from vitrim.pipeline.core.config import RunConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import Floors, Plan


def lut_tokens(cfg: RunConfig, spec: dict) -> Optional[list[int]]:
    """The LUT's token axis: the counts token merges reach when plans merge tokens (searched, ``search.prune_tokens``,
    or fixed, ``search.merges``), else None (input only)."""
    from vitrim.profiling.table import token_axis

    s = cfg.search
    if not (s.prune_tokens or s.merges):
        return None
    axis = token_axis(spec, cfg.profile.token_points, max(s.max_merges if s.prune_tokens else 0, len(s.merges or [])))
    if s.merges:  # the counts the fixed merges give are measured, not interpolated
        from vitrim.pipeline.search import fixed_merge_plan

        axis = sorted(set(axis) | set(fixed_merge_plan(spec, s).block_tokens()))
    return axis


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]


def lut_path(cfg: RunConfig, spec: dict, target: Target) -> Path:
    if cfg.profile.lut:
        return Path(cfg.profile.lut)
    sig = target.signature(Plan.full(spec).num_tokens)
    axis = lut_tokens(cfg, spec)  # a token axis is its own table: toggling prune_tokens does not evict the other
    tok = "" if axis is None else "-tok" + "_".join(map(str, axis))
    return Path(cfg.cache_dir) / f"lut-{sig.key()}-{spec_hash(spec)}{tok}.json"


def stage_profile(cfg: RunConfig, spec: dict, rebuild: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print):
    """Reuse a LUT whose signature matches this target and teacher, else build one."""
    from vitrim.profiling.table import LatencyTable
    from vitrim.profiling.build import build_lut

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
    lut = build_lut(spec, target, cfg.profile, Floors.from_config(cfg.search), cfg.search.align, path, progress=progress, log=log,
                    tokens=lut_tokens(cfg, spec))
    return lut, path


def _stale_reason(path: Path, cfg: RunConfig, spec: dict, target: Target, want) -> Optional[str]:
    """Why a cached LUT no longer fits the config (None when it does)."""
    from dataclasses import asdict

    from vitrim.profiling.table import Grid, LatencyTable

    try:
        lut = LatencyTable.load(path, expect=want)
    except UserError as e:
        return e.what
    if lut.spec != spec:
        return "built for another teacher"
    grid = Grid.for_spec(spec, cfg.profile, Floors.from_config(cfg.search), max(cfg.search.align, target.align), lut_tokens(cfg, spec))
    if asdict(lut.grid) != asdict(grid):
        return "the profile grid settings changed"
    m = lut.meta
    if (m.get("warmup"), m.get("repeats"), m.get("rounds")) != (cfg.profile.warmup, cfg.profile.repeats, cfg.profile.rounds):
        return "the measurement settings changed"
    if (m.get("calibration_plans"), m.get("checks")) != (cfg.profile.calibration_plans, cfg.profile.checks):  # issue 14
        return "the calibration settings changed"
    return None


def find_lut(cfg: RunConfig, spec: dict, build: bool = False, log: Callable[[str], None] = print):
    """The matching LUT (built when ``build``), or None with a note when there is none."""
    from vitrim.profiling.table import LatencyTable

    target = Target.from_config(cfg.target)
    if build:
        lut, path = stage_profile(cfg, spec, log=log)
    else:
        path = lut_path(cfg, spec, target)
        if not path.is_file():
            log(f"[export] no LUT at {path}: the manifest will have no predicted latency (use --profile to build one)")
            return None
        lut = LatencyTable.load(path, expect=target.signature(Plan.full(spec).num_tokens))
    lut.path = path
    return lut
