"""``vitrim slice``: cut the teacher down to a plan, a smaller dense CompactViT (the slicing itself is core)."""
from __future__ import annotations

import os
from typing import Callable, Optional

from vitrim.pipeline.core.config import RunConfig
from vitrim.pipeline.core.rundir import RunDir


def stage_slice(cfg: RunConfig, plan_path: str | os.PathLike, out_dir: str | os.PathLike,
                teacher_checkpoint: Optional[str] = None, log: Callable[[str], None] = print):
    """Slice the config's teacher (or ``teacher_checkpoint``) with the plan at ``plan_path``; writes the student
    (weights and plan) into ``out_dir``. Returns the student."""
    from vitrim.pipeline.core.plan import Plan
    from vitrim.pipeline.core.slicing import save_compact, slice_model
    from vitrim.pipeline.stages.teacher import load_teacher

    if teacher_checkpoint:
        cfg.model.checkpoint = teacher_checkpoint
    teacher, _ = load_teacher(cfg, train_if_missing=False)
    plan = Plan.load(plan_path)
    student = slice_model(teacher, plan)
    rd = RunDir(out_dir)
    save_compact(student, plan, rd.root)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    log(f"sliced {n_t / 1e6:.3f}M -> {n_s / 1e6:.3f}M params; wrote {rd.student} and {rd.plan.name}")
    log(plan.summary())
    return student
