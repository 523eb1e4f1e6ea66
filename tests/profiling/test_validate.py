"""LUT validation against end-to-end engines timed in one session."""
import json

import pytest
import timm

from vitrim.export.target import Target
from tests.conftest import TINY_KW


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
