"""Export stage: ONNX + ORT engine, parity gate, manifest, fp16, TensorRT (skipped without it)."""
import json
import random

import numpy as np
import onnx
import pytest
import timm
import torch
import yaml
from onnx import numpy_helper

from vitrim.export.manifest import verify_manifest
from vitrim.export.onnx import export_onnx, to_fp16
from vitrim.export.parity import ParityError, Tolerances, check_parity
from vitrim.export.backends.ort_cpu import OrtCpuRunner
from vitrim.export.runners import TorchRunner
from vitrim.pipeline.cli import main
from vitrim.pipeline.core.config import load_config
from vitrim.pipeline.core.data import build_splits
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import describe, save_weights
from vitrim.pipeline.core.slicing import load_compact, save_compact, slice_model
from vitrim.export.release import release_from_config
from tests.conftest import TINY_KW, random_init
from tests.pipeline.core.test_slice import random_plan


@pytest.fixture
def env(tmp_path, fmnist_dir):
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=0, std=0.2)
    save_weights(teacher, tmp_path / "teacher.safetensors")
    d = {"out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
         "data": {"root": fmnist_dir, "train_limit": 256, "val_limit": 128, "test_limit": 512},
         "model": {"arch": "vit_tiny_patch16_224", "kwargs": dict(TINY_KW),
                   "checkpoint": str(tmp_path / "teacher.safetensors")},
         "target": {"batch": 16, "threads": 1}, "profile": {"warmup": 2, "repeats": 6}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    plan = random_plan(describe(teacher), random.Random(1), embed=True, skip=False)
    save_compact(slice_model(teacher, plan), plan, tmp_path / "student")
    cfg = load_config(tmp_path / "c.yaml")
    return tmp_path, cfg, build_splits(cfg.data)


def test_student_exports_passes_parity_and_manifest_verifies(env):
    tmp_path, cfg, splits = env
    out = tmp_path / "exp"
    rc = main(["export", str(tmp_path / "c.yaml"), "--student", str(tmp_path / "student"), "--out", str(out)])
    assert rc == 0
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["images"] == 512
    assert parity["outputs"]["logits"]["max_absdiff"] <= 1e-4
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["artifacts"]) >= {"onnx", "engine", "parity", "student", "plan"}
    assert m["latency"]["median_ms"] > 0 and m["latency"]["p90_ms"] >= m["latency"]["median_ms"]
    assert m["device_signature"]["backend"] == "ort-cpu" and m["device_signature"]["batch"] == 16
    assert m["libraries"]["onnxruntime"] and len(m["config_hash"]) == 16
    assert (out / "model.ort.onnx").is_file()
    assert main(["verify-manifest", str(out)]) == 0
    # tampering is detected
    with open(out / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="model.onnx' has changed"):
        verify_manifest(out)
    assert main(["verify-manifest", str(out)]) == 2


def test_student_with_token_merges_exports_and_passes_parity(env):
    """A plan with token merges (issue 15) slices, exports and passes the gate; the manifest records the grids."""
    tmp_path, cfg, splits = env
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=0, std=0.2)
    plan = random_plan(describe(teacher), random.Random(2), embed=True, skip=False).set_merges({0: "w", 1: "h"})
    save_compact(slice_model(teacher, plan.validate()), plan, tmp_path / "merged")
    out = tmp_path / "exp_merged"
    assert main(["export", str(tmp_path / "c.yaml"), "--student", str(tmp_path / "merged"), "--out", str(out)]) == 0
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["top1_agreement"] == 1.0
    assert parity["outputs"]["logits"]["max_absdiff"] <= 1e-4
    assert json.loads((out / "plan.json").read_text())["tokens"]["grids"] == [[4, 2], [2, 2]]


