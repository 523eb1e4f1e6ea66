"""Teacher: train (or reuse) the embedded default's timm ViT, and load any teacher.

The teacher checkpoint is cached under ``cache_dir`` keyed by a hash of the model,
teacher-training and data configs, so reruns reuse it.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn

from vitrim.pipeline.core.config import RunConfig, config_hash
from vitrim.pipeline.core.data import Splits, build_splits
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.evaluate import top1
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.models import create_model, describe, save_weights
from vitrim.pipeline.core.rundir import RunDir
from vitrim.pipeline.core.trainer import TrainSpec, train


def teacher_key(cfg: RunConfig) -> str:
    d, m = cfg.data, cfg.model
    # the weights' identity only (model.expected_top1 is a check, not an input), spelled as the dataclass repr
    # it replaces so that teachers cached before those keys existed stay valid
    model = f"ModelConfig(arch={m.arch!r}, kwargs={m.kwargs!r}, checkpoint={m.checkpoint!r}, pretrained={m.pretrained!r})"
    val_size = d.val_size if d.val_size is not None or d.name != "fmnist" else 5000  # the default, as spelled before
    data = {"name": d.name, "root": d.root, "val_size": val_size, "split_seed": d.split_seed,
            "train_limit": d.train_limit, "batch_size": d.batch_size}
    transforms = {k: getattr(d, k) for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")}
    if any(v is not None for v in transforms.values()):  # a teacher trained under other transforms is another one
        data["transforms"] = transforms
    if d.name != "fmnist" or d.augment.hflip == 0:  # the training augmentation (an image folder's always counts)
        data["augment"] = dataclasses.asdict(d.augment)
    return config_hash({"model": model, "teacher": {k: v for k, v in vars(cfg.teacher).items() if k != "cache"},
                        "data": data})


def teacher_path(cfg: RunConfig) -> Path:
    if cfg.teacher.cache:
        return Path(cfg.teacher.cache)
    return Path(cfg.cache_dir) / f"teacher-{teacher_key(cfg)}.safetensors"


def load_teacher(cfg: RunConfig, splits: Splits | None = None, train_if_missing: bool = True,
                 log=print) -> tuple[nn.Module, dict]:
    """The teacher model and its info (accuracy, training time).

    Order: a teacher that ``vitrim train-teacher`` trained or adapted for this exact
    config (cached under ``cache_dir``); else ``model.checkpoint`` / ``model.pretrained``
    as they are; else, for the embedded default, train one now (when ``train_if_missing``).
    """
    path = teacher_path(cfg)
    info_path = path.with_suffix(".json")
    if path.is_file():  # its weights replace any checkpoint or hub weights: load neither
        model = create_model(cfg.model, load_checkpoint=False, pretrained=False)
        from vitrim.pipeline.core.models import load_weights

        load_weights(model, path, stage="teacher")
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        info["source"] = str(path)
        log(f"[teacher] reusing trained teacher {path}")
        return model.eval(), info
    if cfg.model.checkpoint or cfg.model.pretrained:
        model = create_model(cfg.model).eval()
        describe(model, cfg.model.arch, cfg.model.kwargs)
        return model, {"source": cfg.model.checkpoint or "timm-pretrained"}
    if not train_if_missing:
        raise UserError("teacher", f"no trained teacher at '{path}'", "run `vitrim train-teacher CONFIG` first")
    if cfg.data.name != "fmnist":
        raise UserError("teacher", f"no teacher weights for '{cfg.model.arch}' (model.checkpoint is empty and "
                        "model.pretrained is false)", "set model.checkpoint to a local .safetensors/.pth file, or "
                        "train one on this data first with `vitrim train-teacher CONFIG` (from scratch, or from "
                        "model.checkpoint)")
    return train_teacher(cfg, splits, log=log)


def train_teacher(cfg: RunConfig, splits: Splits | None = None, log=print) -> tuple[nn.Module, dict]:
    """Train the teacher on the config's data and cache it.

    From scratch, or, with ``model.checkpoint`` set, fine-tuned from that checkpoint
    (a head of another class count is re-initialised), so an ImageNet checkpoint can
    be adapted to the user's classes before compression.
    """
    from vitrim.pipeline.core.device import resolve_device

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.teacher.seed)
    model = create_model(cfg.model, load_checkpoint=False)
    describe(model, cfg.model.arch, cfg.model.kwargs)  # refuse unsupported variants before spending time
    start = "from scratch"
    if cfg.model.checkpoint:
        from vitrim.pipeline.core.models import load_weights

        fresh = load_weights(model, cfg.model.checkpoint, stage="teacher", allow_new_head=True)
        start = f"from {cfg.model.checkpoint}" + (f" (new head: {', '.join(fresh)})" if fresh else "")
    if splits is None:
        splits = build_splits(cfg.data, model=model, model_cfg=cfg.model)
        log(splits.preprocessing.line())
        log(splits.line())
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[teacher] training {cfg.model.arch} {cfg.model.kwargs} ({n_params / 1e6:.2f}M params) {start} "
        f"for {cfg.teacher.epochs} epochs on {len(splits.train)} images ({device})")
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.teacher.label_smoothing)
    spec = TrainSpec(epochs=cfg.teacher.epochs, batch_size=cfg.data.batch_size, lr=cfg.teacher.lr, min_lr=1e-5,
                     weight_decay=cfg.teacher.weight_decay, warmup_epochs=cfg.teacher.warmup_epochs, clip_grad=1.0,
                     seed=cfg.teacher.seed,  # garments are mirror-symmetric; folders flip in their transform
                     hflip=cfg.data.name == "fmnist" and cfg.data.augment.hflip > 0,
                     workers=cfg.data.workers)
    path = teacher_path(cfg)
    work = path.parent / f".{path.stem}.work"
    t0 = time.time()

    def val_fn(m):
        return top1(m, splits.val, cfg.data.eval_batch_size, device, workers=cfg.data.workers)

    res = train(model, lambda m, x, y: crit(m(x), y), splits.train, spec, work, val_fn=val_fn, resume=True,
                desc="teacher", device=device, log=log)
    wall = time.time() - t0
    model.eval()
    test_acc = top1(model, splits.test, cfg.data.eval_batch_size, device, workers=cfg.data.workers)
    model.cpu()
    info = {"arch": cfg.model.arch, "kwargs": cfg.model.kwargs, "params": n_params, "epochs": cfg.teacher.epochs,
            "start": start, "train_s": round(wall, 1),
            "val_top1": res.history[-1]["val_top1"] if res.history else None,
            "test_top1": test_acc, "history": res.history, "key": teacher_key(cfg)}
    save_weights(model, path)
    atomic_write_json(path.with_suffix(".json"), info)
    RunDir(work).checkpoint.unlink(missing_ok=True)
    try:
        work.rmdir()
    except OSError:
        pass
    log(f"[teacher] test top-1 {test_acc:.2f}% after {wall:.0f}s; saved {path}")
    from vitrim.pipeline.core.preprocessing import check_chance

    # the weights stay cached (a later run with model.chance_check=false reuses them); the command stops here
    log(check_chance(cfg.model, test_acc, len(splits.test), splits.num_classes, splits.augment, splits.preprocessing))
    info["source"] = str(path)
    return model, info


def expect_teacher(cfg: RunConfig, teacher: nn.Module, splits: Splits, acc: float | None = None,
                   log=print) -> None:
    """With ``model.expected_top1`` set: evaluate the teacher on the test split (unless ``acc`` is given) and stop
    (exit 2) when it falls short, before any search, training or export."""
    from vitrim.pipeline.core.preprocessing import check_expected_top1

    if cfg.model.expected_top1 is None:
        return
    if acc is None:
        acc = top1(teacher, splits.test, cfg.data.eval_batch_size, workers=cfg.data.workers)
    log(check_expected_top1(cfg.model, acc, len(splits.test), splits.preprocessing))
