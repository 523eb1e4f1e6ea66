"""Datasets: the embedded Fashion-MNIST default and ImageNet-style folders.

Splits: ``train`` (minus a held-out part), ``val`` (a deterministic held-out part of
train, used for search and fine-tune decisions) and ``test`` (final reports only).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from vitrim.pipeline.core.config import FMNIST_DEFAULT_DIR, DataConfig
from vitrim.pipeline.core.errors import UserError

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FIX = ("install the Debian package (apt-get install -y dataset-fashion-mnist) or put the four "
        "IDX .gz files in a folder and set VITRIM_FMNIST_DIR (or data.root) to it")


class TensorImages(Dataset):
    """Images and labels held in memory; indexable by an int or a list of ints.

    Batch indexing lets a ``BatchSampler`` fetch a whole batch with one gather,
    which is much faster than collating 256 single images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(idx, (list, tuple)):
            idx = torch.as_tensor(idx)
        x = self.images[idx].float().div_(255.0).sub_(self.mean).div_(self.std)
        return x.unsqueeze(-3), self.labels[idx]

    def subset(self, idx: torch.Tensor) -> "TensorImages":
        return TensorImages(self.images[idx], self.labels[idx], self.mean, self.std)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError("data", f"'{path}' is not a readable .gz IDX file ({e})", "re-download it; " + _FIX) from None
    if len(raw) < 8:
        raise UserError("data", f"'{path}' is truncated", _FIX)
    got_magic, n = struct.unpack(">II", raw[:8])
    if got_magic != magic:
        raise UserError("data", f"'{path}' has IDX magic {got_magic}, expected {magic}", "check the file names; " + _FIX)
    dims = [n]
    off = 8
    if magic == 2051:
        dims += list(struct.unpack(">II", raw[8:16]))
        off = 16
    expected = off + int(np.prod(dims))
    if len(raw) != expected:
        raise UserError("data", f"'{path}' has {len(raw)} bytes, expected {expected} for shape {dims}", "the file is corrupt; " + _FIX)
    return np.frombuffer(raw, dtype=np.uint8, offset=off).reshape(dims)


def fmnist_dir(root: str | None) -> Path:
    return Path(root or os.environ.get("VITRIM_FMNIST_DIR") or FMNIST_DEFAULT_DIR)


def load_fmnist(root: str | None, split: str) -> TensorImages:
    """Read one Fashion-MNIST split (``train`` or ``test``) from IDX .gz files."""
    d = fmnist_dir(root)
    img_name, lbl_name = FMNIST_FILES[split]
    for name in (img_name, lbl_name):
        if not (d / name).is_file():
            raise UserError("data", f"Fashion-MNIST file '{d / name}' not found", _FIX)
    images = _read_idx(d / img_name, 2051)
    labels = _read_idx(d / lbl_name, 2049)
    if len(images) != len(labels):
        raise UserError("data", f"{d}: {len(images)} images but {len(labels)} labels in '{split}'", _FIX)
    if labels.max() > 9:
        raise UserError("data", f"{d / lbl_name}: label {labels.max()} out of range 0..9", _FIX)
    return TensorImages(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)), FMNIST_MEAN, FMNIST_STD)


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, val) index split of ``range(n)``."""
    if not 0 < val_size < n:
        raise UserError("data", f"data.val_size={val_size} must be between 1 and {n - 1}", "lower data.val_size")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _limit(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    idx = torch.arange(n)
    if isinstance(ds, TensorImages):
        return ds.subset(idx)
    return torch.utils.data.Subset(ds, idx.tolist())


def build_splits(cfg: DataConfig, model: torch.nn.Module | None = None) -> Splits:
    """Build train / val / test datasets for a data config."""
    if cfg.name == "fmnist":
        full = load_fmnist(cfg.root, "train")
        tr, va = split_indices(len(full), cfg.val_size, cfg.split_seed)
        train, val, test = full.subset(tr), full.subset(va), load_fmnist(cfg.root, "test")
        nc, ch, size = 10, 1, 28
    elif cfg.name == "imagefolder":
        train, val, test, nc, ch, size = _imagefolder(cfg, model)
    else:
        raise UserError("data", f"unknown dataset '{cfg.name}'", "use fmnist or imagefolder")
    return Splits(_limit(train, cfg.train_limit), _limit(val, cfg.val_limit), _limit(test, cfg.test_limit), nc, ch, size)


def _imagefolder(cfg: DataConfig, model: torch.nn.Module | None):
    """ImageNet layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    ``val`` here is held out of ``train``; the folder named ``val`` is the test split.
    Transforms come from the timm model's pretrained config.
    """
    import timm.data
    from torchvision.datasets import ImageFolder

    if not cfg.root or not Path(cfg.root, "train").is_dir() or not Path(cfg.root, "val").is_dir():
        raise UserError("data", f"data.root='{cfg.root}' has no train/ and val/ folders",
                        "point data.root at an ImageNet-style folder with train/<class>/ and val/<class>/")
    dcfg = timm.data.resolve_data_config({}, model=model) if model is not None else timm.data.resolve_data_config({})
    t_train = timm.data.create_transform(**dcfg, is_training=True)
    t_eval = timm.data.create_transform(**dcfg, is_training=False)
    train_full = ImageFolder(str(Path(cfg.root, "train")), transform=t_train)
    train_eval = ImageFolder(str(Path(cfg.root, "train")), transform=t_eval)
    test = ImageFolder(str(Path(cfg.root, "val")), transform=t_eval)
    tr, va = split_indices(len(train_full), cfg.val_size, cfg.split_seed)
    train = torch.utils.data.Subset(train_full, tr.tolist())
    val = torch.utils.data.Subset(train_eval, va.tolist())
    size = dcfg["input_size"]
    return train, val, test, len(train_full.classes), size[0], size[-1]


def make_loader(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                workers: int = 0, distributed: bool = False, epoch: int = 0) -> DataLoader:
    """A loader; in-memory datasets are fetched a whole batch at a time.

    With ``distributed`` a ``DistributedSampler`` shards the data across ranks;
    call ``loader.batch_sampler.sampler.set_epoch`` (done by :func:`set_epoch`).
    """
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, shuffle=shuffle, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
    elif shuffle:
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        sampler = RandomSampler(ds, generator=g)
    else:
        sampler = SequentialSampler(ds)
    if isinstance(ds, TensorImages):
        bs = BatchSampler(sampler, batch_size, drop_last)
        return DataLoader(ds, sampler=bs, batch_size=None, num_workers=workers)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers)


def set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Reseed the loader's shuffling for ``epoch`` (single process or DDP)."""
    s = loader.sampler
    if isinstance(s, BatchSampler):
        s = s.sampler
    if hasattr(s, "set_epoch"):
        s.set_epoch(epoch)
    elif isinstance(s, RandomSampler) and s.generator is not None:
        s.generator.manual_seed(seed * 1000 + epoch)
