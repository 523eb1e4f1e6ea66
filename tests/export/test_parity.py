"""The parity gate fails on a broken engine in every precision, naming the check, and passes a correct one.

Each engine is a real ONNX Runtime session over the trained tiny ViT exported in
that precision (fp32 ONNX, fp16 ONNX, static-int8 QDQ ONNX); a broken engine is
that real runner with its output scaled, sign-flipped, made constant, permuted
over the classes or given a NaN. The thresholds are ExportConfig's defaults.
"""
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from vitrim.export.onnx import export_onnx, to_fp16
from vitrim.export.parity import Tolerances, check_parity
from vitrim.export.backends.ort_cpu import OrtCpuRunner
from vitrim.export.runners import Runner, TorchRunner
from vitrim.pipeline.cli import main
from vitrim.pipeline.core.config import ExportConfig, QuantConfig
from vitrim.pipeline.core.data import make_loader
from vitrim.pipeline.core.models import save_weights
from tests.conftest import INT8_SETS

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def engines(int8_teacher, tmp_path_factory):
    """The trained teacher, its splits, and its ONNX engine files per precision."""
    from vitrim.export.quantize import collect_calibration, quantize_for_target
    from vitrim.export.target import Target

    _, teacher, splits = int8_teacher
    d = tmp_path_factory.mktemp("parity")
    fp32 = export_onnx(teacher, d / "m.onnx", SHAPE)
    int8 = d / "m.int8.onnx"
    quantize_for_target(fp32, int8, Target(precision="int8", threads=1, quant=QuantConfig(calib_images=128)),
                        collect_calibration(make_loader(splits.val, 32), 128))
    return teacher, splits, {"fp32": fp32, "fp16": to_fp16(fp32, d / "m.fp16.onnx"), "int8": int8}


class Broken(Runner):
    """A real runner whose output is damaged the way a broken engine damages it."""

    def __init__(self, inner: Runner, kind: str):
        self.inner, self.kind, self.calls, self.const = inner, kind, 0, None

    def sample_shape(self):
        return self.inner.sample_shape()

    def infer(self, x: np.ndarray) -> np.ndarray:
        out = self.inner.infer(x).astype(np.float32)
        self.calls += 1
        if self.kind == "scaled":
            return 50.0 * out
        if self.kind == "sign":
            return -out
        if self.kind == "constant":  # the first batch's mean logits, whatever the input: the right scale, no signal
            self.const = out.mean(0) if self.const is None else self.const
            return np.broadcast_to(self.const, out.shape).copy()
        if self.kind == "permuted":
            return np.roll(out, 1, axis=1)
        if self.kind == "nan":  # a single NaN, in the second batch only
            if self.calls == 2:
                out[0, 3] = np.nan
            return out
        return out


# the check each damage must trip in every precision (int8's elementwise tolerances are loose by design,
# so the scale-aware relative L2 error has to catch the first four on its own)
EXPECTED = {"scaled": "relative L2 error", "sign": "relative L2 error", "constant": "relative L2 error",
            "permuted": "relative L2 error", "nan": "non-finite values"}