def test_corrupted_engine_fails_gate_and_writes_no_manifest(env):
    tmp_path, cfg, splits = env
    student = load_compact(tmp_path / "student")
    good = export_onnx(student, tmp_path / "good.onnx", (1, 28, 28))
    m = onnx.load(str(good))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight matrix
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 5.0  # one perturbed weight
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    out = tmp_path / "exp_bad"
    rc = main(["export", str(tmp_path / "c.yaml"), "--student", str(tmp_path / "student"), "--out", str(out),
               "--onnx", str(tmp_path / "bad.onnx")])
    assert rc == 3
    assert not (out / "manifest.json").exists()
    rep = json.loads((out / "parity.json").read_text())
    assert not rep["passed"] and "max_absdiff" in rep["failures"][0] and "'logits'" in rep["failures"][0]
    with pytest.raises(ParityError, match="parity gate FAILED"):
        release_from_config(cfg, student, out, splits.test, plan=student.plan, onnx_path=tmp_path / "bad.onnx",
                            log=lambda m: None)


def batches(x, y, size=64):
    return [(x[i:i + size].numpy(), y[i:i + size].numpy()) for i in range(0, len(x), size)]


def test_fp16_onnx_within_fp16_tolerances(env):
    tmp_path, cfg, splits = env
    student = load_compact(tmp_path / "student")
    fp32 = export_onnx(student, tmp_path / "s.onnx", (1, 28, 28))
    fp16 = to_fp16(fp32, tmp_path / "s16.onnx")
    inits = onnx.load(str(fp16)).graph.initializer
    weight_bytes = lambda path: sum(len(i.raw_data) for i in onnx.load(str(path)).graph.initializer)  # noqa: E731
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in inits)
    assert weight_bytes(fp16) < 0.6 * weight_bytes(fp32)
    x, y = splits.test[list(range(256))]
    tol = Tolerances.for_precision(cfg.export, "fp16")
    with TorchRunner(student, (1, 28, 28)) as ref, OrtCpuRunner(fp16, threads=1) as eng:
        rep = check_parity(ref, eng, batches(x, y), tol, "fp16", worst=2)
    assert rep.passed, rep.failures
    assert rep.outputs["logits"]["max_absdiff"] > 0  # it really ran in half precision
    strict = Tolerances(atol=1e-7, rtol=1e-7)
    with TorchRunner(student, (1, 28, 28)) as ref, OrtCpuRunner(fp16, threads=1) as eng:
        assert not check_parity(ref, eng, batches(x, y), strict, "fp16", 1).passed


