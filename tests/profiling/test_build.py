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
    e = done["shell_e16"]
    assert e["median_ms"] > 0 and e["n"] >= 6 and e["ratio"] > 0 and e["visits"] == PCFG.rounds
    assert saves and set(saves[0]) == {"shell_e8", "shell_e16"}


class _Runner:
    """A runner of planted latency (this test only); ``wobble`` makes every other visit 30% slower."""

    def __init__(self, ms, wobble=False):
        self.ms, self.wobble, self.calls = ms, wobble, 0

    def activate(self):
        pass

    def deactivate(self):
        pass

    def _prepare(self, batch, seed=0):
        pass

    def _run_once(self):
        self.calls += 1
        return self.ms * (1.3 if self.wobble and (self.calls // 4) % 2 else 1.0)


def test_noisy_entries_are_measured_again(spec, tmp_path):
    """An entry whose visits disagree (per-visit spread above profile.remeasure_spread_pct) gets a second,
    longer measurement; a steady one does not."""
    items = [Item("null_e8", "null", (8,)), Item("null_e16", "null", (16,)), Item("null_e24", "null", (24,))]
    pcfg = ProfileConfig(**{**TINY_PCFG, "rounds": 4, "repeats": 12, "remeasure_spread_pct": 3.0})
    opened = []

    def opener(item, *a):
        opened.append(item.key)
        return _Runner(1.0 + 0.01 * item.dims[0], wobble=item.key == "null_e16")

    done = measure_items(items, spec, Target(batch=2, threads=1), 17, pcfg, tmp_path, {}, lambda d: None,
                         progress=False, opener=opener, sentinel=items[0])
    assert done["null_e16"]["again"] and done["null_e16"]["first_spread_pct"] > 3.0
    assert not done["null_e24"].get("again") and done["null_e24"]["spread_pct"] == 0.0
    assert done["null_e24"]["ratio"] == pytest.approx(1.24 / 1.08)
    assert opened.count("null_e16") == 2 and opened.count("null_e24") == 1


KILL_SCRIPT = """
import json, sys
from vitrim.export.target import Target
from vitrim.pipeline.core.config import ProfileConfig
from vitrim.pipeline.core.plan import Floors
from vitrim.profiling import build
from vitrim.export.backends import BACKENDS
BACKENDS["ort-cpu"].entry_chunk = 3  # small chunks: several saves before the kill
spec, pcfg, out = json.load(open(sys.argv[1])), ProfileConfig(**json.load(open(sys.argv[2]))), sys.argv[3]
build.build_lut(spec, Target(batch=4, threads=1), pcfg, Floors(), 8, out, progress=False)
"""


def test_a_killed_build_resumes_from_its_saved_entries(spec, tmp_path, monkeypatch):
    """SIGTERM a real build midway; the rebuild re-measures only the entries the kill lost."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from vitrim.pipeline.core.plan import Floors
    from vitrim.profiling import build

    (tmp_path / "spec.json").write_text(json.dumps(spec))
    small = dict(TINY_PCFG, checks=1, calibration_plans=2)
    pcfg = ProfileConfig(**small)
    (tmp_path / "pcfg.json").write_text(json.dumps(small))
    out = tmp_path / "lut.json"
    partial = tmp_path / "lut.json.partial"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "spec.json"), str(tmp_path / "pcfg.json"),
                             str(out)], cwd=root)
    try:
        deadline = time.time() + 120
        def saved_entries() -> int:  # the partial exists from the start (header only); wait for a chunk
            try:
                return len(json.loads(partial.read_text())["entries"])
            except (OSError, ValueError, KeyError):
                return 0

        while not saved_entries() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert saved_entries() and proc.poll() is None, "the build ended before it saved a chunk"
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        proc.kill()
    saved = json.loads(partial.read_text())["entries"]
    items, _ = build.lut_items(spec, build.Grid.for_spec(spec, pcfg, Floors(), 8), pcfg)
    assert not out.exists() and 0 < len(saved) < len(items)  # killed midway: no table, some entries
    opened, logs = [], []

    real_open = build._open_runner

    def recording_open(item, *args):
        opened.append(item.key)
        return real_open(item, *args)

    monkeypatch.setattr(build, "_open_runner", recording_open)
    monkeypatch.setattr(build, "PARALLEL_MIN_PLANS", 1)  # the calibration plans are exported by the workers
    lut = build.build_lut(spec, Target(batch=4, threads=1), pcfg, Floors(), 8, out, progress=False, log=logs.append)
    assert any(f"resuming: {len(saved)} entries" in s for s in logs)
    sentinel = items[0].key
    remeasured = {k for k in opened if not k.startswith("plan_")} - {sentinel}
    assert remeasured and not remeasured & set(saved)  # only what the kill lost
    assert remeasured | set(saved) | {sentinel} >= {it.key for it in items}
    assert out.is_file() and not partial.exists() and not (tmp_path / "lut.json.parts").exists()
    assert lut.meta["entries"] == len(items)


def test_a_partial_from_other_settings_is_not_resumed(spec, tmp_path):
    """A partial left by a build with another grid or settings (here: another seed) is ignored, and its
    exports are wiped: every entry is measured afresh."""
    import json

    from vitrim.pipeline.core.plan import Floors
    from vitrim.profiling import build

    out = tmp_path / "lut.json"
    items, _ = build.lut_items(spec, build.Grid.for_spec(spec, PCFG, Floors(), 8), PCFG)  # keys the build will want
    stale = {"ratio": 99.0, "spread_pct": 0.0, "visits": 1, "median_ms": 99.0, "p90_ms": 99.0, "n": 1, "sentinel_ms": 1.0}
    (tmp_path / "lut.json.partial").write_text(json.dumps({"header": {"seed": 7}, "entries": {it.key: stale for it in items}}))
    (tmp_path / "lut.json.parts").mkdir()
    (tmp_path / "lut.json.parts" / "shell_e8.onnx").write_text("another build's export")
    opened, logs = [], []

    def opener(item, *a):
        opened.append(item.key)
        part = {"attn": 0.3, "mlp": 0.2, "block": 0.5, "plan": 0.5 * len(item.plan.blocks) if item.plan else 0}
        return _Runner(1.0 + 0.01 * item.dims[0] + part.get(item.kind, 0.0))

    build.build_lut(spec, Target(batch=4, threads=1), PCFG, Floors(), 8, out, progress=False, log=logs.append,
                    opener=opener)
    assert not any("resuming" in s for s in logs)
    assert {it.key for it in items} <= set(opened)  # nothing taken from the stale partial
    assert not (tmp_path / "lut.json.parts").exists()
