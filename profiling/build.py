"""Building a latency table: micro-models timed on the target, calibrated on whole plans.

The table itself (what it stores, how it predicts) is :mod:`vitrim.profiling.table`;
this module measures it, in three phases:

1. **Entries.** Each micro-model is exported with the same exporter as the real
   model and timed on the target runner, a chunk at a time, every visit
   bracketed by visits of one *sentinel* micro-model
   (:func:`vitrim.export.runners.time_ratio_visits`). An entry is its median
   ratio to the sentinel, so the machine's speed, which drifts by tens of
   percent over minutes on a shared VM, cancels between chunks; the spread of
   the per-visit ratios is the entry's own noise, and noisy entries are measured
   again. Each chunk is saved atomically as it is timed: a killed build resumes.
2. **Alignment.** The teacher against itself with every MLP, or the embedding, 8
   narrower (and 16 narrower when 8 ran slow): which width alignment the target runs fast
   (:func:`alignment_verdict`).
3. **Composition.** With the entries known, the table picks whole plans like the
   search's (narrower embeddings, skipped blocks, irregular widths at the measured
   alignment, token merges where it has a token axis) spread over the teacher's
   latency by its own prediction, times them bracketed by the teacher in one run
   (the sentinel timed with them puts them in the entries' units), and fits the composition (:func:`vitrim.profiling.calibrate.select_composition`).
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vitrim.export.target import DeviceSignature, Target
from vitrim.pipeline.core.config import ProfileConfig
from vitrim.pipeline.core.io import atomic_write_json, make_dir, shared_use
from vitrim.pipeline.core.plan import Floors, Plan

from vitrim.profiling.micro import Item, make_item
from vitrim.profiling.table import LUT_SCHEMA, Grid, LatencyTable, block_gmacs, merge_probe_grid


def _open_runner(item: Item, spec: dict, target: Target, tokens: int, workdir: Path):
    """Export the item's micro-model (and build its engine) and return a runner for it."""
    from vitrim.export.engine import runner_for_module

    model, shape = make_item(item, spec, tokens)
    return runner_for_module(model, shape, target, workdir, item.key, reuse=True)


Opener = Callable[[Item, dict, Target, int, Path], "object"]

PARALLEL_MIN_ITEMS = 40  # a build with at least this many exports left runs them in worker processes
PARALLEL_MIN_PLANS = 8  # whole plans (5-8 s each at DeiT-Small) from this many on; fewer: the workers' start-up costs more


def _export_ahead(items: list[Item], spec: dict, target: Target, tokens: int, workdir: Path,
                  opener: Optional[Opener], log: Callable[[str], None]) -> None:
    """Export the items' ONNX files in worker processes (:mod:`vitrim.profiling.exporter`) when there are
    enough of them and the target runs ONNX; the runners then reuse the files."""
    from vitrim.profiling.exporter import export_parallel

    if opener is not None or not target.impl.parallel_export or len(items) < PARALLEL_MIN_ITEMS:
        return
    export_parallel([("item", it, spec, tokens, str(workdir / f"{it.key}.onnx")) for it in items], log)




def _spread_pct(visits: list[float]) -> float:
    """Median absolute deviation of the per-visit ratios, in % of their median: one entry's own noise."""
    v = np.asarray(visits, dtype=np.float64)
    med = float(np.median(v))
    return 100.0 * float(np.median(np.abs(v - med))) / med if med > 0 else float("inf")


