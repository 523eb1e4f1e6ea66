"""Datasets: the embedded Fashion-MNIST default and ImageNet-style folders.

Splits: ``train`` (minus the holdout), the *holdout* (``Splits.val``: a deterministic part of the
training images, ``data.val_size``, never trained on, for the search's and fine-tune's decisions) and
``test`` (Fashion-MNIST's test set, an image folder's ``val/`` folder: every report, gate and verdict).
"""
from __future__ import annotations

import gzip
import itertools
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from vitrim.pipeline.core.config import FMNIST_DEFAULT_DIR, AugmentConfig, DataConfig
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.preprocessing import FMNIST_MEAN, FMNIST_PREPROCESSING, FMNIST_STD, Preprocessing, \
    resolve_preprocessing
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
    val: Dataset  # the holdout split (held out of the training images)
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    preprocessing: Preprocessing | None = None  # resolved once; printed and recorded by every command
    val_size: str = ""  # how the holdout's size was resolved, for the log
    augment: dict | None = None  # the training transform's create_transform arguments (image folders)

    def line(self) -> str:
        """One line: the three splits' sizes and the training augmentation."""
        aug = ("hflip 0.5 (in memory)" if self.augment is None else
               ", ".join(f"{k} {v}" for k, v in self.augment.items()))
        return (f"data: {len(self.train)} train, {len(self.val)} holdout ({self.val_size}), {len(self.test)} test "
                f"images, {self.num_classes} classes; training augmentation (data.augment.*): {aug}")


DEFAULT_VAL_SIZE = {"fmnist": 5000, "imagefolder": 0.1}


def resolve_val_size(val_size: float | None, n: int, dataset: str) -> tuple[int, str]:
    """The holdout's image count for ``n`` training images, and how it was resolved (for the log).

    ``val_size`` is a count (>= 1) or a fraction (< 1) of ``n``; None takes the dataset's default.
    """
    given = val_size
    if val_size is None:
        val_size = DEFAULT_VAL_SIZE[dataset]
    if val_size < 1:
        count = max(1, round(val_size * n))
        how = f"data.val_size={'null: ' if given is None else ''}{val_size:g} of {n} training images"
    else:
        count = int(val_size)
        how = f"data.val_size={'null: ' if given is None else ''}{count} of {n} training images"
    if not 0 < count < n:
        raise UserError("data", f"{how} leaves {n - count} to train on (the holdout must be 1 to {n - 1} images)",
                        "lower data.val_size, or give a fraction such as 0.1")
    return count, how


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, holdout) index split of ``range(n)``."""
    if not 0 < val_size < n:
        raise UserError("data", f"data.val_size={val_size} must be between 1 and {n - 1}", "lower data.val_size")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def resolve_augment(a: AugmentConfig, img_size: int) -> dict:
    """``timm.data.create_transform`` training arguments for ``data.augment`` at input size ``img_size``.

    Unset (null) keys take a default that suits the size: timm's ImageNet recipe (crops down to 8% of the
    area, colour jitter 0.4) from 160 px, crops down to 25% from 96 px, and 60% without colour jitter below,
    so a small image keeps its object.
    """
    if a.scale is not None:
        scale = tuple(a.scale)
    else:
        scale = (0.08, 1.0) if img_size >= 160 else (0.25, 1.0) if img_size >= 96 else (0.6, 1.0)
    jitter = a.color_jitter if a.color_jitter is not None else (0.4 if img_size >= 160 else 0.0)
    jitter = jitter or None  # timm adds a no-op ColorJitter for 0; None leaves it out
    return {"scale": scale, "ratio": tuple(round(r, 4) for r in a.ratio), "hflip": a.hflip, "vflip": a.vflip,
            "color_jitter": jitter, "auto_augment": a.auto_augment, "re_prob": a.re_prob, "re_mode": a.re_mode,
            "re_count": a.re_count}


def _limit(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    idx = torch.arange(n)
    if isinstance(ds, TensorImages):
        return ds.subset(idx)
    return torch.utils.data.Subset(ds, idx.tolist())


def build_splits(cfg: DataConfig, model: torch.nn.Module | None = None, model_cfg: Any = None) -> Splits:
    """Build train / val / test datasets for a data config.

    For ``imagefolder`` the transforms and the class count come from the teacher:
    pass the model, or its :class:`~vitrim.pipeline.core.config.ModelConfig`
    (the architecture is then instantiated on the meta device, without weights), and the
    model config (its ``checkpoint`` locates a ``config.json`` carrying the preprocessing).
    ``Splits.preprocessing`` holds what was resolved (:mod:`vitrim.pipeline.core.preprocessing`).
    """
    if cfg.name == "fmnist":
        full = load_fmnist(cfg.root, "train")
        count, how = resolve_val_size(cfg.val_size, len(full), cfg.name)
        tr, va = split_indices(len(full), count, cfg.split_seed)
        train, val, test = full.subset(tr), full.subset(va), load_fmnist(cfg.root, "test")
        nc, ch, size, prep, aug = 10, 1, 28, FMNIST_PREPROCESSING, None
        if cfg.augment.hflip == 0:
            aug = {"hflip": 0}
    elif cfg.name == "imagefolder":
        train, val, test, nc, ch, size, prep, how, aug = _imagefolder(cfg, model, model_cfg)
    else:
        raise UserError("data", f"unknown dataset '{cfg.name}'", "use fmnist or imagefolder")
    return Splits(_limit(train, cfg.train_limit), _limit(val, cfg.val_limit), _limit(test, cfg.test_limit), nc, ch,
                  size, prep, how, aug)


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _open_image(path: str, mode: str):
    """PIL loader that names the file it cannot read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise UserError("data", f"unreadable image '{path}' ({type(e).__name__}: {e})",
                        "delete or replace that file") from None


