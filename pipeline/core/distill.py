"""Knowledge-distillation loss (Hinton et al. 2015; DeiT's two-head variant).

``loss = CE(y, label_smoothing) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``.
For distilled DeiT students (a second, distillation head) both heads get the
loss and it is averaged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_term(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1), reduction="batchmean",
                    log_target=True) * (T * T)


def kd_loss(student_out, teacher_logits: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, T: float = 2.0,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """CE + alpha * T^2 * KL; ``student_out`` is logits or a (cls, dist) pair of logits."""
    heads = student_out if isinstance(student_out, (tuple, list)) else (student_out,)
    total = 0.0
    for s in heads:
        s = s.float()
        total = total + F.cross_entropy(s, y, label_smoothing=label_smoothing) + alpha * kd_term(s, teacher_logits.float(), T)
    return total / len(heads)


def make_kd_fn(teacher: torch.nn.Module, alpha: float, T: float, label_smoothing: float = 0.0):
    """A ``loss_fn(model, x, y)`` that distils from a frozen teacher in eval mode."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def fn(model, x, y):
        with torch.no_grad():
            t = teacher(x)
        return kd_loss(model(x), t, y, alpha, T, label_smoothing)

    return fn
