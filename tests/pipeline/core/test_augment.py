"""The user's own small dataset (issue 38): training augmentation as config keys with size-aware defaults,
data.val_size as a count or a fraction (resolved and printed), and a teacher at chance refused."""
from __future__ import annotations

import numpy as np
import pytest
import timm
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from vitrim.pipeline.core.config import AugmentConfig, DataConfig, ModelConfig, load_config
from vitrim.pipeline.core.data import build_splits, resolve_augment, resolve_val_size
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.preprocessing import check_chance


def _folder(root, size=32, n_train=10, n_val=3, classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _steps(ds) -> list:
    while not hasattr(ds, "transform"):
        ds = ds.dataset
    return list(ds.transform.transforms)


def test_defaults_suit_the_image_size():
    small, mid, big = (resolve_augment(AugmentConfig(), s) for s in (32, 112, 224))
    assert small["scale"] == (0.6, 1.0) and small["color_jitter"] is None  # no 8% crops of a 32 px image
    assert mid["scale"] == (0.25, 1.0) and mid["color_jitter"] is None
    assert big["scale"] == (0.08, 1.0) and big["color_jitter"] == 0.4  # timm's ImageNet recipe
    got = resolve_augment(AugmentConfig(scale=[0.9, 1.0], color_jitter=0.2, auto_augment="rand-m9-mstd0.5",
                                        re_prob=0.25, vflip=0.5), 32)
    assert got["scale"] == (0.9, 1.0) and got["color_jitter"] == 0.2 and got["re_prob"] == 0.25 and got["vflip"] == 0.5


def test_the_training_transform_takes_the_keys(tmp_path):
    root = _folder(tmp_path)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=1,
                              num_heads=2)
    s = build_splits(DataConfig(name="imagefolder", root=str(root)), model)
    crop = _steps(s.train)[0]
    assert isinstance(crop, RandomResizedCropAndInterpolation) and crop.scale == (0.6, 1.0)
    assert not any(isinstance(t, T.ColorJitter) for t in _steps(s.train))
    assert "training augmentation (data.augment.*): scale (0.6, 1.0)" in s.line()
    a = AugmentConfig(scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, color_jitter=0.3, re_prob=0.5)
    s = build_splits(DataConfig(name="imagefolder", root=str(root), augment=a), model)
    steps = _steps(s.train)
    assert steps[0].scale == (1.0, 1.0) and steps[0].ratio == (1.0, 1.0)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in steps)
    assert any(isinstance(t, T.ColorJitter) for t in steps)
    assert any(type(t).__name__ == "RandomErasing" for t in steps)
    assert not any(isinstance(t, RandomResizedCropAndInterpolation) for t in _steps(s.test))  # evaluation: no aug


@pytest.mark.parametrize("key,value,match", [
    ("scale", "[0.08]", "data.augment.scale"), ("scale", "[0.5, 1.5]", "<= 1"), ("ratio", "[2, 1]", "min <= max"),
    ("hflip", "1.5", "probability"), ("re_mode", "zeros", "const, rand or pixel"),
    ("auto_augment", "bogus", "timm cannot parse")])
def test_bad_augment_keys_are_refused(tmp_path, key, value, match):
    with pytest.raises(UserError, match=match):
        load_config(None, ["data.name=imagefolder", f"data.augment.{key}={value}"])


def test_fmnist_takes_hflip_only():
    with pytest.raises(UserError, match="takes data.augment.hflip only"):
        load_config(None, ["data.augment.re_prob=0.5"])
    with pytest.raises(UserError, match="half the images or none"):
        load_config(None, ["data.augment.hflip=0.3"])
    assert load_config(None, ["data.augment.hflip=0"]).data.augment.hflip == 0


def test_val_size_is_a_count_or_a_fraction():
    assert resolve_val_size(None, 120, "imagefolder")[0] == 12  # the folder default: 0.1
    assert resolve_val_size(None, 60000, "fmnist") == (5000, "data.val_size=null: 5000 of 60000 training images")
    assert resolve_val_size(0.25, 120, "imagefolder") == (30, "data.val_size=0.25 of 120 training images")
    assert resolve_val_size(7, 120, "imagefolder")[0] == 7
    with pytest.raises(UserError, match="data.val_size=5000 of 119 training images leaves"):
        resolve_val_size(5000, 119, "imagefolder")
    for bad in ("1.5", "-0.1", "0"):
        with pytest.raises(UserError, match="data.val_size"):
            load_config(None, [f"data.val_size={bad}"])


def test_a_small_folder_runs_with_the_default_val_size(tmp_path):
    root = _folder(tmp_path, n_train=40)  # the case: 3 classes x 40 images; 5000 used to stop it
    s = build_splits(DataConfig(name="imagefolder", root=str(root)), model_cfg=ModelConfig(
        kwargs=dict(img_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=1, num_heads=2)))
    assert (len(s.train), len(s.val), len(s.test)) == (108, 12, 9)
    assert "108 train, 12 holdout (data.val_size=null: 0.1 of 120 training images), 9 test images" in s.line()


def test_chance_check():
    m = ModelConfig()
    assert "clearly above chance" in check_chance(m, 91.11, 45, 3)
    for acc, why in ((37.78, "under 1.5x chance = 50.00%"), (44.44, "binomial"), (48.89, "not above chance")):
        with pytest.raises(UserError, match="near chance") as e:
            check_chance(m, acc, 45, 3, {"scale": (0.08, 1.0)})
        assert why in e.value.what and "scale=(0.08, 1.0)" in e.value.what and "model.chance_check=false" in e.value.fix
    # many images: 12% of 10 classes is significantly above chance, and still useless (the margin catches it)
    with pytest.raises(UserError, match=r"under 1.5x chance = 15.00% \(model.chance_margin=0.5\)"):
        check_chance(m, 12.0, 10000, 10)
    assert "WARNING" in check_chance(ModelConfig(chance_check=False), 33.0, 45, 3)
    assert "clearly above" in check_chance(ModelConfig(chance_margin=0.0), 40.0, 10000, 3)
