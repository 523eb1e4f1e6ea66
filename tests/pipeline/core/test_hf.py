"""Hugging Face transformers checkpoints in: a save_pretrained ViT / DeiT folder as model.checkpoint.

transformers builds a randomly initialised classifier and writes it with its image processor; vitrim
reads the folder with model.arch left out, converts it to the equivalent timm ViT, resolves the
preprocessing from preprocessor_config.json, and `vitrim eval` scores it. The logits vitrim computes
on its own preprocessed images equal transformers' on the image processor's (max |diff| <= 1e-5).
"""
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vitrim.pipeline.cli import main
from vitrim.pipeline.core.config import load_config
from vitrim.pipeline.core.data import build_splits
from vitrim.pipeline.core.models import describe
from vitrim.pipeline.stages.teacher import load_teacher

transformers = pytest.importorskip("transformers")

SIZE = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=3)
CASES = {  # (model class, image processor and its settings, image side on disk)
    "vit": ("ViTForImageClassification", "ViTConfig", "ViTImageProcessor",
            dict(size={"height": 32, "width": 32}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]), 32),
    "deit": ("DeiTForImageClassification", "DeiTConfig", "DeiTImageProcessor",
             dict(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}, resample=3,
                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]), 40),
}


def _hf_folder(tmp_path, kind, **cfg_kw):
    model_cls, cfg_cls, proc_cls, proc_kw, _ = CASES[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**SIZE, **cfg_kw})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # non-trivial weights (transformers inits LayerNorms to 1/0 and biases to 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    d = tmp_path / f"hf-{kind}"
    model.save_pretrained(d)
    proc = getattr(transformers, proc_cls)(**proc_kw)
    proc.save_pretrained(d)
    return d, model, proc


def _images(root, side, n=4):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def _config(tmp_path, folder, data_root) -> str:
    p = tmp_path / "hf.yaml"
    p.write_text(yaml.safe_dump({"data": {"name": "imagefolder", "root": str(data_root), "val_size": 2},
                                 "model": {"checkpoint": str(folder)}, "out_dir": str(tmp_path / "run"),
                                 "cache_dir": str(tmp_path / "cache")}))
    return str(p)


@pytest.mark.parametrize("kind", list(CASES))
def test_hf_checkpoint_through_vitrim_eval_equals_transformers(kind, tmp_path, capsys):
    folder, hf_model, proc = _hf_folder(tmp_path, kind)
    data = tmp_path / "images"
    _images(data, CASES[kind][4])
    config = _config(tmp_path, folder, data)

    cfg = load_config(config)
    assert cfg.model.arch == {"vit": "vit_base_patch16_224", "deit": "deit_base_distilled_patch16_224"}[kind]
    splits = build_splits(cfg.data, model_cfg=cfg.model)
    src = f"preprocessor_config.json ({folder / 'preprocessor_config.json'})"
    assert splits.preprocessing.sources["mean"] == src and splits.preprocessing.sources["crop_pct"] == src
    teacher, _ = load_teacher(cfg, splits, train_if_missing=False)
    describe(teacher, cfg.model.arch)  # the converted model is one vitrim slices

    files = [p for p, _ in splits.test.samples]
    pixels = proc(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    ours = torch.stack([splits.test[i][0] for i in range(len(files))])
    assert (ours - pixels).abs().max() <= 1e-5  # vitrim feeds what the image processor feeds
    with torch.no_grad():
        want, got = hf_model(pixel_values=pixels).logits, teacher(ours)
    assert (got - want).abs().max().item() <= 1e-5

    assert main(["eval", config]) == 0
    out = capsys.readouterr().out
    hf_top1 = 100.0 * (want.argmax(1) == torch.tensor([lbl for _, lbl in splits.test.samples])).float().mean()
    assert re.search(r"test top-1 ([\d.]+)%", out).group(1) == f"{hf_top1:.2f}", out
    assert "preprocessor_config.json" in out  # the preprocessing line names where it came from


def test_other_model_types_and_a_conflicting_arch_are_refused(tmp_path, capsys):
    folder, _, _ = _hf_folder(tmp_path, "vit")
    data = tmp_path / "images"
    _images(data, 32, n=1)
    config = _config(tmp_path, folder, data)
    assert main(["eval", config, "--set", "model.arch=deit_tiny_patch16_224"]) == 2
    assert "leave model.arch out" in capsys.readouterr().err
    cj = folder / "config.json"
    cj.write_text(cj.read_text().replace('"model_type": "vit"', '"model_type": "swin"'))
    assert main(["eval", config]) == 2
    err = capsys.readouterr().err
    assert "model_type 'swin'" in err and "Traceback" not in err


def test_deit_with_teacher_maps_its_two_classifiers_to_timms_two_heads(tmp_path):
    from vitrim.pipeline.core.config import ModelConfig
    from vitrim.pipeline.core.models import create_model

    torch.manual_seed(1)
    model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**SIZE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "d")
    ours = create_model(ModelConfig(checkpoint=str(tmp_path / "d")))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - model(pixel_values=x).logits).abs().max().item() <= 1e-5
