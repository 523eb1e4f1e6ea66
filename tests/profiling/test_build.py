"""LUT build on a tiny grid (real ORT-CPU sessions), interpolation, signatures, bad files."""
import dataclasses
import json

import numpy as np
import pytest
import timm
import torch

from vitrim.export.target import Target
from vitrim.pipeline.core.config import ProfileConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Plan
from vitrim.profiling.table import LatencyTable
from vitrim.profiling.build import Item, measure_items
from tests.conftest import TINY_KW, TINY_PCFG

PCFG = ProfileConfig(**TINY_PCFG)


@pytest.fixture(scope="module")
def spec(tiny_spec):
    return tiny_spec


@pytest.fixture(scope="module")
def built(tiny_lut):
    return tiny_lut


def test_build_save_reload(built, spec):
    lut, path = built
    assert path.is_file() and not path.with_name(path.name + ".partial").exists()
    again = LatencyTable.load(path, expect=lut.signature)
    assert np.array_equal(again.attn, lut.attn) and np.array_equal(again.mlp, lut.mlp)
    assert lut.grid.embed == [8, 32] and lut.grid.heads == [1, 2] and lut.grid.mlp == [16, 64]
    assert (lut.attn > 0).all() and (lut.mlp > 0).all() and (lut.shell > 0).all()
    full = Plan.full(spec)
    t = lut.predict(full)
    assert t > 0 and np.isfinite(t)
    # a smaller plan is predicted faster; skipping a block saves exactly its block latency
    half = Plan.full(spec)
    half.blocks[1].keep = False
    assert lut.predict(half) == pytest.approx(t - lut.compose * lut.block_ms(32, 2, 16, 16, 64))
    assert 0.3 < lut.compose < 3.0 and np.isfinite(lut.compose_offset_ms)
    assert len(lut.calibration) == 3 and lut.calibration[0]["measured_ratio"] == 1.0
    assert lut.marginal(full, 1, "block") == pytest.approx(t - lut.predict(half))
    assert len(lut.checks) == 2 and "reproducibility_pct" in lut.meta


def test_interpolation_reproduces_grid_points(built):
    lut, _ = built
    g = lut.grid
    for i, E in enumerate(g.embed):
        assert lut.shell_ms(E) == pytest.approx(lut.shell[i], rel=1e-12)
        for j, H in enumerate(g.heads):
            for m, M in enumerate(g.mlp):
                want = lut.attn[0, i, j, 0, 0] + lut.mlp[0, i, m] + lut.block_correction_ms
                assert lut.block_ms(E, H, g.qk[0], g.v[0], M) == pytest.approx(want, rel=1e-12)
    # between grid points: between the neighbours
    mid = lut.shell_ms(20)
    assert min(lut.shell) - 1e-9 <= mid <= max(lut.shell) + 1e-9


def test_signature_mismatch_is_refused(built, spec, tmp_path):
    lut, path = built
    other = dataclasses.replace(lut.signature, batch=64)
    with pytest.raises(UserError, match="differs in: batch") as e:
        lut.predict(Plan.full(spec), signature=other)
    assert str(lut.signature) in str(e.value) and str(other) in str(e.value)
    with pytest.raises(UserError, match="measured for"):
        LatencyTable.load(path, expect=dataclasses.replace(lut.signature, device="Some Other CPU"))
    # a plan from another teacher is refused too
    big = describe(timm.create_model("vit_tiny_patch16_224", **{**TINY_KW, "embed_dim": 64}))
    with pytest.raises(UserError, match="embed_dim"):
        lut.predict(Plan.full(big))


def test_corrupt_and_old_schema_files(built, tmp_path):
    _, path = built
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": 1, "signature": ')
    with pytest.raises(UserError, match="not valid JSON"):
        LatencyTable.load(bad)
    d = json.loads(path.read_text())
    d["schema"] = 0
    bad.write_text(json.dumps(d))
    with pytest.raises(UserError, match="schema 0"):
        LatencyTable.load(bad)
    d = json.loads(path.read_text())
    d["attn_ms"][0] = d["attn_ms"][0][:1]
    bad.write_text(json.dumps(d))
    with pytest.raises(UserError, match="do not match its grid"):
        LatencyTable.load(bad)
    with pytest.raises(UserError, match="not found"):
        LatencyTable.load(tmp_path / "none.json")


