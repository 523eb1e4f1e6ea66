"""Latency lookup tables (LUTs): measured per-block latency on the target engine.

NViT ("Global Vision Transformer Pruning with Hessian-Aware Saliency", Yang et
al. 2023) regularises its search with a latency table measured on the target
GPU; HELP (Lee et al. 2021) shows layer-wise FLOPs rank architectures poorly.
vitrim measures the table itself, keys it by a :class:`DeviceSignature`, and
reports how well it predicts (``vitrim.profiling.validate``).

Model of latency (separable, as in DESIGN.md)::

    latency(plan) = shell(E) + k * (sum over kept blocks [attn(T_b, E, H, QK, V) + mlp(T_b, E, M) + b
                                                          + m * GMACs_b]
                                    + sum over token merges merge(T_in, E)) + c

* ``attn`` is a 5-D grid of ``x + attn(LN(x))`` micro-models, ``mlp`` a 3-D
  grid of ``x + mlp(LN(x))``, ``shell`` the stem + head (a CompactViT with no
  blocks), all net of a per-run ``x + b`` overhead model and multilinearly
  interpolated between grid points. ``T_b`` is the token count entering block b:
  the input's, unless a token merge (``plan.tokens``) before it shrank the grid.
  The token axis is the input count only unless the search merges tokens
  (``search.prune_tokens``); then it spans the counts the search can reach
  (:func:`token_axis`), the attention is interpolated along it by the quadratic
  through the three nearest points (its scores grow with ``T^2``), and ``merge`` (a
  :class:`~vitrim.pipeline.core.compact.TokenMerge` micro-model per token point)
  charges the merge itself. The shell is measured at the input count (its head
  reads the last grid; that part is small and not modelled).
* ``k``, ``b`` (``block_correction_ms``: what a block costs inside a model
  beyond its two halves), ``m`` (``block_gmac_ms``: compute weighing differently
  in context) and ``c`` are the composition, fitted on a dozen whole plans like
  the search's, timed bracketed by the teacher
  (:mod:`vitrim.profiling.calibrate`); their residuals are stored in the table.
* Whole-block micro-models at a few check points, interpolation probes (one
  micro-model between grid points per axis, and one at an off-axis token count)
  say where the grid is too coarse (``profile.<axis>_points``); the teacher
  timed against itself with one width 8 or 16 narrower says which width
  alignment the target runs fast (:attr:`LatencyTable.recommended_align`).

Building the table (micro-models, calibration, resumable partial files) is
:mod:`vitrim.profiling.build`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from vitrim.export.target import DeviceSignature, check_compatible
from vitrim.pipeline.core.config import ProfileConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.plan import Floors, Plan

_POINTS_KNOB = {"embed": "embed_points", "heads": "head_points", "qk": "qk_points", "v": "v_points", "tokens": "token_points",
                "mlp": "mlp_points"}
LUT_SCHEMA = 6  # 6: entries as ratios to a sentinel, per-token interpolation along the token axis, composition k/b/c chosen on bracketed whole plans; 5: token-count axis and merge entries; 4: calibrated composition (k, c) and probes; 3: composition factor; 2: entries net of the per-run overhead (null model), interleaved timing
DIMS = ("heads", "qk", "v", "mlp", "embed", "block", "merge")


GRID_ALIGN = 32


def _points(lo: int, hi: int, n: int, align: int) -> list[int]:
    """``n`` points from ``lo`` to ``hi`` (inclusive) on multiples of ``align``; n<=0: all."""
    lo, hi = max(1, lo), max(1, hi)
    if lo >= hi:
        return [hi]
    if n <= 0:
        pts = list(range(lo, hi + 1, align)) + [hi]
    elif n == 1:
        return [hi]
    else:
        # interior points of a wide axis on multiples of GRID_ALIGN: a width at 8 past a multiple of 16 ran
        # 3% of a whole DeiT-Small slower than its aligned neighbours on AVX-512 (issue 23), and a grid
        # point there would bend every interpolation around it
        step = (hi - lo) / max(1, n - 1)
        a = max(align, GRID_ALIGN) if step >= 2 * GRID_ALIGN else align
        pts = [hi, lo] + [int(round((lo + step * i) / a) * a) for i in range(1, n - 1)]
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


def block_gmacs(T: int, E: int, H: int, QK: int, V: int, M: int) -> float:
    """Multiply-accumulates of one block per image, in G (:func:`vitrim.pipeline.core.plan.block_macs`)."""
    from vitrim.pipeline.core.plan import block_macs

    return block_macs(T, E, H, QK, V, M) / 1e9


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
    """A measured LUT. Load with :meth:`load`; build with :func:`vitrim.profiling.build.build_lut`."""

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
    block_gmac_ms: float = 0.0  # m / k: ms per GMAC of a block (the composition's compute term, before k)

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
        """Multilinear interpolators over the widths; along the token axis the attention is interpolated by
        :meth:`attn_ms` (quadratic), the MLP and the merge linearly (both cost ``c + a T``)."""
        if getattr(self, "_fi", None) is None:
            g = self.grid
            self._fi = ([Interpolator([g.embed, g.heads, g.qk, g.v], self.attn[i]) for i in range(len(g.tokens))],
                        Interpolator([g.tokens, g.embed, g.mlp], self.mlp), Interpolator([g.embed], self.shell),
                        Interpolator([g.tokens, g.embed], self.merge))
        return self._fi

    def attn_ms(self, T: int, E: int, H: int, QK: int, V: int) -> float:
        """The attention half's table latency (net of the run overhead) at ``T`` tokens.

        With three or more token points, the quadratic through the three nearest of them: the scores and
        the weighted sum grow with ``T^2``, and linear interpolation between 57 and 197 tokens was 12% off
        at an off-axis count (a per-token linear fit fails the other way at a handful of tokens, where
        per-op overheads dominate). With two, linear."""
        per_T = self._interpolators()[0]
        pts = self.grid.tokens
        if len(pts) == 1:
            return per_T[0](E, H, QK, V)
        if len(pts) == 2:
            (t0, t1), (f0, f1) = pts, (per_T[0](E, H, QK, V), per_T[1](E, H, QK, V))
            return f0 + (f1 - f0) * (T - t0) / (t1 - t0)
        j = int(np.clip(np.searchsorted(pts, T) - 1, 0, len(pts) - 3))  # the three points around T
        xs = pts[j:j + 3]
        ys = [per_T[j + i](E, H, QK, V) for i in range(3)]
        out = 0.0
        for i in range(3):  # Lagrange form
            w = 1.0
            for m in range(3):
                if m != i:
                    w *= (T - xs[m]) / (xs[i] - xs[m])
            out += w * ys[i]
        return out

    def mlp_ms(self, T: int, E: int, M: int) -> float:
        """The MLP half's table latency (net of the run overhead) at ``T`` tokens."""
        return self._interpolators()[1](T, E, M)

    def block_ms(self, E: int, H: int, QK: int, V: int, M: int, T: Optional[int] = None) -> float:
        """One kept block's table latency at ``T`` tokens (default: the input count), before the composition's
        scale: both halves plus the fitted per-block term."""
        T = self.signature.tokens if T is None else T
        out = self.attn_ms(T, E, H, QK, V) + self.mlp_ms(T, E, M) + self.block_correction_ms
        return out + self.block_gmac_ms * block_gmacs(T, E, H, QK, V, M) if self.block_gmac_ms else out

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
                                "rebuild the LUT with search.prune_tokens: true or search.merges set (and search.max_merges covering the plan)")

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
                "block_correction_ms": self.block_correction_ms, "block_gmac_ms": self.block_gmac_ms,
                "compose": self.compose,
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
                            "rebuild it with `vitrim profile build CONFIG --rebuild` (or delete the file)")
        try:
            grid = Grid(**d["grid"])
            t = cls(signature=DeviceSignature.from_dict(d["signature"]), spec=d["spec"], grid=grid,
                    attn=np.asarray(d["attn_ms"], dtype=np.float64), mlp=np.asarray(d["mlp_ms"], dtype=np.float64),
                    shell=np.asarray(d["shell_ms"], dtype=np.float64),
                    merge=np.asarray(d["merge_ms"], dtype=np.float64),
                    block_correction_ms=float(d["block_correction_ms"]), compose=float(d["compose"]),
                    block_gmac_ms=float(d.get("block_gmac_ms", 0.0)),
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

    @property
    def recommended_align(self) -> Optional[int]:
        """The width alignment the build measured as fast on this target (None: not measured)."""
        return (self.meta.get("alignment") or {}).get("recommended")

    def summary(self) -> str:
        g = self.grid
        full = Plan.full(self.spec)
        lines = [f"LUT for {self.signature}", f"  key {self.signature.key()}",
                 f"  grid: tokens {g.tokens}, embed {g.embed}, heads {g.heads}, qk {g.qk}, v {g.v}, mlp {g.mlp}",
                 f"  entries: {self.grid.size()}  composition '{self.meta.get('compose_model', '?')}': "
                 f"k={self.compose:.3f}, per kept block {self.block_correction_ms:+.3f} ms and per GMAC "
                 f"{self.block_gmac_ms:+.3f} ms (before k), offset c={self.compose_offset_ms:+.3f} ms",
                 f"  teacher predicted: {self.predict(full):.3f} ms (shell {self.shell_ms(full.embed_dim):.3f} ms, "
                 f"block {self.block_ms(full.embed_dim, *full.blocks[0].dims):.3f} ms)"]
        if self.checks:
            errs = [abs(c["err_pct"]) for c in self.checks]
            lines.append(f"  whole-block checks: {len(errs)}, median |err| {np.median(errs):.1f}%, max {max(errs):.1f}%")
        if self.calibration:
            loo = self.meta.get("compose_loo_ratio_err_pct", {})
            lines.append(f"  calibration: {len(self.calibration)} whole plans timed in one run; composition "
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
        nz = self.meta.get("noise")
        if nz:
            lines.append(f"  build noise: entries' spread over their visits (MAD, % of the entry) median "
                         f"{nz['entry_spread_median_pct']:.1f}%, max {nz['entry_spread_max_pct']:.1f}%; "
                         + (f"{nz['measured_again']} entries above {nz['noisy_threshold_pct']:.0f}% measured again; "
                            if nz["noisy_threshold_pct"] else "no re-measuring (profile.remeasure_spread_pct 0); ")
                         + f"one entry in two chunks {nz['reproducibility_pct']:.1f}% apart")
        elif "reproducibility_pct" in self.meta:
            lines.append(f"  same entry measured twice: {self.meta['reproducibility_pct']:.1f}% apart")
        al = self.meta.get("alignment")
        if al and al.get("plans"):
            parts = [f"{r['axis']} -{r['step']}: {r['excess_pct']:+.1f}%" for r in al["plans"]]
            lines.append("  width alignment (the teacher with one width narrower, measured against the table's "
                         "line, % of the teacher): " + ", ".join(parts)
                         + f" -> widths on multiples of {al['recommended']} (search.align_from_lut)")
        if "build_s" in self.meta:
            ph, px = self.meta.get("phases_s") or {}, self.meta.get("plan_exports_s") or {}
            if not px:  # a table of the first builds that timed phases: their whole-plan exports were "<phase>_exports"
                old = {k: v for k, v in ph.items() if k.endswith("_exports") and k != "entry_exports"}
                px = {k[:-len("_exports")]: v for k, v in old.items()}
                ph = {k: v for k, v in ph.items() if k not in old}
            how = ", ".join(f"{k.replace('_', ' ')} {v:.0f}s" for k, v in ph.items())
            if px:  # the part of the whole-plan phases spent exporting (and opening sessions)
                how += "; whole-plan exports: " + ", ".join(f"{k} {v:.0f}s" for k, v in px.items())
            lines.append(f"  built in {self.meta['build_s']:.0f}s" + (f" ({how})" if how else ""))
        return "\n".join(lines)
