"""Latency lookup tables (LUTs): measured per-block latency on the target engine.

NViT ("Global Vision Transformer Pruning with Hessian-Aware Saliency", Yang et
al. 2023) regularises its search with a latency table measured on the target
GPU; HELP (Lee et al. 2021) shows layer-wise FLOPs rank architectures poorly.
vitrim measures the table itself, keys it by a :class:`DeviceSignature`, and
reports how well it predicts (``vitrim.profiling.validate``).

Model of latency (separable, as in DESIGN.md)::

    latency(plan) = shell(E) + k * (sum over kept blocks [attn(T_b, E, H, QK, V) + mlp(T_b, E, M) + c_b]
                                    + sum over token merges merge(T_in, E)) + c

* ``attn`` is a 5-D grid of ``x + attn(LN(x))`` micro-models, ``mlp`` a 3-D
  grid of ``x + mlp(LN(x))``, ``shell`` the stem + head (a CompactViT with no
  blocks), all multilinearly interpolated between grid points. ``T_b`` is the
  token count entering block b: the input's, unless a token merge
  (``plan.tokens``) before it shrank the grid. The token axis is the input count
  only unless the search merges tokens (``search.prune_tokens``); then it spans the
  counts the search can reach (:func:`token_axis`), and ``merge`` (a
  :class:`~vitrim.pipeline.core.compact.TokenMerge` micro-model per token point)
  charges the merge itself. The shell is measured at the input count (its head
  reads the last grid; that part is small and not modelled).
* ``c`` is the block correction: whole-block micro-models measured at check
  points minus the sum of their halves (it absorbs the per-run overhead that
  two half-models count twice). The check residuals are stored in the table.
* ``k`` and ``c`` are the composition: fitted by least squares to a few whole
  plans spread over the teacher's latency range, measured in the same session
  (:mod:`vitrim.profiling.calibrate`); their residuals are stored in the table.
* Interpolation probes: one micro-model between grid points per axis, so the
  table says which axis' grid is too coarse (``profile.<axis>_points``).

Measurement: each micro-model is exported with the same exporter as the real
model and timed on the target runner: warm-up, then interleaved rounds of
repeats (sessions kept open in small chunks so a burst of load on a shared
2-core CPU hits all entries alike), and the median of all samples is kept.
Partial results are saved after every chunk, so an interrupted build resumes.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vitrim.export.target import DeviceSignature, Target, check_compatible
from vitrim.pipeline.core.config import ProfileConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.plan import Floors, Plan

LUT_SCHEMA = 5  # 5: token-count axis and merge entries; 4: calibrated composition (k, c) and probes; 3: composition factor; 2: entries net of the per-run overhead (null model), interleaved timing
DIMS = ("heads", "qk", "v", "mlp", "embed", "block", "merge")


def _points(lo: int, hi: int, n: int, align: int) -> list[int]:
    """``n`` points from ``lo`` to ``hi`` (inclusive) on multiples of ``align``; n<=0: all."""
    lo, hi = max(1, lo), max(1, hi)
    if lo >= hi:
        return [hi]
    if n <= 0:
        pts = list(range(lo, hi + 1, align)) + [hi]
    else:
        pts = [hi] + [int(round((lo + (hi - lo) * i / (n - 1)) / align) * align) for i in range(n - 1)]
    return sorted({min(hi, max(lo, p)) for p in pts})


@dataclass
class Grid:
    embed: list[int]
    heads: list[int]
    qk: list[int]
    v: list[int]
    mlp: list[int]
    tokens: list[int] = field(default_factory=list)  # token counts (ascending); [] = the input count only

    @classmethod
    def for_spec(cls, spec: dict, pcfg: ProfileConfig, floors: Floors, align: int,
                 tokens: Optional[list[int]] = None) -> "Grid":
        """``tokens``: the token axis (:func:`token_axis`); None: the input count only."""
        E, H, hd, M = spec["embed_dim"], spec["num_heads"], spec["head_dim"], spec["mlp_hidden"]
        e_min = max(align, int(np.ceil(E / 4 / align)) * align)
        return cls(embed=_points(e_min, E, pcfg.embed_points, align),
                   heads=_points(floors.heads, H, pcfg.head_points, 1),
                   qk=_points(min(floors.qk, hd), hd, pcfg.qk_points, align),
                   v=_points(min(floors.v, hd), hd, pcfg.v_points, align),
                   mlp=_points(min(floors.mlp, M), M, pcfg.mlp_points, align),
                   tokens=sorted(tokens) if tokens else [Plan.full(spec).num_tokens])

    def size(self) -> dict:
        T = len(self.tokens) or 1
        return {"attn": T * len(self.embed) * len(self.heads) * len(self.qk) * len(self.v),
                "mlp": T * len(self.embed) * len(self.mlp), "shell": len(self.embed),
                "merge": (T - 1) * len(self.embed)}


def reachable_grids(spec: dict, max_merges: int) -> dict[tuple[int, int], int]:
    """Every patch grid at most ``max_merges`` token merges can reach -> the fewest merges reaching it."""
    from vitrim.pipeline.core.plan import MERGE_TYPES, merge_valid, merged_grid

    start = Plan.full(spec).grid
    seen, frontier = {start: 0}, [start]
    for depth in range(1, max_merges + 1):
        nxt = []
        for g in frontier:
            for kind in MERGE_TYPES:
                if merge_valid(g, kind):
                    g2 = merged_grid(g, kind)
                    if g2 not in seen:
                        seen[g2] = depth
                        nxt.append(g2)
        frontier = nxt
    return seen


def token_axis(spec: dict, points: int, max_merges: int) -> list[int]:
    """``points`` token counts (input count and the smallest reachable included, log-spaced between)
    out of those ``max_merges`` merges can reach: the LUT's token axis when the search merges tokens."""
    prefix = Plan.full(spec).num_prefix
    counts = sorted({h * w + prefix for h, w in reachable_grids(spec, max_merges)})
    if points <= 0 or len(counts) <= points:
        return counts
    lo, hi = np.log(counts[0]), np.log(counts[-1])
    picks = {counts[0], counts[-1]}
    for i in range(1, points - 1):
        target = np.exp(lo + (hi - lo) * i / (points - 1))
        picks.add(min((c for c in counts if c not in picks), key=lambda c: abs(np.log(c) - np.log(target))))
    return sorted(picks)


