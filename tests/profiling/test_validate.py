"""LUT validation against end-to-end engines timed in one session, and against the MACs proxy on the same plans."""
import dataclasses
import json

import numpy as np
import pytest
import timm

from vitrim.export.target import Target
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.plan import Plan
from tests.conftest import TINY_KW

TOKENS = [2, 5, 17]  # the tiny teacher's token axis with up to two merges (4x4 grid + class token)


@pytest.fixture(scope="module")
def tok_lut(built):
    """The tiny measured LUT given a token axis: per-token cost scaled from the measured input count, merges
    priced at a small constant. A table is data; validation's mechanics do not depend on how it was measured."""
    lut, _ = built
    full = lut.signature.tokens
    s = np.asarray(TOKENS, dtype=np.float64) / full
    return dataclasses.replace(lut, grid=dataclasses.replace(lut.grid, tokens=list(TOKENS)),
                               attn=lut.attn[-1][None] * s[:, None, None, None, None],
                               mlp=lut.mlp[-1][None] * s[:, None, None],
                               merge=np.full((len(TOKENS), len(lut.grid.embed)), 0.01))


@pytest.fixture(scope="module")
def teacher_state():
    from vitrim.pipeline.core.models import canonical_state
    from tests.conftest import random_init

    return canonical_state(random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW)))


def _validate(lut, state, out, n, merged=None, controls=0):
    from vitrim.profiling.validate import validate_lut

    logs = []
    rep = validate_lut(lut, state, Target(batch=4, threads=1), n, out, warmup=1, repeats=4, rounds=2,
                       progress=False, lo=0.6, hi=0.95, log=logs.append, merged=merged, controls=controls)
    return rep, "\n".join(logs)


def test_ratio_error_stats_by_hand():
    from vitrim.profiling.validate import ratio_error_stats

    # errors -8%, -4%, +12.5%, 0%
    st = ratio_error_stats([0.46, 0.576, 0.9, 0.7], [0.5, 0.6, 0.8, 0.7])
    assert st["n"] == 4
    assert st["median_abs_err_pct"] == pytest.approx(6.0) and st["max_abs_err_pct"] == pytest.approx(12.5)
    assert st["signed_median_err_pct"] == pytest.approx(-2.0)
    assert st["within_5_pct"] == pytest.approx(0.5) and st["within_10_pct"] == pytest.approx(0.75)
    # a proxy that over-promises every speed-up (as MACs do: the shell and per-op overheads do not shrink)
    macs_like = ratio_error_stats([0.3, 0.5, 0.7], [0.45, 0.62, 0.78])
    assert macs_like["signed_median_err_pct"] < 0
    assert macs_like["signed_median_err_pct"] == pytest.approx(-macs_like["median_abs_err_pct"])
    assert ratio_error_stats([0.6, 0.9], [0.5, 0.8])["signed_median_err_pct"] > 0  # under-promises
    empty = ratio_error_stats([], [])
    assert empty["n"] == 0 and empty["median_abs_err_pct"] is None and empty["spearman"] is None


def test_random_merges_respect_the_token_axis(tiny_spec):
    import random

    from vitrim.profiling.calibrate import with_random_merges

    rng, full = random.Random(0), Plan.full(tiny_spec)
    seen_types, seen_counts = set(), set()
    for _ in range(60):
        p = with_random_merges(full, rng, min_tokens=5)
        assert 1 <= len(p.merges) <= 2 and min(p.block_tokens()) >= 5
        seen_types |= set(p.merges.values())
        seen_counts.add(len(p.merges))
    assert seen_types == {"w", "h", "hw"} and seen_counts == {1, 2}
    assert not with_random_merges(full, rng, min_tokens=17).merges  # nothing fits above the input count


def test_validation_plans_add_merged_plans_only_with_a_token_axis(built, tok_lut):
    from vitrim.profiling.validate import validation_plans

    lut, _ = built
    assert len(lut.grid.tokens) == 1
    plans = validation_plans(lut, 3, lo=0.6, hi=0.95)
    assert len(plans) == 3 and not any(p.merges for p in plans)
    with pytest.raises(UserError, match="token axis"):
        validation_plans(lut, 3, merged=1)
    plans = validation_plans(tok_lut, 3, lo=0.6, hi=0.95)  # default: a third of n
    merged = [p for p in plans if p.merges]
    assert len(plans) == 4 and len(merged) == 1 and not any(p.merges for p in plans[:3])
    cal = {(c["embed"], tuple(tuple(b) for b in c["blocks"])) for c in tok_lut.calibration}
    for p in merged:
        assert min(p.block_tokens()) >= tok_lut.grid.tokens[0] and 1 <= len(p.merges) <= 2
        assert (p.embed_dim, tuple(p.block_dims())) not in cal  # held out
        # the merges are priced (their cost, and the tokens they save in the kept blocks after them); whether the
        # total is lower depends on this machine's measured block costs against the fixture's constant merge price
        assert abs(tok_lut.predict(p) - tok_lut.predict(p.copy().set_merges({}))) > 1e-6
    assert validation_plans(tok_lut, 3, lo=0.6, hi=0.95, merged=0) == plans[:3]