def _scan_folder(root: Path) -> list[str]:
    """Class names under ``root``, refusing empty class folders (named)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError("data", f"'{root}' has no class folders", f"put images in {root}/<class>/")
    for c in classes:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (root / c).rglob("*") if f.is_file()):
            raise UserError("data", f"class folder '{root / c}' has no images ({', '.join(IMG_EXTENSIONS)})",
                            "add images to it or remove the folder")
    return classes


def _imagefolder(cfg: DataConfig, model: torch.nn.Module | None, model_cfg: Any = None):
    """ImageNet layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    The holdout is taken out of ``train/``; the folder named ``val/`` is the test split.
    The training transform takes ``data.augment`` (:func:`resolve_augment`).
    Transforms come from :func:`resolve_preprocessing` (``data.*``, else the checkpoint's
    config.json, else the architecture's timm defaults); a 1-channel teacher reads the
    images as grayscale.
    """
    import functools

    import timm.data
    from torchvision.datasets import ImageFolder

    if not cfg.root or not Path(cfg.root, "train").is_dir() or not Path(cfg.root, "val").is_dir():
        raise UserError("data", f"data.root='{cfg.root}' has no train/ and val/ folders",
                        "point data.root at an ImageNet-style folder with train/<class>/ and val/<class>/")
    root = Path(cfg.root)
    classes = _scan_folder(root / "train")
    test_classes = _scan_folder(root / "val")
    if test_classes != classes:
        extra = sorted(set(test_classes) ^ set(classes))
        raise UserError("data", f"'{root / 'val'}' and '{root / 'train'}' have different class folders "
                        f"(e.g. {extra[:3]})", "use the same class folder names in train/ and val/")
    if model is None:
        from vitrim.pipeline.core.models import meta_model

        model = meta_model(model_cfg)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(classes):
        raise UserError("data", f"'{root / 'train'}' has {len(classes)} classes but the teacher's head has "
                        f"{num_classes} outputs (model.kwargs.num_classes)",
                        f"set model.kwargs.num_classes: {len(classes)} (and fine-tune the teacher with "
                        "`vitrim train-teacher`), or use the matching data")
    prep = resolve_preprocessing(cfg, model_cfg, model)
    dcfg = prep.timm_kwargs()
    C = dcfg["input_size"][0]
    loader = functools.partial(_open_image, mode="L" if C == 1 else "RGB")
    aug = resolve_augment(cfg.augment, max(dcfg["input_size"][1:]))
    t_train = timm.data.create_transform(**dcfg, **aug, is_training=True)
    t_eval = timm.data.create_transform(**dcfg, is_training=False)
    train_full = ImageFolder(str(root / "train"), transform=t_train, loader=loader)
    train_eval = ImageFolder(str(root / "train"), transform=t_eval, loader=loader)
    test = ImageFolder(str(root / "val"), transform=t_eval, loader=loader)
    for ds in (train_full, test):  # fail fast on a broken first image, not minutes into training
        seen = set()
        for path, label in ds.samples:
            if label not in seen:
                seen.add(label)
                _open_image(path, "L" if C == 1 else "RGB")
    count, how = resolve_val_size(cfg.val_size, len(train_full), cfg.name)
    tr, va = split_indices(len(train_full), count, cfg.split_seed)
    train = torch.utils.data.Subset(train_full, tr.tolist())
    val = torch.utils.data.Subset(train_eval, va.tolist())
    size = dcfg["input_size"]
    return train, val, test, len(classes), size[0], size[-1], prep, how, aug


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample's augmentation, a function of (seed, epoch, index) alone."""
    ss = np.random.SeedSequence([seed % 2**64, epoch, index])
    return int(ss.generate_state(1, np.uint64)[0])


class SeededSamples(Dataset):
    """``ds`` whose random transforms draw from a generator of (seed, epoch, sample index) alone.

    Each ``__getitem__`` seeds torch's CPU generator, Python's ``random`` and NumPy's global
    generator from :func:`sample_seed`, runs the wrapped dataset, and puts the caller's states
    back. A sample's augmentation is then the same whichever worker loads it, in whichever
    order, with any number of workers or ranks, and on a resumed run (the way timm's and
    webdataset's pipelines make workers reproducible); loading a sample leaves the main
    process's random stream (dropout, the trainer's flips) untouched. Workers copy the
    dataset when an epoch's iterator starts, so set ``epoch`` before iterating.
    """

    def __init__(self, ds: Dataset, seed: int, epoch: int = 0):
        self.ds, self.seed, self.epoch = ds, seed, epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Any:
        s = sample_seed(self.seed, self.epoch, int(index))
        if torch.utils.data.get_worker_info() is not None:  # a worker's own streams serve nobody else
            _seed_cpu_rngs(s)
            return self.ds[index]
        saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
        _seed_cpu_rngs(s)
        try:
            return self.ds[index]
        finally:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def _seed_cpu_rngs(s: int) -> None:
    # the CPU generator only: torch.manual_seed also seeds every accelerator, ~70 us a call
    torch.default_generator.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


class FromPosition(Sampler[int]):
    """The indices of ``sampler`` from position ``start`` on.

    Resuming mid-epoch skips the first ``start`` indices of the epoch's (seeded) order
    without loading their samples.
    """

    def __init__(self, sampler: Sampler[int], start: int = 0):
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)  # type: ignore[arg-type]