def merge_probe_grid(spec: dict, tokens: int, max_merges: int = 8) -> Optional[tuple[tuple[int, int], str]]:
    """A reachable grid with ``tokens`` tokens and the merge type that represents merging it (None: nothing to merge)."""
    from vitrim.pipeline.core.plan import merge_valid

    prefix = Plan.full(spec).num_prefix
    grids = sorted((g for g in reachable_grids(spec, max_merges) if g[0] * g[1] + prefix == tokens),
                   key=lambda g: abs(g[0] - g[1]))
    for g in grids:
        for kind in ("hw", "w", "h"):
            if merge_valid(g, kind):
                return g, kind
    return None


class Interpolator:
    """Multilinear interpolation over a grid (linear extrapolation outside it)."""

    def __init__(self, axes: list[list[int]], values: np.ndarray):
        from scipy.interpolate import RegularGridInterpolator

        pts = [np.asarray(a, dtype=np.float64) for a in axes]
        self.keep = [i for i, a in enumerate(pts) if len(a) > 1]  # singleton axes: nothing to interpolate
        vals = values.reshape([len(a) for a in pts])[tuple(slice(None) if i in self.keep else 0 for i in range(len(pts)))]
        self.const = float(vals) if not self.keep else None
        self.f = None if not self.keep else RegularGridInterpolator(
            [pts[i] for i in self.keep], vals, method="linear", bounds_error=False, fill_value=None)

    def __call__(self, *point: float) -> float:
        if self.f is None:
            return self.const
        return float(self.f([[point[i] for i in self.keep]])[0])


