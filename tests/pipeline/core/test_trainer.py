"""The training loop's resume: a run stopped mid-epoch by SIGTERM and resumed ends bit-identical to an
uninterrupted one, on an image folder with timm's random train transforms and loader workers, and on the
in-memory Fashion-MNIST path with the trainer's own random flips; the loader starts at the saved batch
without loading the skipped ones."""
from __future__ import annotations

import signal

import numpy as np
import pytest
import timm
import torch
from torch import nn

from vitrim.pipeline.core.config import DataConfig
from vitrim.pipeline.core.data import build_splits, make_loader, set_epoch
from vitrim.pipeline.core.errors import Interrupted
from vitrim.pipeline.core.trainer import TrainSpec, train
from tests.conftest import TINY_KW


def _png_folder(root, n_train: int = 10, n_val: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(("a", "b")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                img[:, : 24 * (c + 1) - 8] //= 2  # a class-dependent dark band, so the loss moves
                Image.fromarray(img).save(d / f"{i}.png")


def _ce(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(m(x), y)


def _stopping_at(step: int):
    """A CE loss that raises SIGTERM in this very thread at global step ``step`` (the trainer's own handler
    records it, finishes the step, checkpoints and raises Interrupted), as a cluster's scheduler would."""
    seen = {"n": 0}

    def loss(m, x, y):
        seen["n"] += 1
        if seen["n"] == step:
            signal.raise_signal(signal.SIGTERM)
        return _ce(m, x, y)

    return loss


def _full_vs_resumed(make_model, ds, spec: TrainSpec, stop_step: int, tmp_path):
    full = make_model()
    res_full = train(full, _ce, ds, spec, tmp_path / "full", log=lambda m: None)
    part = make_model()
    with pytest.raises(Interrupted):
        train(part, _stopping_at(stop_step), ds, spec, tmp_path / "part", log=lambda m: None)
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    resumed = make_model()
    res = train(resumed, _ce, ds, spec, tmp_path / "part", resume=True, log=lambda m: None)
    return full, res_full, resumed, res, ck


def _assert_same(full, resumed, res_full, res):
    diff = [k for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()) if not torch.equal(a, b)]
    assert not diff, f"resumed weights differ from the uninterrupted run's in {diff}"
    # the epoch's logged loss covers the steps before the interruption too
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in res_full.history]


def test_resume_mid_epoch_is_exact_on_imagefolder_with_random_transforms_and_workers(tmp_path):
    _png_folder(tmp_path / "data")
    kw = dict(img_size=32, patch_size=8, num_classes=2, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
    model = timm.create_model("vit_tiny_patch16_224", **kw)
    splits = build_splits(DataConfig(name="imagefolder", root=str(tmp_path / "data"), val_size=4), model)
    # the train split really is random (timm's RandomResizedCrop and flip), else this test proves nothing
    assert not torch.equal(splits.train[0][0], splits.train[0][0])
    # each sample's augmentation is a function of (seed, epoch, index): the same batches with or without workers
    one, two = (list(make_loader(splits.train, 4, shuffle=True, seed=3, workers=w)) for w in (0, 2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, two)) and len(one) == len(two) == 4

    def make_model():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", **kw)

    spec = TrainSpec(epochs=2, batch_size=4, lr=3e-3, warmup_epochs=0.5, seed=3, workers=2)
    assert len(splits.train) // spec.batch_size == 4
    full, res_full, resumed, res, ck = _full_vs_resumed(make_model, splits.train, spec, 3, tmp_path)
    assert (ck["epoch"], ck["step"]) == (0, 3)  # stopped mid-epoch, not at a boundary
    assert res.resumed_from == 0
    _assert_same(full, resumed, res_full, res)


def test_resume_mid_epoch_is_exact_with_random_flips_in_memory(tmp_path, fmnist_dir):
    train_ds = build_splits(DataConfig(root=fmnist_dir, train_limit=256)).train

    def make_model():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", **{**TINY_KW, "depth": 1})

    # the teacher's Fashion-MNIST recipe: the trainer's random flips draw from the restored global RNG
    spec = TrainSpec(epochs=2, batch_size=32, lr=3e-3, seed=1, hflip=True)
    full, res_full, resumed, res, ck = _full_vs_resumed(make_model, train_ds, spec, 11, tmp_path)
    assert (ck["epoch"], ck["step"]) == (1, 3)
    _assert_same(full, resumed, res_full, res)


class _Recording(torch.utils.data.Dataset):
    """A dataset that remembers which samples were read."""

    def __init__(self, n: int):
        self.n, self.read = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        self.read.append(int(i))
        return torch.tensor([float(i)]), torch.tensor(i)


def test_loader_starts_at_the_saved_batch_without_loading_skipped_ones():
    ds = _Recording(40)
    loader = make_loader(ds, 4, shuffle=True, seed=5, drop_last=True)
    set_epoch(loader, 2, 5)
    whole = [b[1].tolist() for b in loader]
    assert len(whole) == len(loader) == 10
    ds.read.clear()
    set_epoch(loader, 2, 5, start_batch=6)
    tail = [b[1].tolist() for b in loader]
    assert tail == whole[6:]
    assert sorted(ds.read) == sorted(i for b in whole[6:] for i in b)  # the first 6 batches were never read
    set_epoch(loader, 3, 5)  # the next epoch starts from its beginning again, in a new order
    nxt = [b[1].tolist() for b in loader]
    assert len(nxt) == 10 and nxt != whole
