"""The release step on its own: an ONNX exported outside vitrim is verified and released."""
import json

import numpy as np
import pytest
import timm
import torch
import yaml

from vitrim.export.parity import ParityError
from vitrim.export.release import release
from vitrim.export.target import Target
from vitrim.pipeline.cli import main
from vitrim.pipeline.core.models import save_weights
from tests.conftest import TINY_KW, random_init


def _foreign_onnx(model, path):
    """Exported with plain torch.onnx (not vitrim's exporter), other tensor names, dynamic batch."""
    x = torch.randn(2, 1, 28, 28)
    prog = torch.onnx.export(model.eval(), (x,), dynamo=True, input_names=["pixels"], output_names=["scores"],
                             dynamic_shapes={"x": {0: torch.export.Dim("n", min=1, max=1024)}})
    prog.save(str(path))
    return path


@pytest.fixture
def foreign(tmp_path, fmnist_dir):
    model = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=3, std=0.2)
    save_weights(model, tmp_path / "teacher.safetensors")
    onnx_path = _foreign_onnx(model, tmp_path / "theirs.onnx")
    cfg = {"data": {"root": fmnist_dir, "train_limit": 256, "val_limit": 64, "test_limit": 96, "val_size": 1000},
           "model": {"arch": "vit_tiny_patch16_224", "kwargs": dict(TINY_KW),
                     "checkpoint": str(tmp_path / "teacher.safetensors")},
           "target": {"batch": 16, "threads": 1}, "profile": {"warmup": 2, "repeats": 6},
           "out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path, model, onnx_path


def test_vitrim_export_releases_a_foreign_onnx(foreign):
    tmp_path, model, onnx_path = foreign
    out = tmp_path / "rel"
    assert main(["export", str(tmp_path / "c.yaml"), "--onnx", str(onnx_path), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["parity"]["images"] == 96 and m["parity"]["reference"].startswith("torch")
    assert m["parity"]["outputs"]["logits"]["max_absdiff"] < 1e-4
    assert m["artifacts"]["onnx"]["path"].endswith("theirs.onnx")
    assert (out / "model.ort.onnx").is_file() and m["latency"]["median_ms"] > 0
    assert not (out / "model.onnx").exists()  # nothing re-exported
    assert m["preprocessing"]["input_size"] == [1, 28, 28] and m["preprocessing"]["mean"] == [0.286]  # issue 21
    assert main(["verify-manifest", str(out)]) == 0


def test_release_api_onnx_only_and_a_broken_onnx_fails(foreign, tmp_path):
    _, model, onnx_path = foreign
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)) for _ in range(3)]
    rep = release(tmp_path / "api", Target(batch=8, threads=1), data, onnx_path=onnx_path, warmup=1, repeats=5,
                  log=lambda m: None)
    assert rep["parity"]["images"] == 24 and "ONNX Runtime" in rep["parity"]["reference"]
    # the torch model of another seed is not what the ONNX computes: the gate fails, no manifest
    other = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=4, std=0.2)
    with pytest.raises(ParityError, match="max_absdiff"):
        release(tmp_path / "bad", Target(batch=8, threads=1), data, model=other, onnx_path=onnx_path, warmup=1,
                repeats=5, log=lambda m: None)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def _random_batches(n_batches, size=8, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        yield rng.standard_normal((size, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, size)


def test_torch_target_gate_can_fail_and_fp16_passes(tmp_path):
    from vitrim.export.engine import build_engine
    from vitrim.export.parity import Tolerances, check_parity
    from vitrim.export.runners import TorchRunner

    model = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=5, std=0.2)
    tol32 = Tolerances(atol=1e-4, rtol=1e-3)
    # the engine is a torch program saved to disk from a perturbed copy: the gate must see it
    bad = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=5, std=0.2)
    with torch.no_grad():
        bad.blocks[0].mlp.fc1.weight[0, 0] += 5.0
    target = Target(backend="torch-cpu", batch=8, threads=1)
    eng = build_engine(None, tmp_path / "bad", target, (1, 28, 28), model=bad)
    with TorchRunner(model, (1, 28, 28)) as ref, eng.runner(target) as run:
        rep = check_parity(ref, run, _random_batches(3), tol32, "fp32", 2)
    assert not rep.passed and "max_absdiff" in rep.failures[0]
    # the honest engine passes, and the caller's model is left as it was (fp32, CPU)
    r = release(tmp_path / "ok", target, _random_batches(3), model=model, warmup=1, repeats=5, log=lambda m: None)
    assert r["parity"]["passed"] and r["engine"].endswith("model.pt2")
    assert next(model.parameters()).dtype == torch.float32
    # fp16 on torch-cpu: passes with the fp16 tolerances, not with fp32's
    t16 = Target(backend="torch-cpu", precision="fp16", batch=8, threads=1)
    r16 = release(tmp_path / "fp16", t16, _random_batches(3), model=model, warmup=1, repeats=5, log=lambda m: None)
    assert r16["parity"]["passed"] and r16["parity"]["outputs"]["logits"]["max_absdiff"] > 0
    eng16 = build_engine(None, tmp_path / "fp16b", t16, (1, 28, 28), model=model)
    with TorchRunner(model, (1, 28, 28)) as ref, eng16.runner(t16) as run:
        assert not check_parity(ref, run, _random_batches(3), Tolerances(atol=1e-7, rtol=1e-7), "fp16", 2).passed
    assert next(model.parameters()).dtype == torch.float32


def test_parity_memory_does_not_grow_with_the_split(tmp_path):
    import tracemalloc

    from vitrim.export.onnx import export_onnx
    from vitrim.export.parity import Tolerances, check_parity
    from vitrim.export.backends.ort_cpu import OrtCpuRunner
    from vitrim.export.runners import TorchRunner

    model = random_init(timm.create_model("vit_tiny_patch16_224", **TINY_KW), seed=6, std=0.2)
    onnx_path = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    peaks = []
    with TorchRunner(model, (1, 28, 28), threads=1) as ref, OrtCpuRunner(onnx_path, threads=1) as eng:
        for n in (8, 64):  # 8x more images
            tracemalloc.start()
            rep = check_parity(ref, eng, _random_batches(n, size=32), Tolerances(1e-4, 1e-3), "fp32", 2)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert rep.passed and rep.images == 32 * n
    one_batch = 32 * 28 * 28 * 4
    assert peaks[1] < peaks[0] + 8 * one_batch, peaks  # holding the split would add 56 batches
    # and a cap on the images is honoured
    with TorchRunner(model, (1, 28, 28), threads=1) as ref, OrtCpuRunner(onnx_path, threads=1) as eng:
        assert check_parity(ref, eng, _random_batches(10), Tolerances(1e-4, 1e-3), "fp32", 1, max_images=20).images == 20


def test_release_refuses_what_it_cannot_ship(foreign, tmp_path):
    from vitrim.pipeline.core.errors import UserError

    _, model, onnx_path = foreign
    data = list(_random_batches(1))
    with pytest.raises(UserError, match="torch program"):  # a torch target would silently ignore the file
        release(tmp_path / "t", Target(backend="torch-cpu", batch=8, threads=1), data, model=model, onnx_path=onnx_path)
    static = tmp_path / "static.onnx"
    prog = torch.onnx.export(model.eval(), (torch.randn(1, 1, 28, 28),), dynamo=True)
    prog.save(str(static))
    with pytest.raises(UserError, match="static batch of 1"):
        release(tmp_path / "s", Target(batch=8, threads=1), data, onnx_path=static)
    assert not (tmp_path / "t").exists() and not (tmp_path / "s" / "manifest.json").exists()