def test_measurement_resumes_from_partial(spec, tmp_path):
    items = [Item("shell_e8", "shell", (8,)), Item("shell_e16", "shell", (16,))]
    sentinel = {"median_ms": -1.0, "p90_ms": -1.0, "n": 0}
    done = {"shell_e8": sentinel}
    saves = []
    measure_items(items, spec, Target(batch=2, threads=1), 17, PCFG, tmp_path, done, lambda d: saves.append(dict(d)),
                  progress=False)
    assert done["shell_e8"] is sentinel  # reused, not re-measured
    assert done["shell_e16"]["median_ms"] > 0 and done["shell_e16"]["n"] == 6
    assert len(saves) == 1 and set(saves[0]) == {"shell_e8", "shell_e16"}


def test_validation_reports_ratio_error_and_drift(built, spec, tmp_path):
    from vitrim.pipeline.core.models import canonical_state
    from vitrim.profiling.validate import validate_lut
    from tests.conftest import random_init

    lut, _ = built
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW))
    rep = validate_lut(lut, canonical_state(teacher), Target(batch=4, threads=1), 3, tmp_path, warmup=2, repeats=6,
                       rounds=2, progress=False, lo=0.6, hi=0.95, log=lambda s: None)
    rows = rep["rows"]
    assert rep["n_plans"] == 3 and len(rows) == 4 and rows[0]["plan"] == "teacher"
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rows)
    # the headline is the ratio to the teacher visits that bracket each plan in the same session
    t = rows[0]
    assert t["paired_ms"] == t["measured_ms"]
    for r in rows[1:]:
        assert r["measured_ratio"] == pytest.approx(r["paired_ms"] / t["measured_ms"]) and r["measured_ratio"] > 0
        assert r["ratio_err_pct"] == pytest.approx(100 * (r["predicted_ratio"] / r["measured_ratio"] - 1))
    assert rep["ratio"]["n"] == 3 and 0.0 <= rep["ratio"]["within_5_pct"] <= rep["ratio"]["within_10_pct"] <= 1.0
    assert rep["drift"]["teacher_measured_ms"] == t["measured_ms"]
    assert (tmp_path / "lut_validation.png").stat().st_size > 1000
    assert json.loads((tmp_path / "lut_validation.json").read_text())["ratio"]["n"] == 3


def test_profile_show_cli(built, capsys):
    from vitrim.pipeline.cli import main

    _, path = built
    assert main(["profile", "show", "--lut", str(path)]) == 0
    out = capsys.readouterr().out
    assert "LUT for ort-cpu/fp32" in out and "teacher predicted" in out and "whole-block checks: 2" in out
    assert "calibration: 3 whole plans" in out and "ratio err" in out


def test_export_cache_reuses_only_identical_modules(tmp_path, spec):
    """Profiling re-exports nothing it exported before in the process, and nothing else is mistaken for it."""
    from vitrim.export.engine import _module_key, export_cached
    from vitrim.profiling.micro import make_part

    a, b = make_part("attn", spec, 32, 2, 16, 16, 64), make_part("attn", spec, 32, 2, 16, 16, 64)
    assert _module_key(a, (17, 32)) == _module_key(b, (17, 32))
    assert _module_key(a, (17, 32)) != _module_key(a, (9, 32))  # another token count
    other = make_part("attn", dict(spec, scale_head_dim=8), 32, 2, 16, 16, 64)  # same weights, another scale
    assert _module_key(other, (17, 32)) != _module_key(a, (17, 32))
    with torch.no_grad():
        b.blk.attn.proj.bias[0] += 1.0
    assert _module_key(b, (17, 32)) != _module_key(a, (17, 32))
    p1 = export_cached(a, tmp_path / "a.onnx", (17, 32))
    p2 = export_cached(make_part("attn", spec, 32, 2, 16, 16, 64), tmp_path / "a2.onnx", (17, 32))
    assert p1.read_bytes() == p2.read_bytes()