def _loader_seed(seed: int, epoch: int) -> int:
    return seed * 1000 + epoch


def make_loader(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                workers: int = 0, distributed: bool = False, epoch: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader whose every draw is seeded by (``seed``, epoch), never by the global random state.

    In-memory datasets are fetched a whole batch at a time; other datasets are wrapped in
    :class:`SeededSamples`, so their random transforms depend on (seed, epoch, sample index)
    only. With ``distributed`` a ``DistributedSampler`` shards the data across ranks. Call
    :func:`set_epoch` before each epoch (and with ``start_batch`` to resume mid-epoch).
    """
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler: Sampler[int] = DistributedSampler(ds, shuffle=shuffle, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
    elif shuffle:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(_loader_seed(seed, epoch)))
    else:
        sampler = SequentialSampler(ds)
    sampler = FromPosition(sampler)
    # the iterator draws its workers' base seed from this generator: without one it draws from
    # the global torch state, which then differs between an interrupted and an uninterrupted run
    gen = torch.Generator().manual_seed(_loader_seed(seed, epoch))
    if isinstance(ds, TensorImages):
        bs = BatchSampler(sampler, batch_size, drop_last)
        return DataLoader(ds, sampler=bs, batch_size=None, num_workers=0, pin_memory=pin_memory,  # in memory already
                          generator=gen)
    return DataLoader(SeededSamples(ds, seed, epoch), batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False, generator=gen)


def set_epoch(loader: DataLoader, epoch: int, seed: int, start_batch: int = 0) -> None:
    """Seed the loader for ``epoch`` (single process or DDP) and start it at batch ``start_batch``.

    The skipped batches are neither loaded nor drawn: the epoch's order, each sample's
    augmentation and the workers' seeds depend on (seed, epoch) alone.
    """
    s = loader.sampler
    batch_size = loader.batch_size
    if isinstance(s, BatchSampler):
        batch_size = s.batch_size
        s = s.sampler
    if isinstance(s, FromPosition):
        s.start = start_batch * int(batch_size or 1)
        s = s.sampler
    elif start_batch:
        raise ValueError("start_batch needs a loader from make_loader")
    if hasattr(s, "set_epoch"):
        s.set_epoch(epoch)
    elif isinstance(s, RandomSampler) and s.generator is not None:
        s.generator.manual_seed(_loader_seed(seed, epoch))
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = epoch
    if loader.generator is not None:
        loader.generator.manual_seed(_loader_seed(seed, epoch))
