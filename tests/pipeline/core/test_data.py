import gzip
import shutil

import numpy as np
import pytest
import torch

from vitrim.pipeline.core.config import DataConfig
from vitrim.pipeline.core.data import build_splits, load_fmnist, make_loader, split_indices
from vitrim.pipeline.core.errors import UserError


def test_fmnist_shapes_labels_split(fmnist_dir):
    s = build_splits(DataConfig(root=fmnist_dir, val_size=5000))
    assert len(s.train) == 55000 and len(s.val) == 5000 and len(s.test) == 10000
    x, y = s.train[[0, 1, 2]]
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert int(s.test.labels.min()) == 0 and int(s.test.labels.max()) == 9
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    # normalised roughly to zero mean / unit std
    xs, _ = s.train[list(range(2000))]
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1


def test_split_is_deterministic_and_disjoint():
    a_tr, a_va = split_indices(1000, 100, seed=0)
    b_tr, b_va = split_indices(1000, 100, seed=0)
    c_tr, c_va = split_indices(1000, 100, seed=1)
    assert torch.equal(a_va, b_va) and torch.equal(a_tr, b_tr)
    assert not torch.equal(a_va, c_va)
    assert len(set(a_tr.tolist()) & set(a_va.tolist())) == 0
    assert len(a_tr) + len(a_va) == 1000


def test_loader_batches(fmnist_dir):
    s = build_splits(DataConfig(root=fmnist_dir, train_limit=300))
    batches = list(make_loader(s.train, 128, shuffle=True, seed=0))
    assert [b[0].shape[0] for b in batches] == [128, 128, 44]
    again = list(make_loader(s.train, 128, shuffle=True, seed=0))
    assert torch.equal(batches[0][1], again[0][1])


def test_missing_dataset_is_clear(tmp_path):
    with pytest.raises(UserError, match="not found") as e:
        load_fmnist(str(tmp_path), "train")
    assert "VITRIM_FMNIST_DIR" in str(e.value)


def test_corrupt_dataset_is_clear(tmp_path, fmnist_dir):
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(f"{fmnist_dir}/{f}", tmp_path / f)
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(UserError, match="corrupt"):
        load_fmnist(str(tmp_path), "test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not a gzip file")
    with pytest.raises(UserError, match="not a readable"):
        load_fmnist(str(tmp_path), "test")


def test_imagefolder_missing_root_is_clear(tmp_path):
    with pytest.raises(UserError, match="train/ and val/"):
        build_splits(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_layout_with_timm_transforms(tmp_path):
    import timm
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.png")
    model = timm.create_model("deit_tiny_patch16_224", num_classes=2)
    s = build_splits(DataConfig(name="imagefolder", root=str(tmp_path), val_size=2), model)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 2, 4)
    assert s.num_classes == 2 and s.in_chans == 3 and s.img_size == 224
    x, y = s.test[0]
    assert x.shape == (3, 224, 224) and y in (0, 1)
    xb, yb = next(iter(make_loader(s.train, 4, shuffle=True)))
    assert xb.shape == (4, 3, 224, 224)