def measure_items(items: list[Item], spec: dict, target: Target, tokens: int, pcfg: ProfileConfig,
                  workdir: Path, done: dict, on_chunk: Callable[[dict], None], progress: bool = True,
                  chunk: int = 0, opener: Optional[Opener] = None, sentinel: Optional[Item] = None) -> dict:
    """Time every item not already in ``done`` on the target; returns key -> entry dict.

    Items are exported (engines built) and timed a chunk at a time, each visit of
    an item bracketed by visits of the ``sentinel`` micro-model
    (:func:`vitrim.export.runners.time_ratio_visits`): an entry is stored as its
    ratio to the sentinel, so a slow stretch of minutes that hits one chunk and not
    the next cancels out, and the entry's spread over its visits is its own noise
    estimate. Entries noisier than ``profile.remeasure_spread_pct`` are measured again
    (once, with twice the rounds) and the quieter measurement kept. After every chunk
    ``on_chunk(done)`` saves the results, so a killed build loses one chunk at most.
    Without a sentinel, the first item left to measure brackets every chunk.
    """
    import gc

    from tqdm import tqdm

    from vitrim.export.runners import interleaved, time_ratio_visits

    todo = [it for it in items if it.key not in done]
    chunk = chunk or target.impl.entry_chunk  # micro-models per timing run; each chunk is saved when timed
    open_ = opener or _open_runner
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="[profile] LUT entries", disable=not progress)
    ref_item = sentinel or (todo[0] if todo else None)

    def timed(part: list[Item], rounds: int) -> list[dict]:
        ref = open_(ref_item, spec, target, tokens, workdir)
        runners = [ref] + [open_(it, spec, target, tokens, workdir) for it in part]
        gc.collect()
        with interleaved(runners):
            timings, visits = time_ratio_visits(runners, target.batch, pcfg.repeats * rounds // max(1, pcfg.rounds),
                                                rounds, pcfg.warmup, pcfg.min_visit_ms)
        out = []
        for t, v in zip(timings[1:], visits):
            out.append({"ratio": float(np.median(v)), "spread_pct": _spread_pct(v), "visits": len(v),
                        "median_ms": t.median_ms, "p90_ms": t.p90_ms, "n": t.repeats,
                        "sentinel_ms": timings[0].median_ms})
        return out

    for c in range(0, len(todo), chunk):
        part = todo[c:c + chunk]
        for it, e in zip(part, timed(part, pcfg.rounds)):
            done[it.key] = e
        bar.update(len(part))
        on_chunk(done)
    bar.close()
    limit = pcfg.remeasure_spread_pct or float("inf")
    noisy = [it for it in items if done[it.key].get("spread_pct", 0.0) > limit and not done[it.key].get("again")]
    for c in range(0, len(noisy), chunk):
        part = noisy[c:c + chunk]
        for it, e in zip(part, timed(part, 2 * max(1, pcfg.rounds))):
            old = done[it.key]
            keep = e if e["spread_pct"] < old["spread_pct"] else old
            done[it.key] = {**keep, "again": True, "first_spread_pct": old["spread_pct"]}
        on_chunk(done)
    return done


CALIB_RANGE = (0.25, 0.97)  # calibration plans: shares of the teacher's (provisional) table latency


