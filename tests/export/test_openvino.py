"""The OpenVINO backend: an IR engine built from the ONNX and gated in fp32, bf16 and int8 (NNCF), its pinned
options in the signature, the Triton repository it serves from, and its refusals."""
import json

import numpy as np
import pytest
import timm

pytest.importorskip("openvino", reason="openvino is not installed (a default dependency: pip install openvino)")

from vitrim.export.backends import get_backend  # noqa: E402
from vitrim.export.backends.openvino import OpenVinoRunner  # noqa: E402
from vitrim.export.onnx import export_onnx  # noqa: E402
from vitrim.export.parity import ParityError, Tolerances, check_parity  # noqa: E402
from vitrim.export.release import release  # noqa: E402
from vitrim.export.runners import TorchRunner  # noqa: E402
from vitrim.export.target import Target  # noqa: E402
from vitrim.pipeline.core.config import ExportConfig, QuantConfig  # noqa: E402
from vitrim.pipeline.core.data import make_loader  # noqa: E402
from vitrim.pipeline.core.errors import UserError  # noqa: E402
from vitrim.pipeline.core.rundir import RunDir  # noqa: E402
from vitrim.pipeline.core.slicing import full_size_compact  # noqa: E402
from tests.conftest import TINY_KW, random_init  # noqa: E402
from tests.export.test_quantize import roomy  # noqa: E402

OV = get_backend("openvino")
HAS_BF16 = OV.has_bf16()
NO_BF16 = "this CPU has no bf16 units (avx512_bf16 / AMX): OpenVINO's default is already f32 here"


