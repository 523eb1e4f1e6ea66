"""Every shipped config is walked as far as this machine allows.

The ImageNet-style configs run on a tiny ImageFolder written here (3 classes,
so ``model.kwargs.num_classes`` is overridden) with a random-weight checkpoint of
their own architecture: the teacher's transforms resolve from its pretrained
config (224 px, bicubic, ImageNet mean/std), `vitrim eval` runs it, and a
TensorRT target fails fast with a clear message where TensorRT is absent.
"""
from __future__ import annotations

import glob
from pathlib import Path

import pytest
import timm

from vitrim.pipeline.core.config import load_config
from vitrim.pipeline.core.models import save_weights
from tests.pipeline.stages.test_user_path import write_folder

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_CONFIGS = sorted(p for p in glob.glob(str(ROOT / "configs" / "*.yaml")) if "fmnist" not in p)


def _has_trt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imgs"), 3, size=48, n_train=4, n_val=2)


@pytest.mark.parametrize("path", IMAGENET_CONFIGS, ids=[Path(p).stem for p in IMAGENET_CONFIGS])
def test_imagenet_config_walks(path, folder, tmp_path, capsys):
    from vitrim.pipeline.cli import main

    cfg = load_config(path)
    ckpt = tmp_path / "w.safetensors"
    save_weights(timm.create_model(cfg.model.arch, num_classes=3), ckpt)
    sets = ["--set", f"data.root={folder}", "--set", "model.kwargs={num_classes: 3}", "--set",
            f"model.checkpoint={ckpt}", "--set", "data.val_size=3", "--set", "data.workers=1",
            "--set", f"out_dir={tmp_path / 'run'}", "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["eval", path, *sets]) == 0
    out = capsys.readouterr().out
    assert "test top-1" in out and "on 6 images" in out
    if cfg.target.backend == "tensorrt" and not _has_trt():
        assert main(["run", path, *sets]) == 2
        err = capsys.readouterr().err
        assert "tensorrt" in err.lower()
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_imagenet_transforms_resolve_from_the_pretrained_config(folder):
    from vitrim.pipeline.core.data import build_splits

    cfg = load_config(ROOT / "configs" / "deit_small_cpu.yaml",
                      [f"data.root={folder}", "model.kwargs={num_classes: 3}", "data.val_size=3"])
    s = build_splits(cfg.data, model_cfg=cfg.model)
    x, _ = s.test[0]
    assert tuple(x.shape) == (3, 224, 224) and s.num_classes == 3
    t = s.test.transform
    names = [type(a).__name__ for a in t.transforms]
    assert names[:2] == ["Resize", "CenterCrop"] and "Normalize" in names
    assert t.transforms[0].size == 248  # 224 / crop_pct 0.9 for deit, bicubic