def test_validation_reports_lut_against_macs(built, teacher_state, tmp_path, monkeypatch):
    from vitrim.profiling import validate

    monkeypatch.setattr(validate, "PARALLEL_MIN_PLANS", 1)  # the plans are exported in the worker processes
    lut, _ = built
    rep, log = _validate(lut, teacher_state, tmp_path, 3, controls=2)
    rows = rep["rows"]
    assert rep["n_plans"] == 3 and rep["n_merged"] == 0 and len(rows) == 4 and rows[0]["plan"] == "teacher"
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rows)
    # the headline is the ratio to the teacher visits that bracket each plan in the same session
    t = rows[0]
    assert t["paired_ms"] == t["measured_ms"] and t["macs_ratio"] == 1.0
    for r in rows[1:]:
        assert r["measured_ratio"] == pytest.approx(r["paired_ms"] / t["measured_ms"]) and r["measured_ratio"] > 0
        assert r["ratio_err_pct"] == pytest.approx(100 * (r["predicted_ratio"] / r["measured_ratio"] - 1))
        assert r["macs_ratio"] == pytest.approx(r["macs"] / t["macs"])
        assert r["macs_ratio_err_pct"] == pytest.approx(100 * (r["macs_ratio"] / r["measured_ratio"] - 1))
        assert r["merges"] == {} and r["merged"] is False
    # the MACs proxy's statistics are those of its rows, next to the LUT's
    lut_err = np.array([r["ratio_err_pct"] for r in rows[1:]])
    macs_err = np.array([r["macs_ratio_err_pct"] for r in rows[1:]])
    m = rep["macs"]
    assert m["n"] == 3 and m["median_abs_err_pct"] == pytest.approx(np.median(np.abs(macs_err)))
    assert m["signed_median_err_pct"] == pytest.approx(np.median(macs_err))
    assert m["max_abs_err_pct"] == pytest.approx(np.abs(macs_err).max())
    assert m["within_5_pct"] == pytest.approx(np.mean(np.abs(macs_err) <= 5))
    r = rep["ratio"]
    assert r["n"] == 3 and 0.0 <= r["within_5_pct"] <= r["within_10_pct"] <= 1.0
    assert r["median_abs_err_pct"] == pytest.approx(np.median(np.abs(lut_err)))
    assert r["signed_median_err_pct"] == pytest.approx(np.median(lut_err))
    assert set(rep["groups"]) == {"unmerged"} and rep["groups"]["unmerged"]["macs"] == pytest.approx(m)
    assert rep["drift"]["teacher_measured_ms"] == t["measured_ms"]
    assert "LUT:" in log and "MACs:" in log and "merged plans" not in log
    assert (tmp_path / "lut_validation.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "lut_validation.json").read_text())
    assert saved["ratio"]["n"] == 3 and saved["macs"]["n"] == 3
    # the A/A control: the build's own calibration plans, rebuilt from their widths, timed again beside the others
    c = rep["controls"]
    cal = {c_["measured_ratio"]: c_ for c_ in lut.calibration[1:]}
    assert c["n"] == 2 == len(c["rows"]) and "A/A control: 2" in log
    for r in c["rows"]:
        src = cal[r["build_ratio"]]
        assert (r["embed"], r["blocks"]) == (src["embed"], src["blocks"])
        assert r["predicted_ratio"] == pytest.approx(src["predicted_ratio"])  # the same widths, the same prediction
        assert r["moved_pct"] == pytest.approx(100 * (r["measured_ratio"] / r["build_ratio"] - 1)) and r["measured_ratio"] > 0
    assert c["moved"]["median_abs_err_pct"] == pytest.approx(np.median([abs(r["moved_pct"]) for r in c["rows"]]))


def test_validation_measures_merged_plans_separately(tok_lut, teacher_state, tmp_path):
    rep, log = _validate(tok_lut, teacher_state, tmp_path, 2, merged=1)
    rows = rep["rows"]
    held = rows[1:]
    merged = [r for r in held if r["merged"]]
    assert rep["n_plans"] == 3 and rep["n_merged"] == 1 and len(merged) == 1
    assert all(bool(r["merges"]) == r["merged"] for r in held)
    assert all(r["measured_ratio"] > 0 for r in held)
    g = rep["groups"]
    assert set(g) == {"unmerged", "merged"} and g["merged"]["lut"]["n"] == 1 and g["unmerged"]["macs"]["n"] == 2
    r = merged[0]
    assert g["merged"]["lut"]["signed_median_err_pct"] == pytest.approx(r["ratio_err_pct"])
    assert g["merged"]["macs"]["signed_median_err_pct"] == pytest.approx(r["macs_ratio_err_pct"])
    assert "merged plans (1)" in log and "unmerged plans (2)" in log
    saved = json.loads((tmp_path / "lut_validation.json").read_text())
    assert [bool(x["merges"]) for x in saved["rows"]] == [x["merged"] for x in rows]
