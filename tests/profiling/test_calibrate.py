"""Calibration of the composition, stratified held-out plans, and the documented error statistics."""

import numpy as np
import pytest

from vitrim.export.runners import Runner
from vitrim.export.target import Target
from vitrim.pipeline.core.config import ProfileConfig
from vitrim.pipeline.core.plan import Floors, Plan
from vitrim.profiling.calibrate import error_stats, fit_composition
from vitrim.profiling.table import LatencyTable
from tests.conftest import TINY_PCFG

# the planted truth: multilinear per axis, so the LUT's interpolation reproduces it exactly
K, C, CB = 1.3, 0.7, 0.03


def _null(E):
    return 0.2 + 0.001 * E


def _attn(E, H, q, v):
    return 0.01 + 1e-4 * E * H * (q + v)


def _mlp(E, M):
    return 0.02 + 2e-5 * E * M


def _truth(item) -> float:
    d = item.dims
    if item.kind == "shell":
        return 0.5 + 0.01 * d[0]
    if item.kind == "null":
        return _null(d[0])
    if item.kind == "attn":
        return _null(d[0]) + _attn(*d[:4])
    if item.kind == "mlp":
        return _null(d[0]) + _mlp(d[0], d[4])
    if item.kind == "block":
        return _null(d[0]) + _attn(*d[:4]) + _mlp(d[0], d[4]) + CB
    p = item.plan  # a whole plan: shell + K * blocks + C
    E = p.embed_dim
    return 0.5 + 0.01 * E + K * sum(_attn(E, H, q, v) + _mlp(E, M) + CB for H, q, v, M in
                                    (b.dims for b in p.blocks if b.keep)) + C


class KnownLatencyRunner(Runner):
    """A fake runner whose latency is a known function of the item's dims (this test only)."""

    def __init__(self, ms: float):
        self.ms = ms

    def _prepare(self, batch, seed=0):
        pass

    def _run_once(self) -> float:
        return self.ms


def test_calibration_recovers_planted_scale_and_offset(tiny_spec, tmp_path):
    from vitrim.profiling.build import build_lut

    pcfg = ProfileConfig(**{**TINY_PCFG, "qk_points": 2, "v_points": 2, "calibration_plans": 10})
    seen = []

    def opener(item, spec, target, tokens, workdir):
        seen.append(item.kind)
        return KnownLatencyRunner(_truth(item))

    lut = build_lut(tiny_spec, Target(batch=4, threads=1), pcfg, Floors(), 8, tmp_path / "lut.json", progress=False,
                    log=lambda s: None, opener=opener)
    from vitrim.profiling.build import alignment_plans

    assert not alignment_plans(tiny_spec)  # too narrow to probe
    assert seen.count("plan") == 10 and seen.count("block") == 2 and lut.recommended_align == 8
    assert lut.compose == pytest.approx(K, abs=1e-9)
    assert lut.compose_offset_ms == pytest.approx(C, abs=1e-9)
    assert lut.block_correction_ms == pytest.approx(CB, abs=1e-12)
    assert len(lut.calibration) == 10 and all(abs(c["err_pct"]) < 1e-7 for c in lut.calibration)
    assert lut.calibration[0]["measured_ratio"] == 1.0 and len({c["embed"] for c in lut.calibration}) >= 2
    assert set(lut.probes) >= {"embed", "mlp"} and all(abs(p["err_pct"]) < 1e-7 for p in lut.probes.values())
    # stored and shown
    again = LatencyTable.load(tmp_path / "lut.json")
    assert again.compose_offset_ms == lut.compose_offset_ms and again.calibration == lut.calibration
    text = again.summary()
    assert "offset c=+0.700 ms" in text and "calibration: 10 whole plans" in text and "largest remaining grid error" in text
    ph, px = again.meta["phases_s"], again.meta["plan_exports_s"]  # where the build's time went, shown with it
    assert {"entry_exports", "entries", "calibration"} <= set(ph) and "calibration" in px and "alignment" not in ph
    assert all(v >= 0 for v in [*ph.values(), *px.values()]) and "(entry exports " in text
    assert "whole-plan exports: calibration" in text