def _gate(teacher, splits, path, precision, kind=None, tol=None):
    tol = tol or Tolerances.for_precision(ExportConfig(), precision)
    with TorchRunner(teacher, SHAPE, threads=1) as ref, OrtCpuRunner(path, threads=1) as eng:
        run = Broken(eng, kind) if kind else eng
        return check_parity(ref, run, make_loader(splits.test, 64), tol, precision)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_correct_engine_passes_each_precision_with_margin(engines, precision):
    teacher, splits, paths = engines
    rep = _gate(teacher, splits, paths[precision], precision)
    o, tol = rep.outputs["logits"], Tolerances.for_precision(ExportConfig(), precision)
    assert rep.passed, rep.failures
    assert rep.images == len(splits.test) and o["batches"] == -(-len(splits.test) // 64)  # every image, streamed
    assert o["max_rel_l2"] < tol.max_rel_l2 / 4 and o["max_over_allowed"] < 0.25  # margin, not a knife edge
    if precision != "fp32":
        assert o["max_absdiff"] > 0  # it really ran in reduced precision
    assert o["nonfinite_engine"] == 0 and o["mismatched"] == 0


@pytest.mark.parametrize("kind", list(EXPECTED))
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_broken_engine_fails_each_precision_naming_the_check(engines, precision, kind):
    teacher, splits, paths = engines
    rep = _gate(teacher, splits, paths[precision], precision, kind)
    assert not rep.passed
    named = [f for f in rep.failures if EXPECTED[kind] in f]
    assert named and all(f.startswith("output 'logits': ") for f in rep.failures), rep.failures
    if kind == "scaled":  # 50x: the relative L2 error is 49 whatever the precision's noise
        assert 40 < rep.outputs["logits"]["max_rel_l2"] < 60


def test_elementwise_check_uses_the_reference_as_denominator(engines):
    """|e - r| <= atol + rtol*|r|: an engine at 2x the reference fails rtol 0.6.

    Polygraphy's rule divides by the engine's output: |2r - r| / |2r| = 0.5 <= 0.6 passed.
    """
    teacher, splits, paths = engines

    class Doubled(Broken):
        def infer(self, x):
            return 2.0 * self.inner.infer(x)

    tol = Tolerances(atol=1e-3, rtol=0.6, max_rel_l2=10.0, min_top1_agreement=0.0, max_acc_delta=100.0)
    with TorchRunner(teacher, SHAPE, threads=1) as ref, OrtCpuRunner(paths["fp32"], threads=1) as eng:
        rep = check_parity(ref, Doubled(eng, ""), make_loader(splits.test, 64), tol, "fp32")
    assert not rep.passed and len(rep.failures) == 1 and "elementwise" in rep.failures[0], rep.failures
    assert rep.outputs["logits"]["max_over_allowed"] > 1.5  # |2r - r| / (0.6|r|) -> 1.67


def test_report_details_only_the_worst_batches(engines):
    teacher, splits, paths = engines
    tol = Tolerances.for_precision(ExportConfig(), "fp32")
    with TorchRunner(teacher, SHAPE, threads=1) as ref, OrtCpuRunner(paths["fp32"], threads=1) as eng:
        rep = check_parity(ref, Broken(eng, "nan"), make_loader(splits.test, 32), tol, "fp32", parity_batches=3)
    o = rep.outputs["logits"]
    assert o["batches"] == 12 and len(o["worst_batches"]) == 3
    assert o["worst_batches"][0] == {"batch": 1, "rel_l2": None, "max_absdiff": o["worst_batches"][0]["max_absdiff"]}
    assert all(0 <= w["rel_l2"] < 1e-4 for w in o["worst_batches"][1:])  # the finite batches, worst first
    assert o["worst_batches"][1]["rel_l2"] >= o["worst_batches"][2]["rel_l2"]
    assert o["worst_batch"] == 1 and o["nonfinite_engine"] == 1 and o["max_rel_l2"] is None
    json.dumps(o, allow_nan=False)  # strict JSON
    assert any("worst: batch 1 (NaN/Inf there) of 12" in f for f in rep.failures)


def append_to_output(src, dst, op: str):
    """Real graph surgery: the graph's output now goes through ``op`` (Mul by 50 or Neg)."""
    m = onnx.load(str(src))
    name = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [f"{o}_raw" if o == name else o for o in node.output]
    if op == "Mul":
        m.graph.initializer.append(numpy_helper.from_array(np.array(50.0, np.float32), "fifty"))
        m.graph.node.append(helper.make_node("Mul", [f"{name}_raw", "fifty"], [name]))
    else:
        m.graph.node.append(helper.make_node("Neg", [f"{name}_raw"], [name]))
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


@pytest.mark.parametrize("precision,op", [("int8", "Mul"), ("fp32", "Neg")])
def test_cli_export_of_a_broken_onnx_exits_3_naming_the_check(engines, tmp_path, fmnist_dir, capsys, precision, op):
    teacher, _, paths = engines
    save_weights(teacher, tmp_path / "teacher.safetensors")
    bad = append_to_output(paths["fp32"], tmp_path / "bad.onnx", op)
    out = tmp_path / "rel"
    sets = [*INT8_SETS, f"data.root={fmnist_dir}", f"model.checkpoint={tmp_path / 'teacher.safetensors'}",
            f"cache_dir={tmp_path / 'cache'}", f"out_dir={out}", f"target.precision={precision}", "target.batch=32",
            "target.threads=1", "target.quant.calib_images=128", "profile.warmup=1", "profile.repeats=5",
            "profile.min_visit_ms=0", "profile.remeasure_spread_pct=0"]
    (tmp_path / "c.yaml").write_text("{}\n")  # the built-in defaults, overridden below as the int8 teacher was
    rc = main(["export", str(tmp_path / "c.yaml"), "--onnx", str(bad), "--out", str(out),
               *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "parity gate FAILED" in err and "output 'logits': relative L2 error" in err, err
    assert not (out / "manifest.json").exists()
    rep = json.loads((out / "parity.json").read_text())
    assert not rep["passed"] and rep["precision"] == precision and rep["images"] == 384