def test_teacher_exports(env):
    tmp_path, cfg, splits = env
    out = tmp_path / "teacher"
    assert main(["export", str(tmp_path / "c.yaml"), "--teacher", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["top1_agreement"] == 1.0 and m["latency"]["predicted_ms"] is None


def _has_trt() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'vitrim[gpu]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


@pytest.mark.trt
@pytest.mark.skipif(_has_trt() is not None, reason=str(_has_trt()))
def test_tensorrt_engine_parity(env):
    tmp_path, cfg, splits = env
    from vitrim.export.backends.tensorrt import build_trt_engine
    from vitrim.export.backends.tensorrt import TrtRunner
    from vitrim.export.target import Target

    student = load_compact(tmp_path / "student")
    onnx_path = export_onnx(student, tmp_path / "s.onnx", (1, 28, 28))
    eng = build_trt_engine(onnx_path, tmp_path / "s.plan", Target(backend="tensorrt", batch=16), (1, 28, 28),
                           tmp_path / "timing.cache")
    x, y = splits.test[list(range(256))]
    with TorchRunner(student, (1, 28, 28), "cuda") as ref, TrtRunner(eng.path) as trt_runner:
        rep = check_parity(ref, trt_runner, batches(x, y, 16), Tolerances(1e-3, 1e-3), "fp32", 2)
        assert rep.passed, rep.failures
        assert trt_runner.time(16, 5, 20).median_ms > 0
        assert trt_runner.layer_profile(16, 3)


def test_merged_student_exports_when_the_lut_has_no_token_axis(env, tiny_lut, capsys):
    """`vitrim export --student` of a merged student, with a cached LUT measured without a token axis: the
    prediction is optional there, so the student is exported and verified, and the prediction is reported
    unavailable with the reason (in the log and the manifest) instead of aborting."""
    from vitrim.export.target import Target
    from vitrim.pipeline.stages.profile import lut_path

    tmp_path, cfg, splits = env
    lut, src = tiny_lut  # a real ORT LUT, tokens [16] only (batch 4, 1 thread)
    assert len(lut.grid.tokens) == 1
    teacher = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=0, std=0.2)
    plan = random_plan(describe(teacher), random.Random(2), embed=True, skip=False).set_merges({0: "w", 1: "h"})
    save_compact(slice_model(teacher, plan.validate()), plan, tmp_path / "merged")
    sets = ["--set", "target.batch=4", "--set", "data.test_limit=64"]
    c4 = load_config(tmp_path / "c.yaml", [s for s in sets if s != "--set"])
    dest = lut_path(c4, plan.spec, Target.from_config(c4.target))  # where `vitrim export` looks for it
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(src.read_bytes())
    out = tmp_path / "exp_merged_flat"
    rc = main(["export", str(tmp_path / "c.yaml"), "--student", str(tmp_path / "merged"), "--out", str(out), *sets])
    assert rc == 0
    log = capsys.readouterr().out
    assert "predicted latency unavailable" in log and "token axis" in log
    assert main(["verify-manifest", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["latency"]["median_ms"] > 0 and m["latency"]["predicted_ms"] is None
    p = m["latency_prediction"]
    assert p["available"] is False and "token axis" in p["reason"] and "prune_tokens" in p["fix"]
    assert not (out / "lut.json").exists()  # a LUT that cannot price the plan is not shipped with it


def test_one_torchlib_registry_serves_every_export_and_changes_no_graph(tmp_path, monkeypatch):
    """export_onnx builds the exporter's ATen-to-ONNX registry once and reuses it; the graphs it writes are the
    ones an export that rebuilds the registry writes, and torch's own method is back in place afterwards."""
    import contextlib

    from torch.onnx._internal.exporter._registration import ONNXRegistry

    from vitrim.export import onnx as vonnx

    build = ONNXRegistry.__dict__["from_torchlib"].__func__
    built = []  # one entry per registry torch builds
    monkeypatch.setattr(vonnx, "_TORCHLIB_REGISTRIES", {})
    monkeypatch.setattr(ONNXRegistry, "from_torchlib", classmethod(lambda cls, *a, **k: built.append(1) or build(cls, *a, **k)))
    shipped = ONNXRegistry.__dict__["from_torchlib"]  # the (counting) method the exports must leave in place
    model = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=3)
    graphs = [onnx.load(export_onnx(model, tmp_path / f"cached{i}.onnx", (1, 28, 28))).graph for i in range(2)]
    assert len(built) == 1 and ONNXRegistry.__dict__["from_torchlib"] is shipped
    # each export gets its own copy of the tables: what one adds (a custom_translation_table) never reaches the next
    with vonnx._one_torchlib_registry():
        a, b = ONNXRegistry.from_torchlib(), ONNXRegistry.from_torchlib()
        a.functions.clear()
        assert b.functions and ONNXRegistry.from_torchlib().functions
    assert len(built) == 2  # one more build, for the key these calls make (torch passes opset_version)
    # an export that fails puts torch's method back too
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("planted")

    with pytest.raises(Exception, match="planted"):
        export_onnx(Broken(), tmp_path / "broken.onnx", (1, 28, 28))
    assert ONNXRegistry.__dict__["from_torchlib"] is shipped
    monkeypatch.setattr(vonnx, "_one_torchlib_registry", contextlib.nullcontext)
    n = len(built)
    graphs.append(onnx.load(export_onnx(model, tmp_path / "rebuilt.onnx", (1, 28, 28))).graph)
    assert len(built) == n + 1
    assert graphs[0] == graphs[1] == graphs[2]