@dataclass
class LatencyTable:
    """A measured LUT. Load with :meth:`load`; build with :func:`build_lut`."""

    signature: DeviceSignature
    spec: dict
    grid: Grid
    attn: np.ndarray  # [T, E, H, QK, V] ms ([E, H, QK, V] accepted for a single token count)
    mlp: np.ndarray  # [T, E, M] ms ([E, M] accepted)
    shell: np.ndarray  # [E] ms
    block_correction_ms: float = 0.0
    compose: float = 1.0  # k: scale on the block sum
    compose_offset_ms: float = 0.0  # c: offset per whole model
    checks: list = field(default_factory=list)
    calibration: list = field(default_factory=list)  # whole plans measured at build time, with residuals
    probes: dict = field(default_factory=dict)  # axis -> interpolation error between grid points
    meta: dict = field(default_factory=dict)
    merge: Optional[np.ndarray] = None  # [T, E] ms of a token merge receiving T tokens (0 where T cannot merge)

    def __post_init__(self):
        if not self.grid.tokens:
            self.grid.tokens = [self.signature.tokens]
        T = len(self.grid.tokens)
        self.attn = np.asarray(self.attn, dtype=np.float64)
        self.mlp = np.asarray(self.mlp, dtype=np.float64)
        if self.attn.ndim == 4:
            self.attn = self.attn[None]
        if self.mlp.ndim == 2:
            self.mlp = self.mlp[None]
        if self.merge is None:
            self.merge = np.zeros((T, len(self.grid.embed)))
        self.merge = np.asarray(self.merge, dtype=np.float64)

    # -- prediction ----------------------------------------------------------
    def _interpolators(self):
        if getattr(self, "_fi", None) is None:
            g = self.grid
            self._fi = (Interpolator([g.tokens, g.embed, g.heads, g.qk, g.v], self.attn),
                        Interpolator([g.tokens, g.embed, g.mlp], self.mlp), Interpolator([g.embed], self.shell),
                        Interpolator([g.tokens, g.embed], self.merge))
        return self._fi

    def block_ms(self, E: int, H: int, QK: int, V: int, M: int, T: Optional[int] = None) -> float:
        """One kept block's table latency at ``T`` tokens (default: the input count)."""
        fa, fm, _, _ = self._interpolators()
        T = self.signature.tokens if T is None else T
        return fa(T, E, H, QK, V) + fm(T, E, M) + self.block_correction_ms

    def merge_ms(self, T: int, E: int) -> float:
        """A token merge receiving ``T`` tokens of width ``E``."""
        return self._interpolators()[3](T, E)

    def shell_ms(self, E: int) -> float:
        return self._interpolators()[2](E)

    def check_plan(self, plan: Plan) -> None:
        s = plan.spec
        for k in ("embed_dim", "num_heads", "head_dim", "mlp_hidden", "depth"):
            if s[k] != self.spec[k]:
                raise UserError("profile", f"the LUT was built for a teacher with {k}={self.spec[k]}, the plan's "
                                f"teacher has {k}={s[k]}", "build a LUT for this teacher (`vitrim profile build`)")
        if plan.num_tokens != self.signature.tokens:
            raise UserError("profile", f"the LUT was measured at {self.signature.tokens} tokens, the plan has "
                            f"{plan.num_tokens}", "build a LUT for this image/patch size")
        if plan.merges:
            lo = self.grid.tokens[0]
            if len(self.grid.tokens) < 2 or min(plan.block_tokens()) < lo:
                raise UserError("profile", f"the plan merges tokens down to {min(plan.block_tokens())} but the LUT's "
                                f"token axis is {self.grid.tokens}",
                                "rebuild the LUT with search.prune_tokens: true (and search.max_merges covering the plan)")

    def predict(self, plan: Plan, signature: Optional[DeviceSignature] = None) -> float:
        """Predicted latency of a plan in ms: shell(E) + k * (kept blocks + token merges) + c."""
        if signature is not None:
            check_compatible(self.signature, signature)
        self.check_plan(plan)
        return self._predict(plan, plan.embed_dim)

    def _predict(self, plan: Plan, E: int) -> float:
        return self.shell_ms(E) + self.compose * self.blocks_sum(plan, E) + self.compose_offset_ms

    def blocks_sum(self, plan: Plan, E: Optional[int] = None) -> float:
        """Sum of the kept blocks' and the token merges' table latencies (before the composition)."""
        E = plan.embed_dim if E is None else E
        n = sum(self.block_ms(E, *b.dims, T=t) for b, t in zip(plan.blocks, plan.block_tokens()) if b.keep)
        return n + sum(self.merge_ms(h * w + plan.num_prefix, E) for h, w in plan.merge_inputs().values())

    def marginal(self, plan: Plan, block: Optional[int], dim: str, groups: int = 1, group_size: int = 1,
                 merge_type: str = "hw") -> float:
        """Latency saved (ms) by removing ``groups`` groups of ``group_size`` units.

        ``dim`` is one of heads, qk, v, mlp (per block), embed (global; ``block``
        ignored), block (skip the whole block) or merge (a token merge of
        ``merge_type`` before ``block``: every later block sees fewer tokens, and
        the merge itself costs time).
        """
        if dim not in DIMS:
            raise UserError("search", f"unknown dim '{dim}'", f"use one of {', '.join(DIMS)}")
        E = plan.embed_dim
        if dim == "embed":
            return self._predict(plan, E) - self._predict(plan, E - groups * group_size)
        if dim == "merge":
            after = plan.copy().set_merges({**plan.merges, block: merge_type})
            after.validate()
            self.check_plan(after)
            return self._predict(plan, E) - self._predict(after, E)
        b = plan.blocks[block]
        if not b.keep:
            return 0.0
        dims = list(b.dims)
        T = plan.block_tokens()[block]
        cur = self.block_ms(E, *dims, T=T)
        if dim == "block":
            return self.compose * cur
        i = ("heads", "qk", "v", "mlp").index(dim)
        dims[i] -= groups * group_size
        return self.compose * (cur - self.block_ms(E, *dims, T=T))

    # -- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema": LUT_SCHEMA, "signature": self.signature.to_dict(), "key": self.signature.key(),
                "spec": self.spec, "grid": asdict(self.grid), "attn_ms": self.attn.tolist(),
                "mlp_ms": self.mlp.tolist(), "shell_ms": self.shell.tolist(), "merge_ms": self.merge.tolist(),
                "block_correction_ms": self.block_correction_ms, "compose": self.compose,
                "compose_offset_ms": self.compose_offset_ms, "checks": self.checks, "calibration": self.calibration,
                "probes": self.probes, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Optional[DeviceSignature] = None) -> "LatencyTable":
        from vitrim.pipeline.core.io import read_json

        p = Path(path)
        d = read_json(p, "profile", "LUT file", "build it (again) with `vitrim profile build CONFIG`")
        if not isinstance(d, dict) or d.get("schema") != LUT_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else None
            raise UserError("profile", f"LUT '{p}' has schema {got!r}; this vitrim reads schema {LUT_SCHEMA}",
                            "rebuild it with `vitrim profile build`")
        try:
            grid = Grid(**d["grid"])
            t = cls(signature=DeviceSignature.from_dict(d["signature"]), spec=d["spec"], grid=grid,
                    attn=np.asarray(d["attn_ms"], dtype=np.float64), mlp=np.asarray(d["mlp_ms"], dtype=np.float64),
                    shell=np.asarray(d["shell_ms"], dtype=np.float64),
                    merge=np.asarray(d["merge_ms"], dtype=np.float64),
                    block_correction_ms=float(d["block_correction_ms"]), compose=float(d["compose"]),
                    compose_offset_ms=float(d["compose_offset_ms"]), checks=d.get("checks", []),
                    calibration=d.get("calibration", []), probes=d.get("probes", {}), meta=d.get("meta", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError("profile", f"LUT '{p}' is malformed ({type(e).__name__}: {e})",
                            "delete it and rebuild with `vitrim profile build`") from None
        nt, ne = len(t.grid.tokens), len(grid.embed)
        want = (nt, ne, len(grid.heads), len(grid.qk), len(grid.v))
        if (t.attn.shape != want or t.mlp.shape != (nt, ne, len(grid.mlp)) or t.shell.shape != (ne,)
                or t.merge.shape != (nt, ne)):
            raise UserError("profile", f"LUT '{p}' tables do not match its grid", "delete it and rebuild")
        if not all(np.isfinite(a).all() for a in (t.attn, t.mlp, t.shell, t.merge)):
            raise UserError("profile", f"LUT '{p}' holds non-finite latencies", "delete it and rebuild")
        if expect is not None:
            check_compatible(t.signature, expect)
        return t

    def summary(self) -> str:
        g = self.grid
        full = Plan.full(self.spec)
        lines = [f"LUT for {self.signature}", f"  key {self.signature.key()}",
                 f"  grid: tokens {g.tokens}, embed {g.embed}, heads {g.heads}, qk {g.qk}, v {g.v}, mlp {g.mlp}",
                 f"  entries: {self.grid.size()}  block correction {self.block_correction_ms:+.3f} ms, "
                 f"composition k={self.compose:.3f}, offset c={self.compose_offset_ms:+.3f} ms",
                 f"  teacher predicted: {self.predict(full):.3f} ms (shell {self.shell_ms(full.embed_dim):.3f} ms, "
                 f"block {self.block_ms(full.embed_dim, *full.blocks[0].dims):.3f} ms)"]
        if self.checks:
            errs = [abs(c["err_pct"]) for c in self.checks]
            lines.append(f"  whole-block checks: {len(errs)}, median |err| {np.median(errs):.1f}%, max {max(errs):.1f}%")
        if self.calibration:
            loo = self.meta.get("compose_loo_ratio_err_pct", {})
            lines.append(f"  calibration: {len(self.calibration)} whole plans measured with the micro-models; composition "
                         f"'{self.meta.get('compose_model', '?')}' chosen by leave-one-out ratio error ("
                         + ", ".join(f"{k} {v:.1f}%" for k, v in loo.items()) + "); residuals after the fit:")
            lines.append("    share of teacher  measured ms  predicted ms  abs err  ratio err")
            for c in self.calibration:
                lines.append(f"    {c['measured_ratio']:16.1%}  {c['measured_ms']:11.3f}  {c['predicted_ms']:12.3f}  "
                             f"{c['err_pct']:+6.1f}%  {c['ratio_err_pct']:+8.1f}%")
        if self.probes:
            parts = [f"{a} {p['err_pct']:+.1f}%" for a, p in self.probes.items()]
            worst = max(self.probes, key=lambda a: abs(self.probes[a]["err_pct"]))
            lines.append("  interpolation probes between grid points (% of a full block): " + ", ".join(parts))
            lines.append(f"  largest remaining grid error: {worst} axis (denser grid: profile.{_POINTS_KNOB[worst]})")
        if "reproducibility_pct" in self.meta:
            lines.append(f"  same entry measured twice: {self.meta['reproducibility_pct']:.1f}% apart")
        if "build_s" in self.meta:
            lines.append(f"  built in {self.meta['build_s']:.0f}s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Measurement


_POINTS_KNOB = {"embed": "embed_points", "heads": "head_points", "qk": "qk_points", "v": "v_points",
                "mlp": "mlp_points"}


@dataclass
class Item:
    key: str
    kind: str  # attn | mlp | block | shell | null | plan | merge
    dims: tuple  # (E,) or (E, H, QK, V, M)
    plan: Optional[Plan] = None  # kind "plan": a whole model (calibration)
    tokens: Optional[int] = None  # token count of a [B, N, E] micro-model (None: the input's)
    merge: Optional[tuple] = None  # kind "merge": (grid, type)


def _make_item(item: Item, spec: dict, tokens: int):
    from vitrim.profiling.micro import make_merge, make_part, make_plan_model, sample_shape

    T = item.tokens or tokens
    if item.kind == "plan":
        return make_plan_model(item.plan), sample_shape("plan", spec, item.dims[0], T)
    if item.kind == "merge":
        return make_merge(spec, *item.merge), sample_shape("merge", spec, item.dims[0], T)
    return make_part(item.kind, spec, *item.dims), sample_shape(item.kind, spec, item.dims[0], T)


def _open_runner(item: Item, spec: dict, target: Target, tokens: int, workdir: Path):
    """Export the item's micro-model (and build its engine) and return a runner for it."""
    from vitrim.export.engine import runner_for_module

    model, shape = _make_item(item, spec, tokens)
    return runner_for_module(model, shape, target, workdir, item.key)


Opener = Callable[[Item, dict, Target, int, Path], "object"]


def measure_items(items: list[Item], spec: dict, target: Target, tokens: int, pcfg: ProfileConfig,
                  workdir: Path, done: dict, on_chunk: Callable[[dict], None], progress: bool = True,
                  chunk: int = 0, opener: Optional[Opener] = None) -> dict:
    """Time every item not already in ``done`` on the target; returns key -> timing dict.

    All micro-models of a chunk are exported first, then timed round-robin
    (:func:`vitrim.export.runners.time_interleaved`). ORT and torch sessions are small,
    so one chunk holds everything; TensorRT engines are built and timed 8 at a
    time, with the results saved after each chunk (builds are slow).
    """
    import gc

    from tqdm import tqdm

    from vitrim.export.runners import time_interleaved

    todo = [it for it in items if it.key not in done]
    chunk = chunk or (8 if target.backend == "tensorrt" else max(1, len(todo)))
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="[profile] LUT entries", disable=not progress)
    for c in range(0, len(todo), chunk):
        part = todo[c:c + chunk]
        runners = []
        for it in part:
            runners.append((opener or _open_runner)(it, spec, target, tokens, workdir))
            bar.update(0.5)
        gc.collect()
        for r in runners:
            r.activate()
        try:
            timings = time_interleaved(runners, target.batch, pcfg.repeats, pcfg.rounds, pcfg.warmup)
        finally:
            for r in runners:
                r.deactivate()
        for it, t in zip(part, timings):
            done[it.key] = {"median_ms": t.median_ms, "p90_ms": t.p90_ms, "n": t.repeats}
            bar.update(0.5)
        on_chunk(done)
    bar.close()
    return done


CALIB_MACS_RANGE = (0.12, 0.95)  # proxy range for the calibration plans (no table exists yet); lands ~30-100% of latency


def calibration_plans(spec: dict, grid: Grid, n: int, seed: int, align: int = 8) -> list[Plan]:
    """The teacher plus ``n - 1`` plans stratified by MACs (the proxy before any latency is known).

    Their measured share of the teacher's latency is stored with the residuals,
    so the range they actually cover is on record.
    """
    import random

    from vitrim.profiling.calibrate import stratified_plans

    full = Plan.full(spec)
    macs_full = full.macs()
    rng = random.Random(seed + 7919)  # not the validation plans' stream
    lo, hi = CALIB_MACS_RANGE
    plans = [full] + stratified_plans(spec, grid, max(0, n - 1), lo, hi, lambda p: p.macs() / macs_full, rng, align)
    if len(grid.tokens) > 1:  # a token axis: fit the composition on merged plans too
        plans += merged_calibration_plans(plans[: 1 + (n > 2)], grid.tokens[0])
    return plans


def merged_calibration_plans(plans: list[Plan], min_tokens: int) -> list[Plan]:
    """Each plan with one 'hw' merge a third of the way in, and with a second one two thirds in (where the
    token axis reaches that far)."""
    out = []
    for p in plans:
        depth = len(p.blocks)
        for merges in ({depth // 3: "hw"}, {depth // 3: "hw", (2 * depth) // 3: "hw"}):
            q = p.copy().set_merges(merges)
            try:
                q.validate()
            except UserError:
                continue
            if min(q.block_tokens()) >= min_tokens and q.to_dict() not in [o.to_dict() for o in out]:
                out.append(q)
    return out


def _probe_points(grid: Grid, spec: dict, align: int) -> dict:
    """Per axis, an aligned width inside the widest gap between grid points (None: no gap)."""
    out = {}
    for axis, step in (("embed", align), ("heads", 1), ("qk", align), ("v", align), ("mlp", align)):
        pts = getattr(grid, axis)
        gaps = sorted(zip(pts[:-1], pts[1:]), key=lambda ab: ab[0] - ab[1])  # widest first
        mid = None
        for a, b in gaps:
            cands = [x for x in range(a + 1, b) if x % step == 0]
            if cands:
                mid = min(cands, key=lambda x: abs(x - (a + b) / 2))
                break
        out[axis] = mid
    return out


def _tk(T: int, full: int) -> str:
    """Key suffix of a token count ('' at the input count, so single-axis keys stay as they were)."""
    return "" if T == full else f"_t{T}"


def lut_items(spec: dict, grid: Grid, pcfg: ProfileConfig, align: int = 8) -> tuple[list[Item], list[tuple]]:
    """Every micro-model a LUT needs (with calibration plans and probes), and the whole-block check dims."""
    g = grid
    M_full = spec["mlp_hidden"]
    Tf = Plan.full(spec).num_tokens
    items = [Item(f"shell_e{E}", "shell", (E,)) for E in g.embed]
    items += [Item(f"null_e{E}{_tk(T, Tf)}", "null", (E,), tokens=T) for T in g.tokens for E in g.embed]
    items += [Item(f"calib{i}", "plan", (p.embed_dim,), p)
              for i, p in enumerate(calibration_plans(spec, g, max(1, pcfg.calibration_plans), pcfg.seed, align))]
    items += [Item(f"attn_e{E}_h{H}_q{q}_v{v}{_tk(T, Tf)}", "attn", (E, H, q, v, M_full), tokens=T)
              for T, E, H, q, v in itertools.product(g.tokens, g.embed, g.heads, g.qk, g.v)]
    items += [Item(f"mlp_e{E}_m{M}{_tk(T, Tf)}", "mlp", (E, 1, 8, 8, M), tokens=T)
              for T, E, M in itertools.product(g.tokens, g.embed, g.mlp)]
    if len(g.tokens) > 1:
        for T in g.tokens:
            probe = merge_probe_grid(spec, T)
            if probe is not None:
                items += [Item(f"merge_e{E}_t{T}", "merge", (E,), tokens=T, merge=probe) for E in g.embed]
    rng = np.random.default_rng(pcfg.seed)
    check_dims = [(g.embed[-1], g.heads[-1], g.qk[-1], g.v[-1], g.mlp[-1])]
    for _ in range(200):  # distinct random checks
        if len(check_dims) >= max(1, pcfg.checks):
            break
        d = (int(rng.choice(g.embed)), int(rng.choice(g.heads)), int(rng.choice(g.qk)), int(rng.choice(g.v)),
             int(rng.choice(g.mlp)))
        if d not in check_dims:
            check_dims.append(d)
    items += [Item(_check_key(i, d), "block", d) for i, d in enumerate(check_dims)]
    # interpolation probes: one off-grid point per axis, the others at full width
    Ef, Hf, qf, vf, Mf = g.embed[-1], g.heads[-1], g.qk[-1], g.v[-1], g.mlp[-1]
    mids = _probe_points(g, spec, align)
    if mids["embed"] is not None:
        e = mids["embed"]
        items += [Item("probe_embed_attn", "attn", (e, Hf, qf, vf, M_full)), Item("probe_embed_mlp", "mlp", (e, 1, 8, 8, Mf)),
                  Item("probe_embed_null", "null", (e,))]
    for axis, i in (("heads", 1), ("qk", 2), ("v", 3)):
        if mids[axis] is not None:
            d = [Ef, Hf, qf, vf, M_full]
            d[i] = mids[axis]
            items.append(Item(f"probe_{axis}", "attn", tuple(d)))
    if mids["mlp"] is not None:
        items.append(Item("probe_mlp", "mlp", (Ef, 1, 8, 8, mids["mlp"])))
    # the same entry again, in its own session: how reproducible is one measurement?
    ref = next(it for it in items if it.kind == "attn" and it.dims[:4] == (g.embed[-1], g.heads[-1], g.qk[-1], g.v[-1]))
    items.append(Item("repeat_" + ref.key, ref.kind, ref.dims))
    return items, check_dims


def _check_key(i: int, d: tuple) -> str:
    return f"block{i}_e{d[0]}_h{d[1]}_q{d[2]}_v{d[3]}_m{d[4]}"


def _probes(table: "LatencyTable", items: list[Item], med: dict, null: dict) -> dict:
    """Interpolation error per axis at its probe point, in % of a full-width block."""
    fa, fm = (lambda *d: table._interpolators()[0](Tf, *d)), (lambda *d: table._interpolators()[1](Tf, *d))
    g = table.grid
    Tf = table.signature.tokens
    Ef = g.embed[-1]
    full_block = table.block_ms(Ef, g.heads[-1], g.qk[-1], g.v[-1], g.mlp[-1])
    by_key = {it.key: it for it in items}
    out = {}
    if "probe_embed_attn" in by_key:
        ea, em = by_key["probe_embed_attn"].dims, by_key["probe_embed_mlp"].dims
        n = med["probe_embed_null"]
        meas = (med["probe_embed_attn"] - n) + (med["probe_embed_mlp"] - n)
        pred = fa(*ea[:4]) + fm(em[0], em[4])
        out["embed"] = {"at": ea[0], "measured_ms": meas, "interpolated_ms": pred}
    for axis, i in (("heads", 1), ("qk", 2), ("v", 3)):
        k = f"probe_{axis}"
        if k in by_key:
            d = by_key[k].dims
            out[axis] = {"at": d[i], "measured_ms": med[k] - null[Ef], "interpolated_ms": fa(*d[:4])}
    if "probe_mlp" in by_key:
        d = by_key["probe_mlp"].dims
        out["mlp"] = {"at": d[4], "measured_ms": med["probe_mlp"] - null[Ef], "interpolated_ms": fm(d[0], d[4])}
    for v in out.values():
        v["err_pct"] = 100.0 * (v["interpolated_ms"] - v["measured_ms"]) / full_block
    return out


def assemble(sig: DeviceSignature, spec: dict, grid: Grid, med: dict, check_dims: list[tuple],
             items: list[Item]) -> LatencyTable:
    """Turn per-item medians (ms) into a table: net entries, block correction, calibrated composition."""
    from vitrim.profiling.calibrate import select_composition

    g = grid
    Tf = Plan.full(spec).num_tokens
    nulls = {(T, E): med[f"null_e{E}{_tk(T, Tf)}"] for T in g.tokens for E in g.embed}
    null = {E: nulls[(Tf, E)] for E in g.embed}
    # net of the per-run overhead: what the part adds inside a full model
    attn = np.array([med[f"attn_e{E}_h{H}_q{q}_v{v}{_tk(T, Tf)}"] - nulls[(T, E)]
                     for T, E, H, q, v in itertools.product(g.tokens, g.embed, g.heads, g.qk, g.v)])
    attn = attn.reshape(len(g.tokens), len(g.embed), len(g.heads), len(g.qk), len(g.v))
    mlp = np.array([med[f"mlp_e{E}_m{M}{_tk(T, Tf)}"] - nulls[(T, E)] for T, E, M in itertools.product(g.tokens, g.embed, g.mlp)])
    mlp = mlp.reshape(len(g.tokens), len(g.embed), len(g.mlp))
    merge = np.array([med[f"merge_e{E}_t{T}"] - nulls[(T, E)] if f"merge_e{E}_t{T}" in med else 0.0
                      for T, E in itertools.product(g.tokens, g.embed)]).reshape(len(g.tokens), len(g.embed))
    shell = np.array([med[f"shell_e{E}"] for E in g.embed])
    table = LatencyTable(sig, spec, grid, attn, mlp, shell, merge=merge)
    resid, checks = [], []
    for i, d in enumerate(check_dims):
        measured = med[_check_key(i, d)] - null[d[0]]
        halves = table.block_ms(*d)  # correction still 0 here
        resid.append(measured - halves)
        checks.append({"dims": list(d), "measured_ms": measured, "halves_ms": halves})
    table.block_correction_ms = float(np.median(resid))
    for c in checks:
        pred = table.block_ms(*c["dims"])
        c["predicted_ms"] = pred
        c["err_pct"] = 100.0 * (pred - c["measured_ms"]) / c["measured_ms"]
    table.checks = checks
    calib = [it for it in items if it.kind == "plan"]  # calib0 is the teacher
    plans = [it.plan for it in calib]
    meas = np.array([med[it.key] for it in calib])
    shells = np.array([table.shell_ms(p.embed_dim) for p in plans])
    sums = np.array([table.blocks_sum(p) for p in plans])
    table.compose, table.compose_offset_ms, model, loo = select_composition(shells, sums, meas)
    pred = np.array([table.predict(p) for p in plans])
    macs_full = Plan.full(spec).macs()
    table.calibration = [
        {"embed": p.embed_dim, "blocks": [list(d) for d in p.block_dims()], "tokens": p.tokens,
         "macs_fraction": p.macs() / macs_full,
         "measured_ms": float(m), "predicted_ms": float(q), "err_pct": 100.0 * (q / m - 1.0),
         "measured_ratio": float(m / meas[0]), "predicted_ratio": float(q / pred[0]),
         "ratio_err_pct": 100.0 * ((q / pred[0]) / (m / meas[0]) - 1.0)}
        for p, m, q in zip(plans, meas, pred)]
    table.probes = _probes(table, items, med, null)
    table.meta = {"null_ms": [[nulls[(T, E)] for E in g.embed] for T in g.tokens], "model_full_ms": float(meas[0]),
                  "compose_model": model,
                  "compose_loo_ratio_err_pct": loo}
    return table


def build_lut(spec: dict, target: Target, pcfg: ProfileConfig, floors: Floors, align: int, out_path: str | os.PathLike,
              progress: bool = True, log: Callable[[str], None] = print, opener: Optional[Opener] = None,
              tokens: Optional[list[int]] = None) -> LatencyTable:
    """Measure a LUT for ``spec`` on ``target`` and save it to ``out_path``.

    ``tokens``: the token axis (:func:`token_axis`, when the search merges tokens); None: the input count.
    Resumable: finished entries are kept in ``<out_path>.partial`` and reused
    when the build is restarted with the same signature and grid. ``opener``
    replaces the exporter-and-engine step that makes a runner per item (tests only).
    """
    t0 = time.time()
    n_tokens = Plan.full(spec).num_tokens
    sig = target.signature(n_tokens)
    align = max(align, target.align)
    grid = Grid.for_spec(spec, pcfg, floors, align, tokens)
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    header = {"signature": sig.to_dict(), "grid": asdict(grid), "spec": spec,
              "measure": {"warmup": pcfg.warmup, "repeats": pcfg.repeats, "rounds": pcfg.rounds,
                          "calibration_plans": pcfg.calibration_plans, "checks": pcfg.checks, "seed": pcfg.seed}}
    done: dict = {}
    if partial.is_file():
        try:
            prev = json.loads(partial.read_text())
            if prev.get("header") == json.loads(json.dumps(header)):
                done = prev["entries"]
                log(f"[profile] resuming: {len(done)} entries already measured in {partial}")
        except (json.JSONDecodeError, KeyError):
            pass
    items, check_dims = lut_items(spec, grid, pcfg, align)
    n_cal = sum(it.kind == "plan" for it in items)
    log(f"[profile] measuring {len(items)} micro-models ({n_cal} of them whole plans for calibration) on [{sig}]")
    with tempfile.TemporaryDirectory(prefix="vitrim-lut-") as tmp:
        measure_items(items, spec, target, n_tokens, pcfg, Path(tmp), done,
                      lambda d: atomic_write_json(partial, {"header": header, "entries": d}), progress=progress,
                      opener=opener)
    med = {k: v["median_ms"] for k, v in done.items()}
    table = assemble(sig, spec, grid, med, check_dims, items)
    ref = items[-1].key[len("repeat_"):]
    a, b = med[ref], med[items[-1].key]
    table.meta.update({"build_s": round(time.time() - t0, 1), "entries": len(items),
                       "reproducibility_pct": 100.0 * abs(a - b) / min(a, b), "repeat_entry": ref,
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       **header["measure"]})
    table.save(out_path)
    partial.unlink(missing_ok=True)
    cal = table.calibration
    log(f"[profile] LUT saved to {out_path} in {table.meta['build_s']:.0f}s; block correction "
        f"{table.block_correction_ms:+.3f} ms, composition k={table.compose:.3f} c={table.compose_offset_ms:+.3f} ms "
        f"fitted on {len(cal)} whole plans ({min(c['measured_ratio'] for c in cal):.0%}-100% of the teacher), "
        f"residuals " + ", ".join(f"{c['err_pct']:+.1f}%" for c in cal)
        + "; whole-block check errors " + ", ".join(f"{c['err_pct']:+.1f}%" for c in table.checks))
    return table