def test_alignment_is_measured_in_context_and_steers_the_search(tiny_spec, tmp_path, monkeypatch):
    """Planted: a whole model with a width off a multiple of 16 runs 6% slower (as an MLP 8 narrower than
    DeiT-Small's did on AVX-512); the build recommends 16 and the search raises its alignment to it."""
    from vitrim.pipeline.core.config import SearchConfig
    from vitrim.pipeline.search import measured_align
    from vitrim.profiling import build
    from vitrim.profiling.build import build_lut

    monkeypatch.setattr(build, "ALIGN_MIN_WIDTH", 0)  # probe the tiny teacher's widths too
    pcfg = ProfileConfig(**{**TINY_PCFG, "qk_points": 2, "v_points": 2, "calibration_plans": 10})

    def slow_off_16(item):
        ms = _truth(item)
        if item.kind == "plan":
            p = item.plan
            if p.embed_dim % 16 or any(b.keep and b.dims[3] % 16 for b in p.blocks):
                ms *= 1.06
        return ms

    lut = build_lut(tiny_spec, Target(batch=4, threads=1), pcfg, Floors(), 8, tmp_path / "lut.json", progress=False,
                    log=lambda s: None, opener=lambda item, *a: KnownLatencyRunner(slow_off_16(item)))
    al = lut.meta["alignment"]
    assert lut.recommended_align == 16 and {r["step"] for r in al["plans"] if r["excess_pct"] > 5} == {8}
    assert {r["step"] for r in al["plans"]} == {8, 16}  # 8 ran slow: 16 was probed
    assert measured_align(SearchConfig(), lut, log=lambda s: None).align == 16
    assert measured_align(SearchConfig(align_from_lut=False), lut, log=lambda s: None).align == 8
    # calibration plans drawn at the measured alignment (the grid's floor aside)
    assert all(c["embed"] % 16 == 0 or c["embed"] == lut.grid.embed[0] for c in lut.calibration)
    assert "widths on multiples of 16" in lut.summary()


def test_a_width_16_off_is_probed_only_when_8_off_ran_slow(tiny_spec, tmp_path, monkeypatch):
    from vitrim.profiling import build
    from vitrim.profiling.build import build_lut

    monkeypatch.setattr(build, "ALIGN_MIN_WIDTH", 0)
    pcfg = ProfileConfig(**{**TINY_PCFG, "qk_points": 2, "v_points": 2, "calibration_plans": 3})

    def on_the_line(item):  # whole plans exactly as the uncalibrated table sums them: no width runs slow
        if item.kind != "plan":
            return _truth(item)
        p = item.plan
        E = p.embed_dim
        return 0.5 + 0.01 * E + sum(_attn(E, H, q, v) + _mlp(E, M) for H, q, v, M in (b.dims for b in p.blocks
                                                                                          if b.keep))

    lut = build_lut(tiny_spec, Target(batch=4, threads=1), pcfg, Floors(), 8, tmp_path / "lut.json", progress=False,
                    log=lambda s: None, opener=lambda item, *a: KnownLatencyRunner(on_the_line(item)))
    al = lut.meta["alignment"]["plans"]
    assert lut.recommended_align == 8 and {r["step"] for r in al} == {8} and len(al) == 2


def test_a_compute_term_is_recovered_and_priced_per_block(tiny_spec, tmp_path):
    """Planted: whole plans cost shell + K * blocks + MC * GMACs + C (compute weighing more in context than in
    the micro-models); the build keeps the compute term, and the table prices it in every block it predicts."""
    from vitrim.pipeline.core.plan import block_macs
    from vitrim.profiling.build import build_lut

    MC = 800.0  # ms per GMAC

    def truth(item):
        if item.kind != "plan":
            return _truth(item) - (CB if item.kind == "block" else 0.0)
        p = item.plan
        E = p.embed_dim
        kept = [(b.dims, t) for b, t in zip(p.blocks, p.block_tokens()) if b.keep]
        return (0.5 + 0.01 * E + K * sum(_attn(E, H, q, v) + _mlp(E, M) for (H, q, v, M), _ in kept)
                + MC * sum(block_macs(t, E, *d) for d, t in kept) / 1e9 + C)

    pcfg = ProfileConfig(**{**TINY_PCFG, "qk_points": 2, "v_points": 2, "calibration_plans": 10})
    lut = build_lut(tiny_spec, Target(batch=4, threads=1), pcfg, Floors(), 8, tmp_path / "lut.json", progress=False,
                    log=lambda s: None, opener=lambda item, *a: KnownLatencyRunner(truth(item)))
    assert lut.meta["compose_model"] == "k+m+c"
    assert lut.compose == pytest.approx(K, rel=1e-6) and lut.compose * lut.block_gmac_ms == pytest.approx(MC, rel=1e-6)
    assert lut.compose_offset_ms == pytest.approx(C, abs=1e-6) and lut.block_correction_ms == 0.0
    full = Plan.full(tiny_spec)
    half = full.copy()
    half.blocks[1].mlp = half.blocks[1].mlp[:16]
    for p in (full, half):  # any plan, not only the calibration ones
        assert lut.predict(p) == pytest.approx(truth(type("I", (), {"kind": "plan", "plan": p})()), rel=1e-6)
    assert lut.marginal(full, 1, "mlp", 1, 48) == pytest.approx(lut.predict(full) - lut.predict(half), rel=1e-9)
    again = LatencyTable.load(tmp_path / "lut.json")
    assert again.block_gmac_ms == lut.block_gmac_ms and again.predict(half) == lut.predict(half)