def calibration_plans(table: LatencyTable, n: int, seed: int, align: int = 8) -> list[Plan]:
    """The teacher plus ``n - 1`` plans like the ones the search makes, stratified over ``CALIB_RANGE`` of the
    teacher by the table's own (not yet calibrated) prediction.

    Like the search's plans, they mix narrower embeddings, skipped blocks and irregular per-block widths
    (:func:`vitrim.profiling.calibrate.sized_plan`); where the table has a token axis, a third of them
    carry token merges. The validation plans are drawn from another random stream.
    """
    import random

    from vitrim.profiling.calibrate import plan_key, stratified_plans, with_random_merges

    spec, grid = table.spec, table.grid
    full = Plan.full(spec)
    t_full = table.predict(full)
    rng = random.Random(seed + 7919)  # not the validation plans' stream
    lo, hi = CALIB_RANGE
    m = max(0, n - 1)
    n_merged = max(1, m // 3) if len(grid.tokens) > 1 and m else 0
    plans = [full] + stratified_plans(spec, grid, m - n_merged, lo, hi, lambda p: table.predict(p) / t_full, rng, align)
    if n_merged:
        plans += stratified_plans(spec, grid, n_merged, lo, hi, lambda p: table.predict(p) / t_full, rng, align,
                                  exclude={plan_key(p) for p in plans},
                                  transform=lambda p, r: with_random_merges(p, r, grid.tokens[0]))
    return plans


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


ALIGN_STEPS = (8, 16)  # widths taken off the teacher's MLP and embedding to measure the target's alignment
ALIGN_TOL_PCT = 1.5  # a plan slower than the table's line by more than this (in % of the teacher) is misaligned


ALIGN_MIN_WIDTH = 256  # narrower axes are not probed (the embedded default's: alignment is a DeiT-scale effect)


def alignment_plans(spec: dict, steps: tuple[int, ...] = ALIGN_STEPS) -> list[tuple[str, int, Plan]]:
    """The teacher with every MLP, or the embedding, ``d`` narrower for d in ``steps``: whole models
    whose only difference from the teacher is a width off the teacher's (aligned) one. Axes of at most
    ``ALIGN_MIN_WIDTH`` are left out."""
    full, out = Plan.full(spec), []
    for d in steps:
        if spec["mlp_hidden"] > max(2 * d, ALIGN_MIN_WIDTH):
            p = full.copy()
            for b in p.blocks:
                b.mlp = b.mlp[:len(b.mlp) - d]
            out.append(("mlp", d, p))
        if spec["embed_dim"] > max(2 * d, ALIGN_MIN_WIDTH):
            p = full.copy()
            p.embed_keep = p.embed_keep[:len(p.embed_keep) - d]
            out.append(("embed", d, p))
    return out


def alignment_verdict(rows: list[dict], align: int, noise_pct: float = 0.0) -> dict:
    """The alignment the in-context measurement recommends: 32 when a width 16 off the teacher's is slower
    than the table's line, else 16 when a width 8 off is, else 8.
    "Slower" is by more than ``ALIGN_TOL_PCT`` and twice the run's own noise (the median spread of its visits)."""
    tol = max(ALIGN_TOL_PCT, 2.0 * noise_pct)
    slow = {r["step"] for r in rows if r["excess_pct"] > tol}
    rec = 32 if 16 in slow else 16 if 8 in slow else 8
    return {"tolerance_pct": tol, "plans": rows, "recommended": max(rec, align)}


def lut_items(spec: dict, grid: Grid, pcfg: ProfileConfig, align: int = 8) -> tuple[list[Item], list[tuple]]:
    """Every micro-model a LUT needs (with its checks and probes), and the whole-block check dims.

    The first item is the sentinel that brackets every other visit (:func:`measure_items`): the attention
    part at full width and the input's token count. Whole plans for the calibration are chosen once these
    are measured (:func:`calibration_plans`).
    """
    g = grid
    M_full = spec["mlp_hidden"]
    Tf = Plan.full(spec).num_tokens
    Ef, Hf, qf, vf, Mf = g.embed[-1], g.heads[-1], g.qk[-1], g.v[-1], g.mlp[-1]
    items = [Item(f"attn_e{Ef}_h{Hf}_q{qf}_v{vf}", "attn", (Ef, Hf, qf, vf, M_full), tokens=Tf)]
    items += [Item(f"shell_e{E}", "shell", (E,)) for E in g.embed]
    items += [Item(f"null_e{E}{_tk(T, Tf)}", "null", (E,), tokens=T) for T in g.tokens for E in g.embed]
    items += [Item(f"attn_e{E}_h{H}_q{q}_v{v}{_tk(T, Tf)}", "attn", (E, H, q, v, M_full), tokens=T)
              for T, E, H, q, v in itertools.product(g.tokens, g.embed, g.heads, g.qk, g.v)
              if (T, E, H, q, v) != (Tf, Ef, Hf, qf, vf)]
    items += [Item(f"mlp_e{E}_m{M}{_tk(T, Tf)}", "mlp", (E, 1, 8, 8, M), tokens=T)
              for T, E, M in itertools.product(g.tokens, g.embed, g.mlp)]
    if len(g.tokens) > 1:
        for T in g.tokens:
            probe = merge_probe_grid(spec, T)
            if probe is not None:
                items += [Item(f"merge_e{E}_t{T}", "merge", (E,), tokens=T, merge=probe) for E in g.embed]
    rng = np.random.default_rng(pcfg.seed)
    check_dims = [(Ef, Hf, qf, vf, Mf)]
    for _ in range(200):  # distinct random checks
        if len(check_dims) >= max(1, pcfg.checks):
            break
        d = (int(rng.choice(g.embed)), int(rng.choice(g.heads)), int(rng.choice(g.qk)), int(rng.choice(g.v)),
             int(rng.choice(g.mlp)))
        if d not in check_dims:
            check_dims.append(d)
    items += [Item(_check_key(i, d), "block", d) for i, d in enumerate(check_dims)]
    # interpolation probes: one off-grid point per axis, the others at full width
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
    if len(g.tokens) > 1:  # a token count between the two largest axis points: is T^2 interpolated right?
        T = int(round(np.sqrt(g.tokens[-2] * g.tokens[-1])))
        if T not in g.tokens:
            items += [Item("probe_tokens_attn", "attn", (Ef, Hf, qf, vf, M_full), tokens=T),
                      Item("probe_tokens_mlp", "mlp", (Ef, 1, 8, 8, Mf), tokens=T),
                      Item("probe_tokens_null", "null", (Ef,), tokens=T)]
    # an entry again, in another chunk: how reproducible is one measurement? (not the sentinel: its ratio to
    # itself is 1 by construction)
    mid = next((it for it in items if it.kind == "mlp" and it.dims[4] not in (g.mlp[0], g.mlp[-1])),
               next(it for it in items if it.kind == "mlp"))
    items.append(Item("repeat_" + mid.key, mid.kind, mid.dims, tokens=mid.tokens))
    return items, check_dims


def _check_key(i: int, d: tuple) -> str:
    return f"block{i}_e{d[0]}_h{d[1]}_q{d[2]}_v{d[3]}_m{d[4]}"


def _probes(table: "LatencyTable", items: list[Item], med: dict, null: dict) -> dict:
    """Interpolation error per axis at its probe point, in % of a full-width block at that token count."""
    g = table.grid
    Tf = table.signature.tokens
    Ef, Hf, qf, vf, Mf = g.embed[-1], g.heads[-1], g.qk[-1], g.v[-1], g.mlp[-1]
    by_key = {it.key: it for it in items}
    out = {}
    if "probe_embed_attn" in by_key:
        ea, em = by_key["probe_embed_attn"].dims, by_key["probe_embed_mlp"].dims
        n = med["probe_embed_null"]
        meas = (med["probe_embed_attn"] - n) + (med["probe_embed_mlp"] - n)
        pred = table.attn_ms(Tf, *ea[:4]) + table.mlp_ms(Tf, em[0], em[4])
        out["embed"] = {"at": ea[0], "measured_ms": meas, "interpolated_ms": pred}
    for axis, i in (("heads", 1), ("qk", 2), ("v", 3)):
        k = f"probe_{axis}"
        if k in by_key:
            d = by_key[k].dims
            out[axis] = {"at": d[i], "measured_ms": med[k] - null[Ef], "interpolated_ms": table.attn_ms(Tf, *d[:4])}
    if "probe_mlp" in by_key:
        d = by_key["probe_mlp"].dims
        out["mlp"] = {"at": d[4], "measured_ms": med["probe_mlp"] - null[Ef], "interpolated_ms": table.mlp_ms(Tf, d[0], d[4])}
    if "probe_tokens_attn" in by_key:
        T = by_key["probe_tokens_attn"].tokens
        n = med["probe_tokens_null"]
        meas = (med["probe_tokens_attn"] - n) + (med["probe_tokens_mlp"] - n)
        out["tokens"] = {"at": T, "measured_ms": meas,
                         "interpolated_ms": table.attn_ms(T, Ef, Hf, qf, vf) + table.mlp_ms(T, Ef, Mf)}
    for axis, v in out.items():
        T = v["at"] if axis == "tokens" else Tf
        block = table.attn_ms(T, Ef, Hf, qf, vf) + table.mlp_ms(T, Ef, Mf)
        v["err_pct"] = 100.0 * (v["interpolated_ms"] - v["measured_ms"]) / block if block > 0 else float("nan")
    return out


def entry_ms(done: dict) -> tuple[dict, float]:
    """Every entry in ms: its ratio to the sentinel times the sentinel's median over the build's chunks."""
    S = float(np.median([e["sentinel_ms"] for e in done.values()]))
    return {k: e["ratio"] * S for k, e in done.items()}, S


def assemble(sig: DeviceSignature, spec: dict, grid: Grid, med: dict, check_dims: list[tuple],
             items: list[Item]) -> LatencyTable:
    """Turn per-item latencies (ms) into a table of entries net of the per-run overhead: no composition yet
    (k = 1, no per-block or per-model term: :func:`calibrate` fits those on whole plans)."""
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
    table.checks = [{"dims": list(d), "measured_ms": med[_check_key(i, d)] - null[d[0]],
                     "halves_ms": table.block_ms(*d)} for i, d in enumerate(check_dims)]
    table.probes = _probes(table, items, med, null)
    table.meta = {"null_ms": [[nulls[(T, E)] for E in g.embed] for T in g.tokens]}
    return table


def calibrate(table: LatencyTable, plans: list[Plan], measured_ms: list[float]) -> LatencyTable:
    """Fit the composition (:func:`vitrim.profiling.calibrate.select_composition`) on whole plans measured
    in the entries' units (plan 0 the teacher), store the residuals and re-check the whole blocks."""
    from vitrim.profiling.calibrate import select_composition

    table.compose, table.block_correction_ms, table.compose_offset_ms, table.block_gmac_ms = 1.0, 0.0, 0.0, 0.0
    table._fi = None
    meas = np.asarray(measured_ms, dtype=np.float64)
    shells = np.array([table.shell_ms(p.embed_dim) for p in plans])
    sums = np.array([table.blocks_sum(p) for p in plans])
    kept = np.array([sum(b.keep for b in p.blocks) for p in plans], dtype=np.float64)
    gmacs = np.array([sum(block_gmacs(t, p.embed_dim, *b.dims) for b, t in zip(p.blocks, p.block_tokens()) if b.keep)
                      for p in plans])
    k, b, c, m, model, loo = select_composition(shells, sums, meas, kept, macs=gmacs)
    table.compose, table.compose_offset_ms = k, c
    table.block_correction_ms, table.block_gmac_ms = (b / k, m / k) if k else (0.0, 0.0)
    pred = np.array([table.predict(p) for p in plans])
    macs_full = Plan.full(table.spec).macs()
    table.calibration = [
        {"embed": p.embed_dim, "blocks": [list(d) for d in p.block_dims()], "tokens": p.tokens,
         "macs_fraction": p.macs() / macs_full,
         "measured_ms": float(m), "predicted_ms": float(q), "err_pct": 100.0 * (q / m - 1.0),
         "measured_ratio": float(m / meas[0]), "predicted_ratio": float(q / pred[0]),
         "ratio_err_pct": 100.0 * ((q / pred[0]) / (m / meas[0]) - 1.0)}
        for p, m, q in zip(plans, meas, pred)]
    for ch in table.checks:  # the whole-block micro-models against the calibrated block (diagnostic)
        ch["predicted_ms"] = table.compose * table.block_ms(*ch["dims"])
        ch["err_pct"] = 100.0 * (ch["predicted_ms"] - ch["measured_ms"]) / ch["measured_ms"]
    table.meta.update({"model_full_ms": float(meas[0]), "compose_model": model, "compose_loo_ratio_err_pct": loo})
    return table


def _noise(done: dict, items: list[Item], threshold: float) -> dict:
    """The build's own noise estimate: per-entry spread over visits, the entries measured again, and the
    same entry measured in two chunks."""
    spreads = [e["spread_pct"] for e in done.values()]
    ref = items[-1].key[len("repeat_"):]
    a, b = done[ref]["ratio"], done[items[-1].key]["ratio"]
    return {"entry_spread_median_pct": float(np.median(spreads)), "entry_spread_max_pct": float(np.max(spreads)),
            "noisy_threshold_pct": threshold, "measured_again": sum(bool(e.get("again")) for e in done.values()),
            "repeat_entry": ref, "reproducibility_pct": 100.0 * abs(a - b) / min(a, b)}


def build_lut(spec: dict, target: Target, pcfg: ProfileConfig, floors: Floors, align: int, out_path: str | os.PathLike,
              progress: bool = True, log: Callable[[str], None] = print, opener: Optional[Opener] = None,
              tokens: Optional[list[int]] = None) -> LatencyTable:
    """:func:`_build_lut` under a shared lock beside ``out_path``: builds of one table into one cache share its
    partial and parts, and only the last one to finish removes them."""
    out_path = Path(out_path)
    make_dir(out_path.parent, "profile")
    with shared_use(out_path.with_name(f".{out_path.name}.lock")) as alone:
        return _build_lut(spec, target, pcfg, floors, align, out_path, progress, log, opener, tokens, alone)


def _build_lut(spec: dict, target: Target, pcfg: ProfileConfig, floors: Floors, align: int, out_path: str | os.PathLike,
               progress: bool = True, log: Callable[[str], None] = print, opener: Optional[Opener] = None,
               tokens: Optional[list[int]] = None, alone: Callable[[], bool] = lambda: True) -> LatencyTable:
    """Measure a LUT for ``spec`` on ``target`` and save it to ``out_path``.

    ``tokens``: the token axis (:func:`token_axis`, when the search merges tokens); None: the input count.
    Resumable: every chunk of entries is saved atomically in ``<out_path>.partial`` as it is timed (the
    exported micro-models beside it in ``<out_path>.parts/``), and a build restarted with the same
    signature, grid and settings measures only what is missing. The calibration plans are timed in one run
    (their figures are ratios of that run) and saved together. ``opener`` replaces the exporter-and-engine
    step that makes a runner per item (tests only).
    """
    import shutil

    t0 = time.time()
    n_tokens = Plan.full(spec).num_tokens
    sig = target.signature(n_tokens)
    align = max(align, target.align)
    grid = Grid.for_spec(spec, pcfg, floors, align, tokens)
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    parts = out_path.with_name(out_path.name + ".parts")
    header = {"schema": LUT_SCHEMA, "signature": sig.to_dict(), "grid": asdict(grid), "spec": spec,
              "measure": {"warmup": pcfg.warmup, "repeats": pcfg.repeats, "rounds": pcfg.rounds,
                          "calibration_plans": pcfg.calibration_plans, "checks": pcfg.checks, "seed": pcfg.seed,
                          "align": align, "min_visit_ms": pcfg.min_visit_ms,
                          "remeasure_spread_pct": pcfg.remeasure_spread_pct}}
    state: dict = {"header": json.loads(json.dumps(header)), "entries": {}}
    resumed = False
    if partial.is_file():
        try:
            prev = json.loads(partial.read_text())
            if prev.get("header") == state["header"]:
                state, resumed = prev, True
                log(f"[profile] resuming: {len(state['entries'])} entries"
                    + (" and the calibration plans" if state.get("calibration") else "")
                    + f" already measured in {partial}")
        except (json.JSONDecodeError, KeyError, AttributeError):
            pass

    def save(_=None):
        atomic_write_json(partial, state)

    if not resumed:  # another build's partial and exports (another grid, teacher or settings): start afresh
        shutil.rmtree(parts, ignore_errors=True)
        save()  # before any export, so that a kill during the exports resumes with them
    make_dir(parts, "profile")

    items, check_dims = lut_items(spec, grid, pcfg, align)
    phases: dict = {}
    tp = time.time()

    def phase(name: str) -> None:  # wall seconds per phase of this run (a resumed run: its own part)
        nonlocal tp
        phases[name] = round(time.time() - tp, 1)
        tp = time.time()

    log(f"[profile] measuring {len(items)} micro-models on [{sig}], each visit bracketed by the sentinel "
        f"{items[0].key}")
    _export_ahead([it for it in items if it.key not in state["entries"]], spec, target, n_tokens, parts, opener, log)
    phase("entry_exports")
    measure_items(items, spec, target, n_tokens, pcfg, parts, state["entries"], save, progress=progress,
                  opener=opener, sentinel=items[0])
    phase("entries")
    med, S = entry_ms(state["entries"])
    table = assemble(sig, spec, grid, med, check_dims, items)
    # the target's width alignment, in context: the teacher against itself with one width 8 or 16 narrower
    # Step by step: a width 16 off the teacher's is probed only when one 8 off ran slow (a target on which
    # multiples of 8 run fast runs every multiple of 16 fast too), which saves two DeiT-Small plans.
    rows, spreads, plan_exports = [], [], {}
    teacher = Plan.full(spec)
    t_pred = table.predict(teacher)
    for d in [d for d in ALIGN_STEPS if d >= align]:
        probes = alignment_plans(spec, (d,))
        if not probes:
            break
        al = _timed_plans(state, f"alignment{d}", [teacher] + [p for *_, p in probes], items[0], spec, target,
                          n_tokens, pcfg, parts, opener, log, save)
        rows += [{"axis": axis, "step": d, "measured_ratio": r / al["ratios"][0],
                  "table_ratio": table.predict(p) / t_pred,
                  "excess_pct": 100.0 * ((r / al["ratios"][0]) / (table.predict(p) / t_pred) - 1.0)}
                 for (axis, _, p), r in zip(probes, al["ratios"][1:])]
        spreads += al["spreads"][1:]
        plan_exports["alignment"] = plan_exports.get("alignment", 0.0) + al["export_s"]
        if alignment_verdict(rows, align, float(np.median(spreads)))["recommended"] <= d:
            break  # width d off the teacher's ran no slower: a coarser step is not probed
    if rows:
        phase("alignment")
    alignment = alignment_verdict(rows, align, float(np.median(spreads)) if spreads else 0.0)
    # the composition, on plans like the search's at the alignment it will use
    plans = calibration_plans(table, max(1, pcfg.calibration_plans), pcfg.seed, alignment["recommended"])
    cal = _timed_plans(state, "calibration", plans, items[0], spec, target, n_tokens, pcfg, parts, opener, log, save)
    phase("calibration")
    plan_exports["calibration"] = cal["export_s"]
    table = calibrate(table, plans, [r * S for r in cal["ratios"]])  # in the entries' units
    table.meta["alignment"] = alignment
    table.meta.update({"build_s": round(time.time() - t0, 1), "phases_s": phases,
                       "plan_exports_s": plan_exports, "entries": len(items), "sentinel_ms": S,
                       "noise": _noise(state["entries"], items, pcfg.remeasure_spread_pct), "align": align,
                       "calibration_spread_pct": cal["spreads"],
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       **header["measure"]})
    table.meta["reproducibility_pct"] = table.meta["noise"]["reproducibility_pct"]
    table.save(out_path)
    if alone():  # another build of this table still uses the partial and the parts: it removes them
        partial.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    cal_rows = table.calibration
    log(f"[profile] LUT saved to {out_path} in {table.meta['build_s']:.0f}s; composition '{table.meta['compose_model']}' "
        f"k={table.compose:.3f}, per block {table.block_correction_ms:+.3f} ms, per model {table.compose_offset_ms:+.3f} ms, "
        f"fitted on {len(cal_rows)} whole plans ({min(c['measured_ratio'] for c in cal_rows):.0%}-100% of the teacher), "
        f"ratio residuals " + ", ".join(f"{c['ratio_err_pct']:+.1f}%" for c in cal_rows[1:])
        + f"; entry noise {table.meta['noise']['entry_spread_median_pct']:.1f}% median spread, "
        f"{table.meta['noise']['measured_again']} measured again")
    return table


def _plan_digest(p: Plan) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(p.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def _timed_plans(state: dict, what: str, plans: list[Plan], sentinel: Item, spec: dict, target: Target, tokens: int,
                 pcfg: ProfileConfig, workdir: Path, opener: Optional[Opener], log: Callable[[str], None],
                 save: Callable[[], None]) -> dict:
    """Whole plans (``plans[0]`` the teacher) timed in one run, each visit bracketed by the teacher, the
    protocol by which ``vitrim profile validate``, the closed loop and ``vitrim compare`` measure a plan's ratio:
    bracketing by the sentinel instead measured the same pair of plans 2.5% apart (0.906 against 0.930, and
    0.879 against 0.909, in back-to-back sessions), a bias every calibrated ratio would inherit. The sentinel
    is timed in the same run, so the figures (``ratios``) are in the entries' units: ratios to the sentinel.
    Saved in ``state[what]``; a resumed build reuses a run of the same plans, and times a run it lost whole
    again (its figures are ratios of one run)."""
    import gc

    from vitrim.export.runners import interleaved, time_ratio_visits

    keys = [json.dumps(p.to_dict(), sort_keys=True) for p in plans]
    got = state.get(what)
    if got and got.get("plans") == keys:
        return {**got, "export_s": 0.0}  # timed by an earlier run of a resumed build: no export in this one
    open_ = opener or _open_runner
    log(f"[profile] timing {len(plans)} whole plans ({what}), each visit bracketed by the teacher")
    items = [Item(f"plan_{_plan_digest(p)}", "plan", (p.embed_dim,), p) for p in plans]
    tx = time.time()
    if opener is None and target.impl.parallel_export and len(items) >= PARALLEL_MIN_PLANS:
        from vitrim.profiling.exporter import export_parallel

        export_parallel([("item", it, spec, tokens, str(workdir / f"{it.key}.onnx")) for it in items], log)
    runners = [open_(it, spec, target, tokens, workdir) for it in [items[0], sentinel] + items[1:]]
    export_s = round(time.time() - tx, 1)
    gc.collect()
    with interleaved(runners):
        _, visits = time_ratio_visits(runners, target.batch, pcfg.repeats, pcfg.rounds, pcfg.warmup, pcfg.min_visit_ms)
    to_teacher = [float(np.median(v)) for v in visits]  # sentinel, then plans[1:], each over the teacher
    r_s = to_teacher[0]
    state[what] = {"plans": keys, "ratios": [1.0 / r_s] + [r / r_s for r in to_teacher[1:]],
                   "to_teacher": [1.0] + to_teacher[1:], "spreads": [0.0] + [_spread_pct(v) for v in visits[1:]],
                   "sentinel_spread_pct": _spread_pct(visits[0]), "export_s": export_s}
    save()
    return state[what]
