"""Fine-tune a sliced student with knowledge distillation from the original.

A sliced model recovers accuracy only by fine-tuning with distillation (NViT,
UVC and ViT-Slim all do). The loss is :func:`vitrim.pipeline.core.distill.kd_loss`; the
loop is :func:`vitrim.pipeline.core.trainer.train` (AdamW + cosine, clipping, optional EMA,
AMP on CUDA, torchrun/DDP, atomic per-epoch checkpoints, exact resume,
SIGTERM-safe). Output: the student's weights and plan, and the fine-tune's log, in a
:class:`~vitrim.pipeline.core.rundir.RunDir` (the trainer's checkpoint in its ``finetune_dir``).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from vitrim.pipeline.core.compact import CompactViT
from vitrim.pipeline.core.config import RunConfig
from vitrim.pipeline.core.device import init_distributed, resolve_device
from vitrim.pipeline.core.errors import UserError
from vitrim.pipeline.core.distill import make_kd_fn
from vitrim.pipeline.core.evaluate import top1
from vitrim.pipeline.core.io import atomic_write_json
from vitrim.pipeline.core.plan import Plan
from vitrim.pipeline.core.rundir import RunDir
from vitrim.pipeline.core.slicing import save_compact
from vitrim.pipeline.core.device import dist_info
from vitrim.pipeline.core.trainer import TrainResult, TrainSpec, train


def finetune(cfg: RunConfig, teacher: torch.nn.Module, student: CompactViT, plan: Plan, splits, out_dir: str | os.PathLike,
             resume: bool = False, device: Optional[str] = None, log: Callable[[str], None] = print,
             stop_after: Optional[int] = None) -> TrainResult:
    """KD fine-tune ``student`` in place and write the student artifacts (rank 0)."""
    f = cfg.finetune
    # Pin this rank's device and join the process group before any model moves:
    # a bare "cuda" is cuda:0 on every rank and breaks DDP on ranks 1..N-1.
    device = resolve_device(device or cfg.device)
    init_distributed(device)
    teacher.to(device).eval()
    if student.head_dist is not None:
        student.distilled_training = True  # train both heads
    kd = make_kd_fn(teacher, f.alpha, f.temperature, f.label_smoothing, f.hidden_weight)
    spec = train_spec(cfg)
    rd = RunDir(out_dir)

    def val_fn(m):
        return top1(m, splits.val, cfg.data.eval_batch_size, device, workers=cfg.data.workers)

    res = train(student, kd, splits.train, spec, rd.finetune_dir.root, val_fn=val_fn, resume=resume, device=device,
                desc="finetune", log=log, stop_after=stop_after)
    student.distilled_training = False
    rank, _, _ = dist_info()
    if rank == 0 and not res.interrupted:
        student.to("cpu").eval()
        save_compact(student, plan, rd.root)
        atomic_write_json(rd.finetune_log, {"history": res.history, "wall_s": round(res.wall_s, 1),
                                                       "resumed_from": res.resumed_from, "epochs": f.epochs})
    return res


def train_spec(cfg: RunConfig) -> TrainSpec:
    """The KD fine-tune recipe of ``cfg.finetune`` (also used by benchmarks, so every method gets the same)."""
    f = cfg.finetune
    return TrainSpec(epochs=f.epochs, batch_size=cfg.data.batch_size, lr=f.lr, min_lr=f.min_lr,
                     weight_decay=f.weight_decay, warmup_epochs=f.warmup_epochs, clip_grad=f.clip_grad, ema=f.ema,
                     amp=f.amp, seed=f.seed, hflip=False, workers=cfg.data.workers)


def check_plan_matches_teacher(plan, teacher, cfg: RunConfig) -> None:
    from vitrim.pipeline.core.models import describe

    t = describe(teacher, cfg.model.arch, cfg.model.kwargs)
    keys = [k for k in t if k not in ("arch", "kwargs")]
    bad = [k for k in keys if plan.spec.get(k) != t[k]]
    if bad:
        raise UserError("finetune", f"the student's plan was made for another teacher ({bad[0]}: plan "
                        f"{plan.spec.get(bad[0])!r}, teacher {t[bad[0]]!r})",
                        "use the config of the teacher the plan was searched on")
