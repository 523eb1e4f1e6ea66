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
