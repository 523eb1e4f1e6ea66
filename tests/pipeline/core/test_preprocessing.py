"""Preprocessing is resolved once, field by field: data.* > the checkpoint's config.json / pretrained_cfg > timm.

Real timm models and real checkpoint files (config.json as timm's own ``save_config_for_hf`` writes it)
in tmp_path; no hub.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._hub import save_config_for_hf

from vitrim.pipeline.core.config import DataConfig, ModelConfig, load_config, save_resolved
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.models import save_weights
from vitrim.pipeline.core.preprocessing import (FMNIST_PREPROCESSING, SRC_DATA, SRC_MODEL, check_expected_top1,
                                                resolve_preprocessing)

ARCH = "vit_tiny_patch16_224"
KW = dict(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
TIMM = f"timm default for {ARCH}"


def _model() -> torch.nn.Module:
    return timm.create_model(ARCH, **KW).eval()


def test_resolution_order_and_the_source_of_each_field(tmp_path):
    model = _model()
    ckpt = tmp_path / "my_vit.safetensors"
    save_weights(model, ckpt)
    mcfg = ModelConfig(arch=ARCH, kwargs=dict(KW), checkpoint=str(ckpt))
    data = DataConfig(name="imagefolder", root=str(tmp_path))

    # (c) nothing beside the checkpoint: the architecture's timm defaults (crop 0.9, mean/std 0.5)
    p = resolve_preprocessing(data, mcfg)  # the architecture on the meta device
    assert p.input_size == (3, 32, 32) and p.channels == "RGB" and p.layout == "NCHW"
    assert p.crop_pct == 0.9 and p.mean == (0.5, 0.5, 0.5) and p.resize == (35, 35)
    assert p.sources["input_size"] == SRC_MODEL and p.sources["crop_pct"] == p.sources["mean"] == TIMM

    # (a) timm's own config.json beside the checkpoint (pretrained_cfg section)
    save_config_for_hf(model, str(tmp_path / "config.json"), data_config=dict(
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=1.0, interpolation="bilinear"))
    p = resolve_preprocessing(data, mcfg, model)
    cj = f"config.json ({tmp_path / 'config.json'})"
    assert p.crop_pct == 1.0 and p.resize == (32, 32) and p.interpolation == "bilinear"
    assert p.mean == pytest.approx(IMAGENET_DEFAULT_MEAN) and p.std == pytest.approx(IMAGENET_DEFAULT_STD)
    assert {p.sources[k] for k in ("mean", "std", "crop_pct", "crop_mode", "interpolation")} == {cj}
    assert "config.json" in p.line() and "resize 32 bilinear, crop 1.0 (center)" in p.line()

    # (b) explicit data.* keys win over config.json, field by field
    data2 = DataConfig(name="imagefolder", root=str(tmp_path), crop_pct=0.8, mean=[0.1, 0.2, 0.3])
    p = resolve_preprocessing(data2, mcfg, model)
    assert p.crop_pct == 0.8 and p.resize == (40, 40) and p.mean == (0.1, 0.2, 0.3)
    assert p.sources["crop_pct"] == p.sources["mean"] == SRC_DATA and p.sources["std"] == cj
    assert p.std == pytest.approx(IMAGENET_DEFAULT_STD) and p.interpolation == "bilinear"


def test_pretrained_cfg_inside_a_pth_and_a_legacy_flat_config_json(tmp_path):
    model = _model()
    ckpt = tmp_path / "ck.pth"
    torch.save({"state_dict": model.state_dict(),
                "pretrained_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2], "crop_pct": 0.7}}, ckpt)
    mcfg = ModelConfig(arch=ARCH, kwargs=dict(KW), checkpoint=str(ckpt))
    data = DataConfig(name="imagefolder", root=str(tmp_path))
    p = resolve_preprocessing(data, mcfg, model)
    assert p.mean == (0.4, 0.4, 0.4) and p.crop_pct == 0.7 and p.sources["mean"] == f"pretrained_cfg in {ckpt}"
    assert p.sources["interpolation"] == TIMM
    # a legacy flat config.json (timm's top-level keys) beside it wins over the embedded one, key by key
    (tmp_path / "config.json").write_text(json.dumps({"architecture": ARCH, "num_classes": 3, "crop_pct": 1.0}))
    p = resolve_preprocessing(data, mcfg, model)
    assert p.crop_pct == 1.0 and p.mean == (0.4, 0.4, 0.4) and "config.json" in p.sources["crop_pct"]


def test_a_config_json_for_another_model_is_refused(tmp_path):
    model = _model()
    ckpt = tmp_path / "my_vit.safetensors"
    save_weights(model, ckpt)
    mcfg = ModelConfig(arch=ARCH, kwargs=dict(KW), checkpoint=str(ckpt))
    data = DataConfig(name="imagefolder", root=str(tmp_path))
    cj = tmp_path / "config.json"
    cj.write_text(json.dumps({"architecture": ARCH, "pretrained_cfg": {"input_size": [3, 224, 224]}}))
    with pytest.raises(UserError, match=r"input_size \[3, 224, 224\].*\[3, 32, 32\]"):
        resolve_preprocessing(data, mcfg, model)
    cj.write_text(json.dumps({"architecture": "deit_small_patch16_224", "pretrained_cfg": {"crop_pct": 1.0}}))
    with pytest.raises(UserError, match="deit_small_patch16_224"):
        resolve_preprocessing(data, mcfg, model)
    cj.write_text(json.dumps({"architecture": ARCH, "pretrained_cfg": {"mean": [0.5], "crop_pct": 1.0}}))
    with pytest.raises(UserError, match="1 values but the teacher takes 3"):
        resolve_preprocessing(data, mcfg, model)


def test_fmnist_preprocessing_is_fixed_and_not_silently_overridden():
    p = resolve_preprocessing(DataConfig())
    assert p is FMNIST_PREPROCESSING
    assert p.input_size == (1, 28, 28) and p.channels == "L" and p.resize is None
    assert p.mean == (0.2860,) and p.std == (0.3530,) and "fixed" in p.line()
    with pytest.raises(UserError, match="data.crop_pct.*fixed"):
        load_config(None, ["data.crop_pct=1.0"])


def test_resolved_config_records_the_preprocessing_and_reproduces_it(tmp_path):
    model = _model()
    ckpt = tmp_path / "my_vit.safetensors"
    save_weights(model, ckpt)
    save_config_for_hf(model, str(tmp_path / "config.json"),
                       data_config=dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=1.0))
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path}", f"model.checkpoint={ckpt}",
                             f"model.kwargs={json.dumps(KW)}", f"out_dir={tmp_path}"])
    p = resolve_preprocessing(cfg.data, cfg.model)
    path = save_resolved(cfg, tmp_path, p)
    d = yaml.safe_load(path.read_text())
    assert d["preprocessing"]["crop_pct"] == 1.0 and "config.json" in d["preprocessing"]["sources"]["mean"]
    assert d["data"]["crop_pct"] == 1.0 and d["data"]["mean"] == pytest.approx(list(IMAGENET_DEFAULT_MEAN))
    # the file alone reproduces it, config.json gone: the same fields, now from data.*
    (tmp_path / "config.json").unlink()
    again = resolve_preprocessing(load_config(path).data, cfg.model)
    assert again == p and set(again.sources.values()) == {SRC_DATA, SRC_MODEL}


def test_expected_top1_stops_naming_the_transforms_and_the_keys():
    p = resolve_preprocessing(DataConfig(name="imagefolder"), ModelConfig(arch=ARCH, kwargs=dict(KW)))
    mcfg = ModelConfig(arch=ARCH, expected_top1=96.67)
    assert check_expected_top1(ModelConfig(arch=ARCH), 10.0, 100, p) is None  # not set: no check
    assert "within 1 pt" in check_expected_top1(mcfg, 95.8, 120, p)
    with pytest.raises(UserError) as e:
        check_expected_top1(mcfg, 74.17, 120, p)
    msg = str(e.value)
    assert "74.17%" in msg and "22.50 pt below" in msg and "crop 0.9 (center)" in msg
    for key in ("data.crop_pct", "data.mean", "data.std", "data.interpolation", "config.json"):
        assert key in msg
