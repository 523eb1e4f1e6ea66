"""The latency table: interpolation, signatures, bad files, `vitrim profile show` (a real tiny ORT-CPU LUT)."""
import dataclasses
import json

import pytest
import timm

from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.core.plan import Plan
from vitrim.profiling.table import LatencyTable
from tests.conftest import TINY_KW


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


def test_profile_show_cli(built, capsys):
    from vitrim.pipeline.cli import main

    _, path = built
    assert main(["profile", "show", "--lut", str(path)]) == 0
    out = capsys.readouterr().out
    assert "LUT for ort-cpu/fp32" in out and "teacher predicted" in out and "whole-block checks: 2" in out
    assert "calibration: 3 whole plans" in out and "ratio err" in out


def test_profile_validate_refuses_negative_counts_before_any_work(capsys):
    from vitrim.pipeline.cli import main

    for flag in ("--plans", "--merged", "--controls"):
        assert main(["profile", "validate", "configs/fmnist_cpu.yaml", flag, "-1"]) == 2
        err = capsys.readouterr().err
        assert f"{flag} is -1" in err and "use 0 or more" in err


def test_build_phases_show_in_both_meta_layouts(built):
    """Where a build's time went: whole-plan exports in their own field, or (tables of the first builds that
    timed phases) as '<phase>_exports' keys; both print the same line."""
    import copy

    lut, _ = built
    new, old = copy.deepcopy(lut), copy.deepcopy(lut)
    new.meta.update(build_s=30.0, phases_s={"entry_exports": 5.0, "entries": 10.0, "calibration": 15.0},
                    plan_exports_s={"calibration": 4.0})
    old.meta.update(build_s=30.0, phases_s={"entry_exports": 5.0, "entries": 10.0, "calibration": 15.0,
                                            "calibration_exports": 4.0})
    old.meta.pop("plan_exports_s", None)
    line = "built in 30s (entry exports 5s, entries 10s, calibration 15s; whole-plan exports: calibration 4s)"
    assert line in new.summary() and line in old.summary()
