"""Building a latency table: micro-models timed on the target, calibrated on whole plans.

The table itself (what it stores, how it predicts) is :mod:`vitrim.profiling.table`;
this module measures it. Each micro-model is exported with the same exporter as
the real model and timed on the target runner: warm-up, then interleaved rounds of
repeats (:func:`vitrim.export.runners.interleaved`), so a burst of load on a shared
CPU hits all entries alike; the median of all samples is kept. Partial results are
saved after every chunk, so an interrupted build resumes.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vitrim.export.target import DeviceSignature, Target
from vitrim.pipeline.core.config import ProfileConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.plan import Floors, Plan

from vitrim.profiling.table import (LatencyTable, Grid, merge_probe_grid)


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

    from vitrim.export.runners import interleaved, time_interleaved

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
        with interleaved(runners):
            timings = time_interleaved(runners, target.batch, pcfg.repeats, pcfg.rounds, pcfg.warmup)
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