def test_fit_composition_without_offset_information():
    k, b, c, m = fit_composition(np.array([1.0]), np.array([4.0]), np.array([9.0]), np.array([2.0]), ("k", "b", "c"))
    assert (k, b, c, m) == (pytest.approx(2.0), 0.0, 0.0, 0.0)  # one plan identifies the scale alone


def test_error_stats_on_a_hand_made_table():
    # teacher predicted 10 ms, measured 20 ms (the machine drifted 2x since the build)
    pred = [10.0, 5.0, 3.0, 8.0]
    meas = [20.0, 10.0, 6.6, 14.0]
    st = error_stats(pred, meas, teacher=0)
    # ratios: predicted .5 .3 .8; measured .5 .33 .7 -> errors 0%, -9.09%, +14.29%
    assert st["ratio_err_pct"] == pytest.approx([0.0, 0.0, 100 * (0.3 / 0.33 - 1), 100 * (0.8 / 0.7 - 1)])
    r = st["ratio"]
    assert r["n"] == 3
    assert r["median_abs_err_pct"] == pytest.approx(100 * (1 - 0.3 / 0.33))
    assert r["max_abs_err_pct"] == pytest.approx(100 * (0.8 / 0.7 - 1))
    assert r["within_5_pct"] == pytest.approx(1 / 3) and r["within_10_pct"] == pytest.approx(2 / 3)
    assert r["spearman"] == pytest.approx(1.0)
    d = st["drift"]
    assert d["teacher_predicted_ms"] == 10.0 and d["teacher_measured_ms"] == 20.0 and d["teacher_err_pct"] == -50.0
    assert st["abs_err_pct"] == pytest.approx([-50.0, -50.0, 100 * (3 / 6.6 - 1), 100 * (8 / 14 - 1)])
    assert d["median_abs_err_pct"] == pytest.approx(50.0)


def test_stratified_validation_plans_fall_in_the_requested_range(tiny_lut):
    from vitrim.profiling.validate import validation_plans

    import copy
    import itertools

    lut = copy.deepcopy(tiny_lut[0])  # the measured table's grid and calibration, with planted entries: the
    g = lut.grid                      # strata then do not depend on what this CPU measured
    lut.attn = np.array([_attn(E, H, q, v) for _, E, H, q, v in itertools.product(g.tokens, g.embed, g.heads, g.qk, g.v)]
                        ).reshape(lut.attn.shape)
    lut.mlp = np.array([_mlp(E, M) for _, E, M in itertools.product(g.tokens, g.embed, g.mlp)]).reshape(lut.mlp.shape)
    lut.shell = np.array([0.05 + 0.001 * E for E in g.embed])
    lut.compose, lut.block_correction_ms, lut.compose_offset_ms, lut._fi = 1.0, 0.0, 0.0, None
    lut.calibration = lut.calibration[:2]  # the teacher and one plan held out: the tiny space has few plans
    t = lut.predict(Plan.full(lut.spec))
    # the tiny teacher (depth 2) cannot go far below its smallest plan: ask for a range starting above it
    from vitrim.pipeline.search import floor_plan

    smallest = lut.predict(floor_plan(lut.spec, Floors(), lut.grid.embed[0], 1, 8)) / t
    lo, hi = max(0.5, smallest + 0.05), 0.9
    plans = validation_plans(lut, 4, seed=3, lo=lo, hi=hi)
    ratios = sorted(lut.predict(p) / t for p in plans)
    assert len(plans) == 4 and len({(p.embed_dim, tuple(p.block_dims())) for p in plans}) == 4
    edges = np.linspace(lo, hi, 5)
    for r, a, b in zip(ratios, edges[:-1], edges[1:]):  # one per stratum
        assert a - 1e-9 <= r <= b + 1e-9, (ratios, edges)
    cal = {(c["embed"], tuple(tuple(b) for b in c["blocks"])) for c in lut.calibration if not c["tokens"]}
    assert not cal & {(p.embed_dim, tuple(p.block_dims())) for p in plans}  # held out


def test_a_richer_composition_needs_three_plans_per_term():
    """A cost per kept block, planted exactly: with 5 plans besides the teacher only the scale is fitted (a
    second term needs 6), with 6 the per-block term is tried and kept; a three-term model needs 9."""
    from vitrim.profiling.calibrate import select_composition

    rng = np.random.default_rng(0)
    n = 7
    sh = rng.uniform(0.5, 1.0, n)
    bs = rng.uniform(2.0, 10.0, n)
    kept = rng.integers(2, 12, n).astype(float)
    me = sh + 1.1 * bs + 0.3 * kept
    *_, model, loo = select_composition(sh[:6], bs[:6], me[:6], kept[:6])
    assert model == "k" and set(loo) == {"k"}
    k, b, c, m, model, loo = select_composition(sh, bs, me, kept)
    assert model == "k+b" and set(loo) == {"k", "k+c", "k+b"}
    assert (k, b, c, m) == (pytest.approx(1.1), pytest.approx(0.3), 0.0, 0.0)
