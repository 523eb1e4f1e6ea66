"""Shared fixtures: tiny models and tiny real-data slices.

Real Fashion-MNIST comes from the Debian package (make test installs it); a test
that needs it is skipped, with the reason, only where it truly is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vitrim.pipeline.core.config import FMNIST_DEFAULT_DIR

torch.set_num_threads(2)

TINY_KW = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def fmnist_root() -> str | None:
    d = os.environ.get("VITRIM_FMNIST_DIR") or FMNIST_DEFAULT_DIR
    return d if Path(d, "train-images-idx3-ubyte.gz").is_file() else None


@pytest.fixture(scope="session")
def fmnist_dir() -> str:
    d = fmnist_root()
    if d is None:
        pytest.skip("Fashion-MNIST IDX files absent (apt-get install -y dataset-fashion-mnist, or set VITRIM_FMNIST_DIR)")
    return d


@pytest.fixture
def tiny_cfg(tmp_path, fmnist_dir):
    """A RunConfig for a tiny ViT on a small real data slice, writing to tmp_path."""
    from vitrim.pipeline.core.config import load_config

    return load_config(None, [
        f"out_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", f"data.root={fmnist_dir}",
        "data.train_limit=1024", "data.val_limit=256", "data.test_limit=256", "data.val_size=1000",
        "data.batch_size=64", "model.arch=vit_tiny_patch16_224",
        "model.kwargs={img_size: 28, patch_size: 7, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0}",
        "teacher.epochs=2", "teacher.lr=0.003", "target.batch=8",
    ])


def random_init(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random non-trivial weights (timm inits LayerScale/bias to constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + base)
    return model.eval()


TINY_PCFG = dict(embed_points=2, head_points=0, qk_points=1, v_points=1, mlp_points=2, warmup=2, repeats=6, rounds=2,
                 checks=2, calibration_plans=3, min_visit_ms=0.0, remeasure_spread_pct=0.0)


@pytest.fixture(scope="session")
def tiny_spec():
    import timm

    from vitrim.pipeline.core.models import describe

    return describe(timm.create_model("vit_tiny_patch16_224", **TINY_KW), "vit_tiny_patch16_224", dict(TINY_KW))


@pytest.fixture(scope="session")
def tiny_lut(tiny_spec, tmp_path_factory):
    """A real ORT-CPU LUT on a tiny grid (batch 4, 1 thread), measured once per session."""
    from vitrim.export.target import Target
    from vitrim.pipeline.core.config import ProfileConfig
    from vitrim.pipeline.core.plan import Floors
    from vitrim.profiling.build import build_lut

    path = tmp_path_factory.mktemp("lut") / "lut.json"
    lut = build_lut(tiny_spec, Target(batch=4, threads=1), ProfileConfig(**TINY_PCFG), Floors(), 8, path, progress=False)
    return lut, path


INT8_SETS = ["data.train_limit=2048", "data.val_limit=256", "data.test_limit=384", "data.val_size=1000",
             "data.batch_size=64", "model.arch=vit_tiny_patch16_224",
             "model.kwargs={img_size: 28, patch_size: 7, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, "
             "num_heads: 2, mlp_ratio: 2.0}", "teacher.epochs=2", "teacher.lr=0.003"]


@pytest.fixture(scope="session")
def int8_teacher(tmp_path_factory, fmnist_dir):
    """A tiny teacher trained for 2 epochs on a real Fashion-MNIST slice (int8 needs real logit margins);
    (cache dir, teacher, splits), shared by the int8 and int8-recovery tests."""
    from vitrim.pipeline.core.config import load_config
    from vitrim.pipeline.core.data import build_splits
    from vitrim.pipeline.stages.teacher import load_teacher

    d = tmp_path_factory.mktemp("int8")
    cfg = load_config(None, [f"cache_dir={d}", f"data.root={fmnist_dir}", *INT8_SETS])
    splits = build_splits(cfg.data)
    teacher, _ = load_teacher(cfg, splits, log=lambda m: None)
    return d, teacher, splits


# --- real filesystem faults: a small tmpfs (a full disk) and a read-only bind mount ------------------------------

def _mount_unavailable() -> str | None:
    """Why this process cannot mount (None when it can): tried once, on a scratch directory, never assumed."""
    import subprocess
    import tempfile

    if getattr(_mount_unavailable, "reason", 0) != 0:
        return _mount_unavailable.reason
    d = tempfile.mkdtemp(prefix="vitrim-mount-probe-")
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True, text=True)
        reason = None if p.returncode == 0 else f"cannot mount a tmpfs here: {(p.stderr or p.stdout).strip()}"
        if reason is None:
            subprocess.run(["umount", d], check=True)
    except FileNotFoundError:
        reason = "no mount command on this machine"
    finally:
        os.rmdir(d)
    _mount_unavailable.reason = reason
    return reason


class Mounts:
    """Mounts made by one test, all unmounted in its teardown (lazily when still busy)."""

    def __init__(self, base: Path):
        self.base, self.points = base, []

    def _mount(self, *args: str, point: Path) -> None:
        import subprocess

        p = subprocess.run(["mount", *args, str(point)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"mount {' '.join(args)} failed: {p.stderr.strip()}")
        self.points.append(point)

    def full_disk(self, name: str, size: str) -> Path:
        """An empty tmpfs of ``size`` (e.g. ``300k``): the disk fills up after that many bytes."""
        point = self.base / name
        point.mkdir(parents=True)
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", point=point)
        return point

    def read_only(self, src: Path, name: str | None = None) -> Path:
        """``src`` seen through a read-only bind mount (root ignores permission bits; a mount it cannot write)."""
        import subprocess

        point = self.base / (name or f"{src.name}-ro")
        point.mkdir(parents=True)
        self._mount("--bind", str(src), point=point)
        p = subprocess.run(["mount", "-o", "remount,ro,bind", str(point)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot remount a bind mount read-only: {p.stderr.strip()}")
        return point

    def close(self) -> None:
        import subprocess

        for point in reversed(self.points):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)
        self.points.clear()


@pytest.fixture
def mounts(tmp_path):
    """Real filesystem faults for a test: ``mounts.full_disk(name, size)``, ``mounts.read_only(dir)``.
    Skipped, with the reason, where this process cannot mount (not root, no CAP_SYS_ADMIN, no mount command)."""
    reason = _mount_unavailable()
    if reason:
        pytest.skip(reason)
    m = Mounts(tmp_path / "mnt")
    try:
        yield m
    finally:
        m.close()
