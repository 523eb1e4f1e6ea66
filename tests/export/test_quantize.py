"""INT8 as a target precision: export, the int8 gate, calibration, the int8 LUT and its signature."""
import json

import numpy as np
import pytest

from vitrim.export.parity import ParityError
from vitrim.export.release import release
from vitrim.export.target import Target
from vitrim.pipeline.core.config import ProfileConfig, QuantConfig
from vitrim.pipeline.core.data import make_loader
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.slicing import full_size_compact
from tests.conftest import TINY_PCFG


@pytest.fixture(scope="module")
def trained(int8_teacher):
    _, teacher, splits = int8_teacher
    student, _ = full_size_compact(teacher)
    return student, splits


def _release(out, student, splits, calib, **quant):
    t = Target(precision="int8", batch=32, threads=1, quant=QuantConfig(**quant))
    return release(out, t, make_loader(splits.test, 32), model=student, warmup=1, repeats=5, calib_data=calib,
                   log=lambda m: None)


def test_int8_static_release_passes_the_int8_gate(trained, tmp_path):
    student, splits = trained
    r = _release(tmp_path / "s", student, splits, make_loader(splits.val, 32), calib_images=128)
    p = r["parity"]
    assert p["passed"] and p["precision"] == "int8" and p["images"] == 384
    assert 0 < p["outputs"]["logits"]["max_absdiff"] < 1.0  # it really ran quantized, within the int8 atol
    assert p["vs_second"]["reference"] == "fp32 engine" and p["vs_second"]["top1_agreement"] >= 0.97
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    q = m["quantization"]
    assert q["mode"] == "static" and q["calib_images"] == 128 and len(q["calib_sha256"]) == 64
    assert m["device_signature"]["precision"] == "int8" and m["device_signature"]["quant"] == "static-minmax-pt-MatMul"
    assert "onnx_int8" in m["artifacts"]
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "s" / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # dynamic int8: no calibration, weights quantized
    r = _release(tmp_path / "d", student, splits, None, mode="dynamic")
    assert r["parity"]["passed"] and "calib_sha256" not in json.loads((tmp_path / "d" / "manifest.json").read_text())["quantization"]


def test_broken_calibration_fails_the_gate_naming_the_statistic(trained, tmp_path):
    student, splits = trained
    zeros = [(np.zeros((32, 1, 28, 28), np.float32), np.zeros(32, np.int64))] * 4
    with pytest.raises(ParityError, match="top-1 agreement|max_absdiff"):
        _release(tmp_path / "z", student, splits, zeros, calib_images=128)
    assert not (tmp_path / "z" / "manifest.json").exists()
    rep = json.loads((tmp_path / "z" / "parity.json").read_text())
    assert not rep["passed"] and rep["failures"]


def test_static_int8_without_calibration_is_refused(trained, tmp_path):
    student, splits = trained
    with pytest.raises(UserError, match="calibration"):
        _release(tmp_path / "n", student, splits, None)


def test_signatures_differ_by_precision_and_quantization():
    a = Target(precision="fp32").signature(16)
    b = Target(precision="int8").signature(16)
    c = Target(precision="int8", quant=QuantConfig(mode="dynamic")).signature(16)
    assert a.key() != b.key() != c.key() and a.key() != c.key()
    assert b.diff(a) == ["precision", "quant"] and c.quant.startswith("dynamic")


def test_int8_lut_builds_reloads_and_is_refused_for_fp32(tiny_spec, tmp_path):
    from vitrim.pipeline.core.plan import Floors, Plan
    from vitrim.profiling.table import LatencyTable
    from vitrim.profiling.build import build_lut

    t8 = Target(precision="int8", batch=4, threads=1)
    path = tmp_path / "lut8.json"
    lut = build_lut(tiny_spec, t8, ProfileConfig(**dict(TINY_PCFG, embed_points=1, checks=1, calibration_plans=1)), Floors(), 8, path,
                    progress=False)
    full = Plan.full(tiny_spec)
    again = LatencyTable.load(path, expect=t8.signature(full.num_tokens))
    assert again.predict(full) == pytest.approx(lut.predict(full)) and lut.predict(full) > 0
    with pytest.raises(UserError, match="precision"):
        LatencyTable.load(path, expect=Target(precision="fp32", batch=4, threads=1).signature(full.num_tokens))


def _trt_int8_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'vitrim[gpu]' on a CUDA machine)"
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        return "NVIDIA ModelOpt is not installed (pip install 'nvidia-modelopt[onnx]')"
    import torch

    return None if torch.cuda.is_available() else "no CUDA device visible"


@pytest.mark.trt
@pytest.mark.skipif(_trt_int8_missing() is not None, reason=str(_trt_int8_missing()))
def test_tensorrt_int8_engine_from_modelopt_qdq(trained, tmp_path):
    student, splits = trained
    t = Target(backend="tensorrt", precision="int8", batch=32, quant=QuantConfig(calib_images=128))
    r = release(tmp_path / "trt8", t, make_loader(splits.test, 32), model=student, warmup=2, repeats=10,
                calib_data=make_loader(splits.val, 32), log=lambda m: None)
    assert r["parity"]["passed"] and r["engine"].endswith("model.plan")
    assert json.loads((tmp_path / "trt8" / "manifest.json").read_text())["quantization"]["tool"].startswith("modelopt")
