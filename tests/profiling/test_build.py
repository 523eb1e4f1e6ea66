"""LUT build on a tiny grid (real ORT-CPU sessions): save, reload, resume."""

import numpy as np
import pytest

from vitrim.export.target import Target
from vitrim.pipeline.core.config import ProfileConfig
from vitrim.pipeline.core.plan import Plan
from vitrim.profiling.table import LatencyTable
from vitrim.profiling.build import Item, measure_items
from tests.conftest import TINY_PCFG

PCFG = ProfileConfig(**TINY_PCFG)


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