def _batches(n=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((size, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, size)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=5, std=0.2)
    d = tmp_path_factory.mktemp("ov")
    return model, export_onnx(model, d / "m.onnx", (1, 28, 28)), d


def test_fp32_release_builds_an_ir_gates_it_and_serves_it(tiny, tmp_path):
    model, _, _ = tiny
    t = Target(backend="openvino", batch=8, threads=1)
    r = release(tmp_path / "rel", t, _batches(), model=model, warmup=1, repeats=5, log=lambda m: None)
    rd = RunDir(tmp_path / "rel")
    assert r["parity"]["passed"] and r["engine"] == str(rd.ov_engine)
    assert r["parity"]["outputs"]["logits"]["max_absdiff"] < 1e-4  # computed in f32, not bf16
    m = json.loads(rd.manifest.read_text())
    assert {"engine", "engine_weights", "onnx"} <= set(m["artifacts"]) and rd.ov_engine_weights.is_file()
    sig = m["device_signature"]
    assert sig["backend"] == "openvino" and sig["threads"] == 1 and sig["engine_version"].startswith("openvino ")
    assert sig["options"] == "streams=1,hint=LATENCY,inference_precision=f32"
    eo = m["engine_options"]  # as OpenVINO reports the compiled model's properties back
    assert eo["INFERENCE_PRECISION_HINT"] == "<Type: 'float32'>" or "f32" in eo["INFERENCE_PRECISION_HINT"]
    assert eo["NUM_STREAMS"] == "1" and eo["INFERENCE_NUM_THREADS"] == "1" and "LATENCY" in eo["PERFORMANCE_HINT"]
    # the Triton repository: the OpenVINO backend, the IR and its weights, the options it was timed with
    from vitrim.export.triton import write_triton_repo

    cfg = write_triton_repo(rd.root, tmp_path / "repo", "tiny", log=lambda m: None).read_text()
    assert 'backend: "openvino"' in cfg and "platform" not in cfg and "KIND_CPU" in cfg
    for key, val in (("NUM_STREAMS", "1"), ("PERFORMANCE_HINT", "LATENCY"), ("INFERENCE_PRECISION_HINT", "f32"),
                     ("INFERENCE_NUM_THREADS", "1")):
        assert f'key: "{key}"' in cfg and f'string_value: "{val}"' in cfg
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")
    from google.protobuf import text_format

    parsed = text_format.Parse(cfg, mc.ModelConfig())  # Triton's own schema accepts every field
    assert parsed.backend == "openvino" and parsed.max_batch_size == 8
    assert parsed.parameters["INFERENCE_PRECISION_HINT"].string_value == "f32"
    assert (tmp_path / "repo" / "tiny" / "1" / "model.xml").is_file()
    assert (tmp_path / "repo" / "tiny" / "1" / "model.bin").is_file()
    # the served IR runs and computes what the release's engine computes
    x = _batches(1)[0][0]
    with OpenVinoRunner(tmp_path / "repo" / "tiny" / "1" / "model.xml", 1) as a, t.impl.engine_runner(rd.ov_engine, t) as b:
        assert np.array_equal(a.infer(x), b.infer(x))


def test_the_fp32_gate_catches_a_broken_engine(tiny, tmp_path):
    from tests.export.test_parity import append_to_output

    model, onnx_path, _ = tiny
    flipped = append_to_output(onnx_path, tmp_path / "neg.onnx", "Neg")
    with pytest.raises(ParityError, match="max_absdiff"):
        release(tmp_path / "b", Target(backend="openvino", batch=8, threads=1), _batches(), model=model,
                onnx_path=flipped, warmup=1, repeats=3, log=lambda m: None)
    assert not (tmp_path / "b" / "manifest.json").exists()


@pytest.mark.skipif(not HAS_BF16, reason=NO_BF16)
def test_openvinos_default_precision_fails_the_fp32_gate(tiny):
    """Left unset, OpenVINO computes in bf16 on this CPU: the fp32 gate must fail that engine (the reason the
    backend pins INFERENCE_PRECISION_HINT), and pass the same graph compiled with f32."""
    model, onnx_path, _ = tiny
    tol = Tolerances.for_precision(ExportConfig(), "fp32")
    with TorchRunner(model, (1, 28, 28), threads=1) as ref, OpenVinoRunner(onnx_path, 1, None) as default:
        assert "bfloat16" in str(default.compiled.get_property("INFERENCE_PRECISION_HINT"))
        rep = check_parity(ref, default, _batches(), tol, "fp32", 2)
    assert not rep.passed and any("max_absdiff" in f or "relative L2" in f for f in rep.failures), rep.failures
    with TorchRunner(model, (1, 28, 28), threads=1) as ref, OpenVinoRunner(onnx_path, 1, "f32") as pinned:
        assert check_parity(ref, pinned, _batches(), tol, "fp32", 2).passed


@pytest.mark.skipif(not HAS_BF16, reason=NO_BF16)
def test_bf16_release_passes_its_own_tolerances_not_fp32s(tiny, tmp_path):
    model, _, _ = tiny
    t = Target(backend="openvino", precision="bf16", batch=8, threads=1)
    r = release(tmp_path / "bf16", t, _batches(), model=model, warmup=1, repeats=3, log=lambda m: None)
    p = r["parity"]
    assert p["passed"] and p["precision"] == "bf16" and p["outputs"]["logits"]["max_absdiff"] > 1e-4
    assert p["vs_second"]["reference"] == "fp32 engine"
    m = json.loads(RunDir(tmp_path / "bf16").manifest.read_text())
    assert m["device_signature"]["options"].endswith("inference_precision=bf16")
    assert "bfloat16" in m["engine_options"]["INFERENCE_PRECISION_HINT"]
    from dataclasses import asdict

    from vitrim.pipeline.core.config import ParityTolerance

    strict = ExportConfig(bf16=ParityTolerance(**{**asdict(ExportConfig().bf16), "atol": 1e-6, "rtol": 1e-6,
                                                  "max_rel_l2": 1e-6}))
    with pytest.raises(ParityError):
        release(tmp_path / "tight", t, _batches(), model=model, export_cfg=strict, warmup=1, repeats=3,
                log=lambda m: None)


def test_bf16_is_refused_where_the_cpu_has_no_bf16_units(monkeypatch):
    monkeypatch.setattr(type(OV), "has_bf16", lambda self: False)
    with pytest.raises(UserError, match="avx512_bf16 or amx_bf16") as e:
        Target(backend="openvino", precision="bf16").check_available()
    assert e.value.fix and "fp32" in e.value.fix
    assert "bf16" not in OV.supported_precisions()
    with pytest.raises(UserError, match="does not offer fp16"):
        Target(backend="openvino", precision="fp16").check_available()


@pytest.fixture(scope="module")
def trained(int8_teacher):
    _, teacher, splits = int8_teacher
    student, _ = full_size_compact(teacher)
    return student, splits


def test_int8_nncf_release_passes_the_int8_gate_and_a_broken_one_fails(trained, tmp_path):
    """NNCF post-training quantization on real calibration images, judged by the gate ORT int8 is judged by."""
    from tests.export.test_parity import append_to_output

    student, splits = trained
    t = Target(backend="openvino", precision="int8", batch=32, threads=1, quant=QuantConfig(calib_images=128))
    r = release(tmp_path / "q", t, make_loader(splits.test, 32), model=student, warmup=1, repeats=3,
                calib_data=make_loader(splits.val, 32), export_cfg=roomy(), log=lambda m: None)
    p, o = r["parity"], r["parity"]["outputs"]["logits"]
    assert p["passed"] and p["precision"] == "int8" and o["max_absdiff"] > 1e-3  # it really ran quantized
    assert p["tolerances"]["max_rel_l2"] == Tolerances.for_precision(roomy(), "int8").max_rel_l2
    rd = RunDir(tmp_path / "q")
    m = json.loads(rd.manifest.read_text())
    assert m["quantization"]["tool"] == "nncf.quantize" and m["quantization"]["model_type"] == "TRANSFORMER"
    assert m["quantization"]["calib_images"] == 128 and {"ir_int8", "ir_int8_weights"} <= set(m["artifacts"])
    assert m["device_signature"]["quant"] == "nncf-ptq-transformer-performance"
    assert "FakeQuantize" in rd.ov_graph("int8").read_text()  # NNCF's int8 graph
    flipped = append_to_output(export_onnx(student, tmp_path / "m.onnx", (1, 28, 28)), tmp_path / "neg.onnx", "Neg")
    with pytest.raises(ParityError, match="relative L2 error"):
        release(tmp_path / "b", t, make_loader(splits.test, 32), model=student, onnx_path=flipped, warmup=1,
                repeats=3, calib_data=make_loader(splits.val, 32), export_cfg=roomy(),
                log=lambda m: None)
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_a_lut_measured_on_openvino_serves_openvino_only(tiny_spec, tmp_path):
    """A tiny LUT measured on OpenVINO: keyed by its own signature (with its pinned options), refused for another."""
    from vitrim.export.target import check_compatible
    from vitrim.pipeline.core.config import ProfileConfig
    from vitrim.pipeline.core.plan import Floors, Plan
    from vitrim.profiling.build import build_lut
    from tests.conftest import TINY_PCFG

    t = Target(backend="openvino", batch=4, threads=1)
    pcfg = ProfileConfig(**dict(TINY_PCFG, embed_points=1, checks=1, calibration_plans=1))
    lut = build_lut(tiny_spec, t, pcfg, Floors(), 8, tmp_path / "lut.json", progress=False)
    sig = lut.signature
    assert sig.backend == "openvino" and sig.options == "streams=1,hint=LATENCY,inference_precision=f32"
    assert lut.predict(Plan.full(tiny_spec)) > 0
    with pytest.raises(UserError, match="differs in: backend"):
        check_compatible(sig, Target(batch=4, threads=1).signature(sig.tokens))


def test_an_int8_micro_model_is_timed_as_nncf_quantized(tiny, tmp_path):
    """Profiling's path for int8: the micro-model is quantized by NNCF and the runner runs that IR."""
    from vitrim.export.engine import runner_for_module

    model, _, _ = tiny
    t = Target(backend="openvino", precision="int8", batch=4, threads=1)
    r = runner_for_module(model, (1, 28, 28), t, tmp_path, "m")
    assert r.path.endswith("m.int8.xml") and "FakeQuantize" in (tmp_path / "m.int8.xml").read_text()
    with r:
        assert r.time(4, warmup=1, repeats=3).median_ms > 0


def test_the_openvino_demo_config_is_the_demo_on_openvino():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    ov = yaml.safe_load((root / "configs" / "fmnist_openvino.yaml").read_text())
    cpu = yaml.safe_load((root / "configs" / "fmnist_cpu.yaml").read_text())
    assert ov.pop("target") == {**cpu.pop("target"), "backend": "openvino"}
    assert (ov.pop("name"), ov.pop("out_dir")) == ("fmnist_openvino", "runs/fmnist_openvino")
    del cpu["name"], cpu["out_dir"]
    assert ov == cpu  # the same teacher (shared through the cache), grid and budget
